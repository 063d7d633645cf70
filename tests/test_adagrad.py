"""Adagrad / Adagrad8bit on the reference backend against torch.optim.Adagrad (for-loop and
default implementation) and bitsandbytes' CPU Adagrad8bit.

As torch's, fusedopt's Adagrad makes every param's state (``step`` 0, ``sum`` filled with
``initial_accumulator_value``) when the optimizer is made, so the frozen param of the grid has
a state too.
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
from fusedopt.testing import assert_identical

# Group 1 differs from the defaults in every hyper-parameter but initial_accumulator_value:
# torch fills every group's sum with the value given to the constructor, fusedopt with the
# group's own (see test_group_initial_accumulator_value).
GROUP1 = dict(lr=3e-3, lr_decay=0.02, weight_decay=0.05, eps=1e-6)
NAMES = ("sum",)

FLAGS = {
    "plain": {},
    "lr_decay": dict(lr_decay=0.1),
    "wd-maximize": dict(weight_decay=0.1, maximize=True),
    "initial-eps": dict(initial_accumulator_value=0.5, eps=1e-3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("foreach", [False, None], ids=["for-loop", "default"])
def test_adagrad_matches_torch(dtype, flags, foreach):
    kw = dict(lr=1e-1, **FLAGS[flags])
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.Adagrad(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.Adagrad(param_groups(theirs, GROUP1), foreach=foreach, **kw)
    run_against(opt, ours, topt, theirs, dtype, NAMES)
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert step_count(opt, ours[0][4]) == 0  # the frozen param: a state, never stepped


@pytest.mark.full
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", [dict(lr_decay=d, weight_decay=w, maximize=m, initial_accumulator_value=i, eps=e)
                                   for d, w, m, i, e in itertools.product((0.0, 0.1), (0.0, 0.1), (False, True),
                                                                          (0.0, 0.5), (1e-10, 1e-3))], ids=str)
def test_adagrad_every_flag_combination(dtype, flags):
    kw = dict(lr=1e-1, **flags)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.Adagrad(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.Adagrad(param_groups(theirs, GROUP1), foreach=False, **kw)
    run_against(opt, ours, topt, theirs, dtype, NAMES)

@pytest.mark.parametrize("cls", [fusedopt.Adagrad, fusedopt.Adagrad8bit], ids=lambda c: c.__name__)
def test_state_made_at_construction_as_torch(cls):
    """Before any step every param has torch's state: ``step`` 0 and ``sum`` filled with its
    group's ``initial_accumulator_value`` (8-bit: the codes of that fill)."""
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    extra = dict(min_8bit_size=256, block_size=64) if cls is fusedopt.Adagrad8bit else {}
    opt = cls(param_groups(ours, GROUP1), backend="reference", initial_accumulator_value=0.1, **extra)
    topt = torch.optim.Adagrad(param_groups(theirs, GROUP1), initial_accumulator_value=0.1)
    for gi, (og, tg) in enumerate(zip(ours, theirs)):
        for pi, (p, q) in enumerate(zip(og, tg)):
            st, tst = opt.state[p], topt.state[q]
            where = f"group {gi} param {pi}"
            assert set(tst) == {"step", "sum"}
            assert_identical(st["step"], tst["step"], f"{where} step")
            if cls is fusedopt.Adagrad or p.numel() < 256:
                assert set(st) == {"step", "sum"}
                assert_identical(st["sum"], tst["sum"], f"{where} sum")
            else:
                assert set(st) == {"step", "sum", "sum_absmax"}
                codes, absmax = quant.quantize_blockwise(tst["sum"], False, 64)
                assert_identical(st["sum"], codes, f"{where} sum codes")
                assert_identical(st["sum_absmax"], absmax, f"{where} sum_absmax")


