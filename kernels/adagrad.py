"""Adagrad (lr decay, weight decay, maximize; torch.optim.Adagrad) with a 32-bit or block-wise
8-bit sum of squares: the math, run by the generic kernels of :mod:`fusedopt.kernels.elementwise`."""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .. import families
from . import table
from .elementwise import Family

AdagradHypers = namedtuple("AdagradHypers", ["weight_decay", "eps"])
AdagradStep = namedtuple("AdagradStep", ["lr", "lr_decay"])
#: Per tensor and step: ``clr = lr / (1 + (t - 1) * lr_decay)``.
AdagradDerived = namedtuple("AdagradDerived", ["clr"])


@triton.jit
def adagrad_math(p, g, s, h, d, FLAGS: tl.constexpr):
    """One Adagrad step on fp32 values: ``s = (sum,)``; returns ``(p, s)``. The order of
    operations is the reference's (``fusedopt.reference.adagrad_math``)."""
    if FLAGS.maximize:
        g = -g
    if h.weight_decay != 0.0:  # a runtime branch, as torch's: 0 * inf would make a NaN
        g = g + h.weight_decay * p
    state_sum = s[0] + g * g
    std = tl.sqrt_rn(state_sum) + h.eps
    p = p - tl.div_rn(d.clr * g, std)  # torch's addcdiv
    return p, (state_sum,)


@triton.jit
def adagrad_derive(t, k):
    """``lr / (1 + (t - 1) * lr_decay)`` in fp64 (IEEE-rounded division)."""
    return AdagradDerived(k.lr / (1.0 + (t.to(tl.float64) - 1.0) * k.lr_decay))


def hypers(group, device) -> AdagradHypers:
    value = table.group_value
    return AdagradHypers(value(group["weight_decay"], device), value(group["eps"], device))


ADAGRAD = Family(
    spec=families.ADAGRAD,
    math=adagrad_math,
    hypers=hypers,
    derive=adagrad_derive,
    step_hypers=lambda group, device: AdagradStep(table.group_value(group["lr"], device),
                                                  table.group_value(group["lr_decay"], device)),
    derived=AdagradDerived,
)
