"""Adagrad / Adagrad8bit on the reference backend against torch.optim.Adagrad (for-loop and
default implementation) and bitsandbytes' CPU Adagrad8bit (the shared tests of tests/suite.py).

As torch's, fusedopt's Adagrad makes every param's state (``step`` 0, ``sum`` filled with
``initial_accumulator_value``) when the optimizer is made, so the frozen param of the grid has
a state too.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

import fusedopt
from cases import make_params, param_groups
from fusedopt import quant
from fusedopt.testing import assert_identical
from suite import Suite, shared

SUITE = Suite(
    cls=fusedopt.Adagrad, cls8bit=fusedopt.Adagrad8bit, torch_cls=torch.optim.Adagrad, lr=1e-1,
    # Group 1 differs from the defaults in every hyper-parameter but initial_accumulator_value:
    # torch fills every group's sum with the value given to the constructor, fusedopt with the
    # group's own (see test_group_initial_accumulator_value).
    group1=dict(lr=3e-3, lr_decay=0.02, weight_decay=0.05, eps=1e-6),
    names=lambda kw: ("sum",),
    flags={
        "plain": {},
        "lr_decay": dict(lr_decay=0.1),
        "wd-maximize": dict(weight_decay=0.1, maximize=True),
        "initial-eps": dict(initial_accumulator_value=0.5, eps=1e-3),
    },
    every=dict(lr_decay=(0.0, 0.1), weight_decay=(0.0, 0.1), maximize=(False, True),
               initial_accumulator_value=(0.0, 0.5), eps=(1e-10, 1e-3)),
    sixteen={"lr_decay-wd": (dict(lr_decay=0.01, weight_decay=0.1), {})},
    tensor_lr=dict(lr_decay=0.05),
    state_dicts={"lr_decay-wd": dict(lr_decay=0.05, weight_decay=0.1)},
    lockstep={"lr_decay-wd": dict(lr_decay=0.1, weight_decay=0.1),
              "initial-maximize": dict(initial_accumulator_value=0.2, maximize=True)},
    lockstep_bf16={},
    bnb=(bnb.optim.Adagrad8bit, ("sum",), dict(lr=1e-2, weight_decay=0.01),
         "it takes neither lr_decay nor initial_accumulator_value (it refuses both): compared at their defaults"),
    bad=[
        # (overrides, exception, message, whether torch.optim.Adagrad raises the same)
        (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
        (dict(lr_decay=-0.1), ValueError, "Invalid lr_decay value: -0.1", True),
        (dict(lr_decay="x"), TypeError, "Invalid lr_decay: 'x'", False),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
        (dict(initial_accumulator_value=-0.5), ValueError, "Invalid initial_accumulator_value value: -0.5", True),
        (dict(eps=-1e-10), ValueError, "Invalid epsilon value: -1e-10", True),
        (dict(maximize=None), TypeError, "Invalid maximize: None", False),
    ],
    extras=dict(lr=1e-1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
)
globals().update(shared(SUITE))


@pytest.mark.parametrize("cls", [fusedopt.Adagrad, fusedopt.Adagrad8bit], ids=lambda c: c.__name__)
def test_state_made_at_construction_as_torch(cls):
    """Before any step every param has torch's state: ``step`` 0 and ``sum`` filled with its
    group's ``initial_accumulator_value`` (8-bit: the codes of that fill)."""
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    extra = dict(min_8bit_size=256, block_size=64) if cls is fusedopt.Adagrad8bit else {}
    opt = cls(param_groups(ours, SUITE.group1), backend="reference", initial_accumulator_value=0.1, **extra)
    topt = torch.optim.Adagrad(param_groups(theirs, SUITE.group1), initial_accumulator_value=0.1)
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