@pytest.mark.parametrize("cls", [fusedopt.Adagrad, fusedopt.Adagrad8bit], ids=lambda c: c.__name__)
def test_group_initial_accumulator_value(cls):
    """Where fusedopt parts from torch, on purpose: each group's ``sum`` starts at the group's
    own ``initial_accumulator_value`` (torch's constructor fills every group with its argument's
    value and ignores a group's), and a group added later gets its state at once (torch's gets
    none and its step raises ``KeyError: 'sum'``, pytorch/pytorch#53712)."""
    p, q, r = torch.randn(300), torch.randn(30), torch.randn(7)
    opt = cls([{"params": [p]}, {"params": [q], "initial_accumulator_value": 0.5}], initial_accumulator_value=0.1,
              backend="reference", **({"min_8bit_size": 0, "block_size": 64} if cls is fusedopt.Adagrad8bit else {}))
    opt.add_param_group({"params": [r], "initial_accumulator_value": 2.0})
    for x, value in ((p, 0.1), (q, 0.5), (r, 2.0)):
        st = opt.state[x]
        assert set(st) - {"sum_absmax"} == {"step", "sum"} and float(st["step"]) == 0
        total = st["sum"]
        if total.dtype == torch.uint8:
            total = quant.dequantize_blockwise(total, st["sum_absmax"], False, 64)
        assert_identical(total, torch.full_like(x, value), f"sum of a param of a group with {value}")
    for x in (p, q, r):
        x.grad = torch.randn_like(x)
    opt.step()
    assert all(float(opt.state[x]["step"]) == 1 for x in (p, q, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adagrad_16bit_params_fp32_states(dtype):
    kw = dict(lr=1e-1, lr_decay=0.01, weight_decay=0.1)
    ours = make_params(dtype)
    theirs = clone_params(ours, lambda p: p.double())
    opt = fusedopt.Adagrad(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.Adagrad(param_groups(theirs, GROUP1), foreach=False, **kw)
    run_16bit(opt, ours, topt, theirs, dtype, NAMES)


def test_tensor_lr_changed_in_place():
    kw = dict(lr_decay=0.05)
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    lr_ours, lr_theirs = torch.tensor(1e-1, dtype=torch.float64), torch.tensor(1e-1, dtype=torch.float64)
    opt = fusedopt.Adagrad(param_groups(ours, {}), lr=lr_ours, backend="reference", **kw)
    topt = torch.optim.Adagrad(param_groups(theirs, {}), lr=lr_theirs, foreach=False, **kw)
    for step in range(STEPS):
        lr_ours.fill_(1e-1 * 0.7**step)
        lr_theirs.fill_(1e-1 * 0.7**step)
        run_against(opt, ours, topt, theirs, torch.float64, NAMES, [step])


def test_torch_state_dict_loads_both_ways():
    kw = dict(lr=1e-1, lr_decay=0.05, weight_decay=0.1)
    state_dicts_both_ways(lambda g: fusedopt.Adagrad(g, backend="reference", **kw),
                          lambda g: torch.optim.Adagrad(g, foreach=False, **kw), GROUP1, NAMES, stepless=False)


# ---------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(lr_decay=0.1, weight_decay=0.1), dict(initial_accumulator_value=0.2, maximize=True)],
                         ids=["lr_decay-wd", "initial-maximize"])
def test_adagrad8bit_steps_as_adagrad_on_dequantized_states(kw):
    check_8bit_lockstep(fusedopt.Adagrad8bit, fusedopt.Adagrad, kw, [NAMES, NAMES])


def test_adagrad8bit_bf16_params():
    check_8bit_lockstep(fusedopt.Adagrad8bit, fusedopt.Adagrad, {}, [NAMES, NAMES], dtype=torch.bfloat16)


def test_adagrad8bit_no_worse_than_bitsandbytes():
    """bitsandbytes' CPU Adagrad8bit takes neither lr_decay nor initial_accumulator_value (it
    refuses both): compared at their defaults."""
    ours, theirs, ref = run_against_bnb(fusedopt.Adagrad8bit, bnb.optim.Adagrad8bit, torch.optim.Adagrad, NAMES,
                                        lr=1e-2, weight_decay=0.01)
    assert_no_worse_than_bnb(ours, theirs, ref)


# ---------------------------------------------------------------------------------------------
# Bad input and the extras
# ---------------------------------------------------------------------------------------------

BAD = [
    # (overrides, exception, message, whether torch.optim.Adagrad raises the same)
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
    (dict(lr_decay=-0.1), ValueError, "Invalid lr_decay value: -0.1", True),
    (dict(lr_decay="x"), TypeError, "Invalid lr_decay: 'x'", False),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
    (dict(initial_accumulator_value=-0.5), ValueError, "Invalid initial_accumulator_value value: -0.5", True),
    (dict(eps=-1e-10), ValueError, "Invalid epsilon value: -1e-10", True),
    (dict(maximize=None), TypeError, "Invalid maximize: None", False),
]


@pytest.mark.parametrize("cls", [fusedopt.Adagrad, fusedopt.Adagrad8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("overrides,exc,msg,torch_too", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_changes_nothing(cls, overrides, exc, msg, torch_too):
    kw = dict(backend="reference", **({"min_8bit_size": 64} if cls is fusedopt.Adagrad8bit else {}))
    torch_make = (lambda params, **o: torch.optim.Adagrad(params, **o)) if torch_too else None
    check_bad_input(cls, kw, overrides, exc, msg, torch_make)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("cls", [fusedopt.Adagrad, fusedopt.Adagrad8bit], ids=lambda c: c.__name__)
def test_extras(cls, extra):
    kw = dict(lr=1e-1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)
    if cls is fusedopt.Adagrad8bit:
        kw.update(min_8bit_size=256, block_size=64)
    check_extra(extra, cls, kw)
