"""Lion / Lion8bit on the reference backend against lion-pytorch and bitsandbytes' CPU Lion8bit.

lion-pytorch (https://github.com/lucidrains/lion-pytorch) applies the weight decay as
``p *= 1 - lr * wd`` before the sign update, as DESIGN.md's Lion does; its state is ``exp_avg``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from lion_pytorch import Lion as LionPytorch

import fusedopt
from cases import (
    STEPS,
    assert_no_worse_than_bnb,
    compare,
    make_grads,
    make_params,
    param_groups,
    run_against_bnb,
    set_grads,
    step_count,
)
from fusedopt import quant
from fusedopt.testing import assert_identical

GROUP1 = dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98)], ids=["betas-default", "betas-other"])
def test_lion_matches_lion_pytorch(dtype, weight_decay, betas):
    kw = dict(lr=1e-2, betas=betas, weight_decay=weight_decay)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.Lion(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = LionPytorch(param_groups(theirs, GROUP1), **kw)
    for step in range(STEPS):
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, dtype, ("exp_avg",))
    assert step_count(opt, ours[0][1]) == STEPS
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lion_16bit_params_fp32_state(dtype):
    """16-bit params with an fp32 momentum against lion-pytorch on float64 copies, started each
    step from our params and state (one rounding, see fusedopt/testing.py)."""
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours = make_params(dtype)
    theirs = [[p.double() for p in group] for group in ours]
    opt = fusedopt.Lion(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = LionPytorch(param_groups(theirs, GROUP1), **kw)
    for step in range(STEPS):
        with torch.no_grad():
            for og, tg in zip(ours, theirs):
                for p, q in zip(og, tg):
                    q.copy_(p)
                    if p in opt.state:
                        topt.state[q]["exp_avg"].copy_(opt.state[p]["exp_avg"])
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads, convert=lambda g: g.double())
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, torch.float32, ("exp_avg",))


def test_lion8bit_no_worse_than_bitsandbytes():
    ours, theirs, ref = run_against_bnb(
        fusedopt.Lion8bit, bnb.optim.Lion8bit, LionPytorch, ("exp_avg",), lr=1e-4, weight_decay=0.1
    )
    assert_no_worse_than_bnb(ours, theirs, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lion8bit_small_tensors_keep_fp32_state(dtype):
    """Below min_8bit_size the momentum is fp32 and the run bit-identical to Lion; above it,
    uint8 codes with one fp32 absmax per block."""
    ours, plain = make_params(dtype), make_params(dtype)
    opt = fusedopt.Lion8bit(param_groups(ours, GROUP1), backend="reference", lr=1e-2, min_8bit_size=300, block_size=96)
    popt = fusedopt.Lion(param_groups(plain, GROUP1), backend="reference", lr=1e-2)
    for step in range(STEPS):
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(plain, grads)
        opt.step()
        popt.step()
    for gi, (og, pg) in enumerate(zip(ours, plain)):
        for pi, (p, q) in enumerate(zip(og, pg)):
            if p not in opt.state:
                continue
            st = opt.state[p]
            if p.numel() < 300:
                assert set(st) == {"step", "exp_avg"}
                assert_identical(st["exp_avg"], popt.state[q]["exp_avg"], f"group {gi} param {pi} exp_avg")
                assert_identical(p, q, f"group {gi} param {pi}")
            else:
                assert set(st) == {"step", "exp_avg", "exp_avg_absmax"}
                assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == p.shape
                assert st["exp_avg_absmax"].shape == (quant.num_blocks(p.numel(), 96),)
            assert_identical(st["step"], popt.state[q]["step"], f"group {gi} param {pi} step")
