"""RMSprop (alpha, centered, momentum, weight decay, maximize; torch.optim.RMSprop) with 32-bit or
block-wise 8-bit states: the math, run by the generic kernels of :mod:`fusedopt.kernels.elementwise`."""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .. import families
from . import common, table
from .elementwise import Family

RMSpropHypers = namedtuple("RMSpropHypers", ["lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"])


@triton.jit
def rmsprop_math(p, g, s, h, d, FLAGS: tl.constexpr):
    """One RMSprop step on fp32 values: ``s = (square_avg[, momentum_buffer][, grad_avg])``;
    returns ``(p, s)``. The order of operations is the reference's
    (``fusedopt.reference.rmsprop_math``)."""
    if FLAGS.maximize:
        g = -g
    if h.weight_decay != 0.0:  # a runtime branch, as torch's: 0 * inf would make a NaN
        g = g + h.weight_decay * p
    square_avg = h.alpha * s[0] + h.one_minus_alpha * g * g
    if FLAGS.centered:
        grad_avg = common.lerp(s[len(s) - 1], g, h.one_minus_alpha)
        avg = tl.sqrt_rn(square_avg - grad_avg * grad_avg) + h.eps
    else:
        avg = tl.sqrt_rn(square_avg) + h.eps
    if FLAGS.momentum_buffer:
        buf = h.momentum * s[1] + tl.div_rn(g, avg)
        p = p - h.lr * buf
        if FLAGS.centered:
            s = (square_avg, buf, grad_avg)
        else:
            s = (square_avg, buf)
    else:
        p = p - tl.div_rn(h.lr * g, avg)
        if FLAGS.centered:
            s = (square_avg, grad_avg)
        else:
            s = (square_avg,)
    return p, s


def hypers(group, device) -> RMSpropHypers:
    value = table.group_value
    alpha = value(group["alpha"], device)
    return RMSpropHypers(value(group["lr"], device), alpha, 1 - alpha, value(group["eps"], device),
                         value(group["weight_decay"], device), value(group["momentum"], device))


RMSPROP = Family(
    spec=families.RMSPROP,
    math=rmsprop_math,
    hypers=hypers,
)
