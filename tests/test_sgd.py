"""SGD / SGD8bit on the reference backend against torch.optim.SGD (for-loop and default
implementation) and bitsandbytes' CPU SGD8bit.

Every comparison runs 8 steps on the grid of tests/cases.py (two param groups of odd sizes with
different hyper-parameters, grads None on some steps) and compares every param and state.
torch's SGD keeps no ``step``; fusedopt keeps one (its momentum buffer is a copy of the grad at
the first step, a blend after it).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

import fusedopt
from cases import checkpoint, clone_params, make_params, param_groups
from fusedopt import quant
from suite import Suite, shared

SUITE = Suite(
    cls=fusedopt.SGD, cls8bit=fusedopt.SGD8bit, torch_cls=torch.optim.SGD, lr=1e-2,
    # Group 1 differs from the defaults in lr, momentum and weight decay.
    group1=dict(lr=3e-3, momentum=0.6, weight_decay=0.05),
    names=lambda kw: ("momentum_buffer",) if kw.get("momentum", 0.0) else (),
    flags={
        "plain": {},
        "momentum": dict(momentum=0.9),
        "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
        "nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
        "maximize-wd": dict(maximize=True, weight_decay=0.1),
    },
    every=dict(momentum=(0.0, 0.9), dampening=(0.0, 0.3), nesterov=(False, True), maximize=(False, True),
               weight_decay=(0.0, 0.1)),
    allowed=lambda f: not (f["nesterov"] and (f["momentum"] == 0 or f["dampening"] != 0)),
    sixteen={"nesterov-wd": (dict(momentum=0.9, nesterov=True, weight_decay=0.1), {})},
    tensor_lr=dict(momentum=0.9, weight_decay=0.1),
    state_dicts={"momentum": dict(momentum=0.9), "nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True)},
    stepless=True,
    lockstep={"wd": dict(momentum=0.9, weight_decay=0.1),
              "dampening-maximize": dict(momentum=0.9, dampening=0.2, nesterov=False, maximize=True),
              # momentum 0: no buffer to quantize (only ``step``), the step as SGD's
              "no-momentum": dict(min_8bit_size=0)},
    lockstep_bf16=dict(momentum=0.9, nesterov=True),
    bnb=(bnb.optim.SGD8bit, ("momentum_buffer",), dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
         "buf = momentum * buf + g (a copy at the first step), as torch's SGD without dampening and Nesterov (its "
         "CPU step takes neither)"),
    bad=[
        # (overrides, exception, message, whether torch.optim.SGD raises the same)
        (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001", True),
        (dict(lr="0.1"), TypeError, "Invalid lr: '0.1'", False),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be a 1-element", False),
        (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5", True),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1", True),
        (dict(dampening="x"), TypeError, "Invalid dampening: 'x'", False),
        (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov momentum requires a momentum and zero dampening",
         True),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
         "Nesterov momentum requires a momentum and zero dampening", True),
        (dict(nesterov=1), TypeError, "Invalid nesterov: 1", False),
        (dict(maximize="yes"), TypeError, "Invalid maximize: 'yes'", False),
    ],
    bad_kw=dict(momentum=0.5),
    extras=dict(lr=1e-2, momentum=0.9, weight_decay=0.01),
)
globals().update(shared(SUITE))


def test_torch_state_dict_loads_into_sgd8bit():
    """torch's fp32 momentum buffers load as their codes (quant.quantize_blockwise, signed map),
    past the first step (``step`` 1: the next step blends)."""
    kw = dict(lr=1e-2, momentum=0.9)
    base = make_params(torch.float32)
    topt = torch.optim.SGD(param_groups(base, SUITE.group1), **kw)
    for p in (p for group in base for p in group):
        p.grad = torch.randn_like(p)
    topt.step()
    ours = clone_params(base)
    opt = fusedopt.SGD8bit(param_groups(ours, SUITE.group1), backend="reference", min_8bit_size=256, block_size=64, **kw)
    opt.load_state_dict(checkpoint(topt.state_dict()))
    for p, q in zip((p for group in ours for p in group), (q for group in base for q in group)):
        st, buf = opt.state[p], topt.state[q]["momentum_buffer"]
        assert float(st["step"]) == 1.0
        if p.numel() < 256:
            assert torch.equal(st["momentum_buffer"], buf)
            continue
        codes, absmax = quant.quantize_blockwise(buf, True, 64)
        assert torch.equal(st["momentum_buffer"], codes) and torch.equal(st["momentum_buffer_absmax"], absmax)
