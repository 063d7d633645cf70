"""SGD / SGD8bit on the reference backend against torch.optim.SGD (for-loop and default
implementation) and bitsandbytes' CPU SGD8bit.

Every comparison runs 8 steps on the grid of tests/cases.py (two param groups of odd sizes with
different hyper-parameters, grads None on some steps) and compares every param and state.
torch's SGD keeps no ``step``; fusedopt keeps one (its momentum buffer is a copy of the grad at
the first step, a blend after it).
"""

from __future__ import annotations

import itertools
import bitsandbytes as bnb
import pytest
import torch

import fusedopt
from cases import (
    EXTRAS,
    STEPS,
    assert_no_worse_than_bnb,
    check_8bit_lockstep,
    check_bad_input,
    check_extra,
    checkpoint,
    clone_params,
    make_params,
    param_groups,
    run_16bit,
    run_against,
    run_against_bnb,
    state_dicts_both_ways,
    step_count,
)
from fusedopt import quant

# Group 1 differs from the defaults in lr, momentum and weight decay.
GROUP1 = dict(lr=3e-3, momentum=0.6, weight_decay=0.05)

FLAGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
    "nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
    "maximize-wd": dict(maximize=True, weight_decay=0.1),
}


def names(kw, group1=GROUP1):
    """The states of each group: a momentum buffer where momentum != 0."""
    return [("momentum_buffer",) if g.get("momentum", 0.0) else () for g in (kw, {**kw, **group1})]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("foreach", [False, None], ids=["for-loop", "default"])
def test_sgd_matches_torch(dtype, flags, foreach):
    kw = dict(lr=1e-2, **FLAGS[flags])
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.SGD(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.SGD(param_groups(theirs, GROUP1), foreach=foreach, **kw)
    run_against(opt, ours, topt, theirs, dtype, names(kw))
    # The grad=None steps and the frozen param: step counts lag or never start.
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


def _every_sgd_combination():
    for momentum, dampening, nesterov, maximize, wd in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True),
                                                                         (False, True), (0.0, 0.1)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize, weight_decay=wd)


@pytest.mark.full
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", list(_every_sgd_combination()), ids=str)
def test_sgd_every_flag_combination(dtype, flags):
    kw = dict(lr=1e-2, **flags)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.SGD(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.SGD(param_groups(theirs, GROUP1), foreach=False, **kw)
    run_against(opt, ours, topt, theirs, dtype, names(kw))

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sgd_16bit_params_fp32_states(dtype):
    kw = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)
    ours = make_params(dtype)
    theirs = clone_params(ours, lambda p: p.double())
    opt = fusedopt.SGD(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.SGD(param_groups(theirs, GROUP1), foreach=False, **kw)
    run_16bit(opt, ours, topt, theirs, dtype, names(kw))


def test_tensor_lr_changed_in_place():
    """lr as a 1-element tensor, changed in place between steps, followed as torch follows it."""
    kw = dict(momentum=0.9, weight_decay=0.1)
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    lr_ours, lr_theirs = torch.tensor(1e-2, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)
    opt = fusedopt.SGD(param_groups(ours, {}), lr=lr_ours, backend="reference", **kw)
    topt = torch.optim.SGD(param_groups(theirs, {}), lr=lr_theirs, foreach=False, **kw)
    for step in range(STEPS):
        lr_ours.fill_(1e-2 * 0.7**step)
        lr_theirs.fill_(1e-2 * 0.7**step)
        run_against(opt, ours, topt, theirs, torch.float64, ("momentum_buffer",), [step])


@pytest.mark.parametrize("flags", ["momentum", "nesterov-maximize"])
def test_torch_state_dict_loads_both_ways(flags):
    kw = dict(lr=1e-2, **FLAGS[flags])
    state_dicts_both_ways(lambda g: fusedopt.SGD(g, backend="reference", **kw),
                          lambda g: torch.optim.SGD(g, foreach=False, **kw), GROUP1, names(kw), stepless=True)


def test_torch_state_dict_loads_into_sgd8bit():
    """torch's fp32 momentum buffers load as their codes (quant.quantize_blockwise, signed map),
    past the first step (``step`` 1: the next step blends)."""
    kw = dict(lr=1e-2, momentum=0.9)
    base = make_params(torch.float32)
    topt = torch.optim.SGD(param_groups(base, GROUP1), **kw)
    for p in (p for group in base for p in group):
        p.grad = torch.randn_like(p)
    topt.step()
    ours = clone_params(base)
    opt = fusedopt.SGD8bit(param_groups(ours, GROUP1), backend="reference", min_8bit_size=256, block_size=64, **kw)
    opt.load_state_dict(checkpoint(topt.state_dict()))
    for p, q in zip((p for group in ours for p in group), (q for group in base for q in group)):
        st, buf = opt.state[p], topt.state[q]["momentum_buffer"]
        assert float(st["step"]) == 1.0
        if p.numel() < 256:
            assert torch.equal(st["momentum_buffer"], buf)
            continue
        codes, absmax = quant.quantize_blockwise(buf, True, 64)
        assert torch.equal(st["momentum_buffer"], codes) and torch.equal(st["momentum_buffer_absmax"], absmax)


# ---------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=0.1), dict(momentum=0.9, dampening=0.2, nesterov=False,
                                                                            maximize=True)], ids=["wd", "dampening-maximize"])
