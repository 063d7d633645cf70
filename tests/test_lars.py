"""LARS / LARS8bit on the reference backend against bitsandbytes' ``PytorchLARS`` and its CPU
LARS8bit, and against a float64 transcription of the math where PytorchLARS does not run
(momentum 0, which it refuses in its 8-bit classes and leaves ``update`` unset for; float64 and
16-bit params with ``max_unorm > 0``, which it asserts away).

You, Gitman, Ginsburg: "Large Batch Training of Convolutional Networks", 2017, in
bitsandbytes' form: L2 weight decay into the gradient, the heavy-ball buffer of torch's SGD,
and the update (after momentum) scaled down to ``max_unorm * ||p||`` where its norm is larger.
"""

from __future__ import annotations

import itertools
import functools

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.optim.lars import PytorchLARS

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

# Group 1 differs from the defaults in every hyper-parameter. max_unorm 1.0 there: some
# updates are clipped, some not (at 0.02 almost all are).
GROUP1 = dict(lr=3e-3, momentum=0.6, weight_decay=0.05, max_unorm=1.0)
NAMES = ("momentum_buffer",)


class FormulaLARS:
    """The update of FAMILIES.md (bitsandbytes' PytorchLARS, with momentum 0 allowed), per param
    tensor in float64, written from the formula::

        d = g + weight_decay * p
        buf = d  at the first step,  else  momentum * buf + (1 - dampening) * d   (momentum != 0)
        u = d + momentum * buf  if nesterov,  else  buf          (u = d when momentum == 0)
        s = max_unorm * ||p|| / ||u||  if max_unorm > 0 and ||u|| > max_unorm * ||p||,  else 1
        p = p - lr * s * u

    The state is named as fusedopt names it (``step``: the param's step count)."""

    def __init__(self, groups, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, max_unorm=0.02):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        max_unorm=max_unorm)
        self.param_groups = [{**defaults, **g} for g in groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for x in group["params"]:
                if x.grad is None:
                    continue
                p = x.double()
                d = x.grad.double() + group["weight_decay"] * p
                state = self.state.setdefault(x, {"step": torch.zeros((), dtype=torch.float64)})
                state["step"] += 1
                momentum = group["momentum"]
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    buf = d.clone() if state["step"] == 1 else momentum * buf.double() + (1 - group["dampening"]) * d
                    state["momentum_buffer"] = buf
                    u = d + momentum * buf if group["nesterov"] else buf
                else:
                    u = d
                scale = 1.0
                p_norm, u_norm = float(p.norm()), float(u.norm())
                if group["max_unorm"] > 0 and u_norm > group["max_unorm"] * p_norm:
                    scale = group["max_unorm"] * p_norm / u_norm
                x.copy_(p - group["lr"] * scale * u)


FLAGS = {
    "momentum": dict(momentum=0.9),
    "no-clip": dict(momentum=0.9, max_unorm=0.0),
    "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=0.1, max_unorm=0.5),
}


@pytest.mark.parametrize("flags", list(FLAGS))
def test_lars_matches_pytorch_lars(flags):
    dtype = torch.float32  # PytorchLARS asserts fp32 params where it clips
    kw = dict(lr=1e-2, **FLAGS[flags])
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.LARS(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = PytorchLARS(param_groups(theirs, GROUP1), **kw)
    run_against(opt, ours, topt, theirs, dtype, NAMES)
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


def _every_lars_combination(momenta):
    for momentum, dampening, nesterov, wd, max_unorm in itertools.product(momenta, (0.0, 0.3), (False, True), (0.0, 0.1),
                                                                          (0.0, 0.02, 1.0)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, max_unorm=max_unorm)


@pytest.mark.full
@pytest.mark.parametrize("flags", list(_every_lars_combination((0.9, 0.5))), ids=str)
def test_lars_every_flag_combination(flags):
    kw = dict(lr=1e-2, **flags)
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opt = fusedopt.LARS(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = PytorchLARS(param_groups(theirs, GROUP1), **kw)
    run_against(opt, ours, topt, theirs, torch.float32, NAMES)


@pytest.mark.full
@pytest.mark.parametrize("flags", list(_every_lars_combination((0.0, 0.9))), ids=str)
def test_lars_every_flag_combination_float64(flags):
    kw = dict(lr=1e-2, **flags)
    ours = make_params(torch.float64)
    theirs = clone_params(ours, lambda p: p.clone())
    opt = fusedopt.LARS(param_groups(ours, GROUP1), backend="reference", **kw)
    formula = FormulaLARS(param_groups(theirs, GROUP1), **kw)
    run_against(opt, ours, formula, theirs, torch.float64, [NAMES if g["momentum"] else () for g in formula.param_groups])

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", ["momentum", "nesterov", "momentum0", "momentum0-no-clip"])
def test_lars_matches_formula(dtype, flags):
    """Every dtype and momentum 0 (a fusedopt extension: LARS without a buffer) against the
    float64 transcription; group 1 keeps its momentum, so both kinds run side by side."""
    kw = dict(lr=1e-2, **FLAGS.get(flags, {}))
    if flags.startswith("momentum0"):
        kw.update(momentum=0.0, weight_decay=0.1, max_unorm=0.0 if flags.endswith("no-clip") else 0.02)
    ours = make_params(dtype)
    theirs = clone_params(ours, lambda p: p.clone().double())  # a copy in float64 too
    opt = fusedopt.LARS(param_groups(ours, GROUP1), backend="reference", **kw)
    formula = FormulaLARS(param_groups(theirs, GROUP1), **kw)
    names = [NAMES if g["momentum"] else () for g in formula.param_groups]
    run_against(opt, ours, formula, theirs, dtype, names)
    if not kw["momentum"]:
        assert all(set(opt.state[p]) == {"step"} for p in ours[0] if p in opt.state)


def test_lars_momentum0_no_clip_is_sgd():
    """momentum 0, max_unorm 0: torch's plain SGD with weight decay, bit for bit in float64."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    opt = fusedopt.LARS(param_groups(ours, {"lr": 3e-3}), backend="reference", max_unorm=0.0, **kw)
    topt = torch.optim.SGD(param_groups(theirs, {"lr": 3e-3}), foreach=False, **kw)
    run_against(opt, ours, topt, theirs, torch.float64, ())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lars_16bit_params_fp32_states(dtype):
    kw = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)
    ours = make_params(dtype)
    theirs = clone_params(ours, lambda p: p.double())
    opt = fusedopt.LARS(param_groups(ours, GROUP1), backend="reference", **kw)
    formula = FormulaLARS(param_groups(theirs, GROUP1), **kw)
    run_16bit(opt, ours, formula, theirs, dtype, NAMES)


def test_tensor_lr_changed_in_place():
    """lr as a 1-element tensor changed in place between steps, against PytorchLARS given each
    step's lr as a float (its step takes no tensor lr)."""
    kw = dict(momentum=0.9, weight_decay=0.1, max_unorm=0.5)
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    lr = torch.tensor(1e-2)
    opt = fusedopt.LARS(param_groups(ours, {}), lr=lr, backend="reference", **kw)
    topt = PytorchLARS(param_groups(theirs, {}), lr=1e-2, **kw)
    for step in range(STEPS):
        lr.fill_(1e-2 * 0.7**step)
        for group in topt.param_groups:
            group["lr"] = 1e-2 * 0.7**step
        run_against(opt, ours, topt, theirs, torch.float32, NAMES, [step])


@pytest.mark.parametrize("flags", ["momentum", "nesterov"])
def test_pytorch_lars_state_dict_loads_both_ways(flags):
    """PytorchLARS keeps no step: its buffers load as past their first step (the next step
    blends). float64 params: PytorchLARS's clip asserts fp32, so no clip here (the clip is
    per-step math, compared above)."""
    kw = dict(lr=1e-2, **{**FLAGS[flags], "max_unorm": 0.0})
    group1 = dict(GROUP1, max_unorm=0.0)
    state_dicts_both_ways(lambda g: fusedopt.LARS(g, backend="reference", **kw), lambda g: PytorchLARS(g, **kw),
                          group1, NAMES, stepless=True)


# ---------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=0.1, max_unorm=0.02),
                                dict(momentum=0.9, nesterov=True, max_unorm=1.0), dict(momentum=0.0)],
                         ids=["clip", "nesterov", "momentum0"])
def test_lars8bit_steps_as_lars_on_dequantized_states(kw):
    """The norms and the applied update come from this step's fp32 buffer, not the requantized
    one: the param is bit for bit the 32-bit step's."""
    names = [NAMES if kw["momentum"] else ()] * 2
    check_8bit_lockstep(fusedopt.LARS8bit, fusedopt.LARS, dict(lr=1e-2, **kw), names)


def test_lars8bit_bf16_params():
    check_8bit_lockstep(fusedopt.LARS8bit, fusedopt.LARS, dict(lr=1e-2, momentum=0.9), [NAMES, NAMES],
                        dtype=torch.bfloat16)


def _bnb_lars8bit_clips_on_cpu() -> bool:
    """Whether bitsandbytes' LARS8bit applies max_unorm on CPU tensors (0.50.2 does not: its
    CPU 8-bit step, ``_optimizer_update_8bit_blockwise_cpu``, takes no max_unorm)."""
    runs = []
    for max_unorm in (0.0, 0.02):
        p = torch.ones(4096)
        opt = bnb.optim.LARS8bit([p], lr=0.1, momentum=0.9, max_unorm=max_unorm)
        p.grad = torch.full_like(p, 100.0)
        opt.step()
        runs.append(p)
    return not torch.equal(*runs)


@pytest.mark.parametrize("max_unorm", [0.0, 0.02], ids=["no-clip", "clip"])
def test_lars8bit_no_worse_than_bitsandbytes(max_unorm):
    if max_unorm and not _bnb_lars8bit_clips_on_cpu():
        pytest.skip(f"bitsandbytes {bnb.__version__}'s LARS8bit ignores max_unorm on CPU tensors (its CPU 8-bit "
                    "step takes none): compared without the clip only")
    ours, theirs, ref = run_against_bnb(fusedopt.LARS8bit, bnb.optim.LARS8bit, PytorchLARS, NAMES,
                                        lr=1e-3, momentum=0.9, weight_decay=0.01, max_unorm=max_unorm)
    assert_no_worse_than_bnb(ours, theirs, ref)


# ---------------------------------------------------------------------------------------------
# Bad input and the extras
# ---------------------------------------------------------------------------------------------

BAD = [
    # (overrides, exception, message, whether PytorchLARS raises the same)
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
    (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5", True),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
    (dict(max_unorm=-0.02), ValueError, "Invalid max_unorm value: -0.02", False),
    (dict(max_unorm="0.02"), TypeError, "Invalid max_unorm: '0.02'", False),
    (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov momentum requires a momentum and zero dampening", True),
    (dict(nesterov=True, momentum=0.9, dampening=0.5), ValueError,
     "Nesterov momentum requires a momentum and zero dampening", True),
    (dict(nesterov="yes"), TypeError, "Invalid nesterov: 'yes'", False),
]


@pytest.mark.parametrize("cls", [fusedopt.LARS, fusedopt.LARS8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("overrides,exc,msg,torch_too", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_changes_nothing(cls, overrides, exc, msg, torch_too):
    kw = dict(backend="reference", lr=0.1, momentum=0.5, **({"min_8bit_size": 64} if cls is fusedopt.LARS8bit else {}))
    torch_make = functools.partial(PytorchLARS) if torch_too else None
    check_bad_input(cls, kw, overrides, exc, msg, torch_make)


def test_lr_is_required():
    with pytest.raises(TypeError, match="lr"):
        fusedopt.LARS([torch.randn(3)])


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("cls", [fusedopt.LARS, fusedopt.LARS8bit], ids=lambda c: c.__name__)
def test_extras(cls, extra):
    kw = dict(lr=1e-2, momentum=0.9, weight_decay=0.01, max_unorm=0.5)
    if cls is fusedopt.LARS8bit:
        kw.update(min_8bit_size=256, block_size=64)
    check_extra(extra, cls, kw)
