"""RMSprop / RMSprop8bit on the reference backend against torch.optim.RMSprop (for-loop and
default implementation) and bitsandbytes' CPU RMSprop8bit.

States: ``square_avg``; ``momentum_buffer`` where momentum > 0; ``grad_avg`` where centered.
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

# Group 1 differs from the defaults in every hyper-parameter.
GROUP1 = dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.5)

FLAGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "centered-wd": dict(centered=True, weight_decay=0.1),
    "centered-momentum-maximize": dict(centered=True, momentum=0.8, maximize=True, alpha=0.3),
}


def names(kw, group1=GROUP1):
    out = []
    for g in (kw, {**kw, **group1}):
        out.append(("square_avg",) + (("momentum_buffer",) if g.get("momentum", 0.0) > 0 else ())
                   + (("grad_avg",) if g.get("centered") else ()))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("foreach", [False, None], ids=["for-loop", "default"])
def test_rmsprop_matches_torch(dtype, flags, foreach):
    kw = dict(lr=1e-2, **FLAGS[flags])
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.RMSprop(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.RMSprop(param_groups(theirs, GROUP1), foreach=foreach, **kw)
    run_against(opt, ours, topt, theirs, dtype, names(kw))
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


@pytest.mark.full
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("flags", [dict(momentum=mo, centered=c, maximize=ma, weight_decay=w, alpha=a)
                                   for mo, c, ma, w, a in itertools.product((0.0, 0.9), (False, True), (False, True),
                                                                            (0.0, 0.1), (0.99, 0.5))], ids=str)
def test_rmsprop_every_flag_combination(dtype, flags, request):
    if dtype == torch.float32 and flags["momentum"] and flags["weight_decay"] and flags["alpha"] == 0.99 \
            and not flags["maximize"]:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "the reference rounds g + weight_decay * p twice where torch's grad.add(p, alpha=wd) rounds once "
            "(an fma: bit for bit on 1e6 random fp32 pairs); in one element of this data the two nearly cancel "
            "and the first momentum step g / (sqrt((1 - alpha) g^2) + eps) takes the difference to 1.21x "
            "fp32's tolerance")))
    kw = dict(lr=1e-2, **flags)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.RMSprop(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = torch.optim.RMSprop(param_groups(theirs, GROUP1), foreach=False, **kw)
    run_against(opt, ours, topt, theirs, dtype, names(kw))

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("centered", [False, True], ids=["", "centered"])
def test_rmsprop_16bit_params_fp32_states(dtype, centered):
    """Against torch on float64 copies, without weight decay, and centered with alpha = 0.5:
    RMSprop's first momentum step ``g / (sqrt((1 - alpha) g^2) + eps)`` turns the fp32 rounding
    of ``g = grad + weight_decay * p`` where the two nearly cancel into a buffer off from float64
    math by more than fp32's tolerance (measured: 1.3x in one element of 272; against torch's
    fp32 step, which rounds that sum once, 0 against 0.135), and the centered variance
    ``(1 - alpha) g^2 - ((1 - alpha) g)^2`` cancels all but 1% at alpha = 0.99. Weight decay and
    alpha = 0.99 are compared in fp32 and float64 above."""
    kw = dict(lr=1e-2, centered=centered, momentum=0.9, alpha=0.5 if centered else 0.99)
    ours = make_params(dtype)
    theirs = clone_params(ours, lambda p: p.double())
    group1 = dict(GROUP1, weight_decay=0.0)
    opt = fusedopt.RMSprop(param_groups(ours, group1), backend="reference", **kw)
    topt = torch.optim.RMSprop(param_groups(theirs, group1), foreach=False, **kw)
    run_16bit(opt, ours, topt, theirs, dtype, names(kw))


def test_tensor_lr_changed_in_place():
    kw = dict(momentum=0.9, centered=True)
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    lr_ours, lr_theirs = torch.tensor(1e-2, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)
    opt = fusedopt.RMSprop(param_groups(ours, {}), lr=lr_ours, backend="reference", **kw)
    topt = torch.optim.RMSprop(param_groups(theirs, {}), lr=lr_theirs, foreach=False, **kw)
    for step in range(STEPS):
        lr_ours.fill_(1e-2 * 0.7**step)
        lr_theirs.fill_(1e-2 * 0.7**step)
        run_against(opt, ours, topt, theirs, torch.float64, names(kw, {}), [step])


def test_torch_state_dict_loads_both_ways():
    kw = dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1)
    state_dicts_both_ways(lambda g: fusedopt.RMSprop(g, backend="reference", **kw),
                          lambda g: torch.optim.RMSprop(g, foreach=False, **kw), GROUP1, names(kw), stepless=False)


# ---------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(centered=True, momentum=0.9, maximize=True)],
                         ids=["wd", "centered-momentum-maximize"])
def test_rmsprop8bit_steps_as_rmsprop_on_dequantized_states(kw):
    check_8bit_lockstep(fusedopt.RMSprop8bit, fusedopt.RMSprop, kw, names(kw, {}))


def test_rmsprop8bit_bf16_params():
    kw = dict(centered=True, momentum=0.5)
    check_8bit_lockstep(fusedopt.RMSprop8bit, fusedopt.RMSprop, kw, names(kw, {}), dtype=torch.bfloat16)


def test_rmsprop8bit_no_worse_than_bitsandbytes():
    """bitsandbytes' CPU RMSprop8bit is the uncentered RMSprop without momentum (it refuses
    centered; its CPU step ignores momentum): compared so."""
    ours, theirs, ref = run_against_bnb(fusedopt.RMSprop8bit, bnb.optim.RMSprop8bit, torch.optim.RMSprop,
                                        ("square_avg",), lr=1e-3, alpha=0.9, weight_decay=0.01)
    assert_no_worse_than_bnb(ours, theirs, ref)


# ---------------------------------------------------------------------------------------------
# Bad input and the extras
# ---------------------------------------------------------------------------------------------

BAD = [
    # (overrides, exception, message, whether torch.optim.RMSprop raises the same)
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
    (dict(alpha=-0.5), ValueError, "Invalid alpha value: -0.5", True),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08", True),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
    (dict(momentum=-0.9), ValueError, "Invalid momentum value: -0.9", True),
    (dict(momentum="0.9"), TypeError, "Invalid momentum: '0.9'", False),
    (dict(centered=1), TypeError, "Invalid centered: 1", False),
    (dict(maximize="no"), TypeError, "Invalid maximize: 'no'", False),
]


@pytest.mark.parametrize("cls", [fusedopt.RMSprop, fusedopt.RMSprop8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("overrides,exc,msg,torch_too", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_changes_nothing(cls, overrides, exc, msg, torch_too):
    kw = dict(backend="reference", **({"min_8bit_size": 64} if cls is fusedopt.RMSprop8bit else {}))
    torch_make = (lambda params, **o: torch.optim.RMSprop(params, **o)) if torch_too else None
    check_bad_input(cls, kw, overrides, exc, msg, torch_make)


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("cls", [fusedopt.RMSprop, fusedopt.RMSprop8bit], ids=lambda c: c.__name__)
def test_extras(cls, extra):
    kw = dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)
    if cls is fusedopt.RMSprop8bit:
        kw.update(min_8bit_size=256, block_size=64)
    check_extra(extra, cls, kw)