def test_sgd8bit_steps_as_sgd_on_dequantized_states(kw):
    check_8bit_lockstep(fusedopt.SGD8bit, fusedopt.SGD, kw, names(kw, {}))


def test_sgd8bit_nesterov_bf16_params():
    kw = dict(momentum=0.9, nesterov=True)
    check_8bit_lockstep(fusedopt.SGD8bit, fusedopt.SGD, kw, names(kw, {}), dtype=torch.bfloat16)


def test_sgd8bit_without_momentum_keeps_no_state():
    """momentum 0: no buffer to quantize (only ``step``), the step as SGD's."""
    check_8bit_lockstep(fusedopt.SGD8bit, fusedopt.SGD, {}, [(), ()], min_8bit_size=0)


def test_sgd8bit_no_worse_than_bitsandbytes():
    """bitsandbytes' CPU SGD8bit: ``buf = momentum * buf + g`` (a copy at the first step), as
    torch's SGD without dampening and Nesterov (its CPU step takes neither)."""
    ours, theirs, ref = run_against_bnb(fusedopt.SGD8bit, bnb.optim.SGD8bit, torch.optim.SGD, ("momentum_buffer",),
                                        lr=1e-3, momentum=0.9, weight_decay=0.01)
    assert_no_worse_than_bnb(ours, theirs, ref)


# ---------------------------------------------------------------------------------------------
# Bad input and the extras
# ---------------------------------------------------------------------------------------------

BAD = [
    # (overrides, exception, message, whether torch.optim.SGD raises the same)
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
    (dict(lr="0.1"), TypeError, "Invalid lr: '0.1'", False),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be a 1-element", False),
    (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5", True),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
    (dict(dampening="x"), TypeError, "Invalid dampening: 'x'", False),
    (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov momentum requires a momentum and zero dampening", True),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     "Nesterov momentum requires a momentum and zero dampening", True),
    (dict(nesterov=1), TypeError, "Invalid nesterov: 1", False),
    (dict(maximize="yes"), TypeError, "Invalid maximize: 'yes'", False),
]


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.SGD8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("overrides,exc,msg,torch_too", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_changes_nothing(cls, overrides, exc, msg, torch_too):
    kw = dict(backend="reference", momentum=0.5, **({"min_8bit_size": 64} if cls is fusedopt.SGD8bit else {}))
    torch_make = (lambda params, **o: torch.optim.SGD(params, **o)) if torch_too else None
    check_bad_input(cls, kw, overrides, exc, msg, torch_make)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.SGD8bit], ids=lambda c: c.__name__)
def test_extras(cls, extra):
    kw = dict(lr=1e-2, momentum=0.9, weight_decay=0.01)
    if cls is fusedopt.SGD8bit:
        kw.update(min_8bit_size=256, block_size=64)
    check_extra(extra, cls, kw)
