"""SGD (momentum, dampening, nesterov, weight decay, maximize; torch.optim.SGD) with a 32-bit or
block-wise 8-bit momentum buffer: the math, run by the generic kernels of
:mod:`fusedopt.kernels.elementwise`."""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .. import families
from . import table
from .elementwise import Family

SGDHypers = namedtuple("SGDHypers", ["lr", "momentum", "one_minus_dampening", "weight_decay"])
SGDStep = namedtuple("SGDStep", [])
#: ``first``: 1 on a tensor's first step (torch's buffer is then a copy of the grad), else 0.
SGDDerived = namedtuple("SGDDerived", ["first"])


@triton.jit
def sgd_math(p, g, s, h, d, FLAGS: tl.constexpr):
    """One SGD step on fp32 values: ``s = (buf,)`` where the group keeps a momentum_buffer
    (momentum != 0), else ``()``; returns ``(p, s)``. The order of operations is the reference's
    (``fusedopt.reference.sgd_math``)."""
    if FLAGS.maximize:
        g = -g
    if h.weight_decay != 0.0:  # a runtime branch, as torch's: 0 * inf would make a NaN
        g = g + h.weight_decay * p
    if FLAGS.momentum_buffer:
        buf = tl.where(d.first != 0.0, g, h.momentum * s[0] + h.one_minus_dampening * g)
        if FLAGS.nesterov:
            g = g + h.momentum * buf
        else:
            g = buf
        s = (buf,)
    p = p - h.lr * g
    return p, s


@triton.jit
def sgd_derive(t, k):
    """Whether this is the tensor's first step (``t == 1``)."""
    return SGDDerived(tl.where(t == 1.0, 1.0, 0.0))


def hypers(group, device) -> SGDHypers:
    """SGD's runtime hyper-parameters, derived as the reference does."""
    value = table.group_value
    return SGDHypers(value(group["lr"], device), value(group["momentum"], device),
                     1 - value(group["dampening"], device), value(group["weight_decay"], device))


SGD = Family(
    spec=families.SGD,
    math=sgd_math,
    hypers=hypers,
    derive=sgd_derive,
    step_hypers=lambda group, device: SGDStep(),
    derived=SGDDerived,
)
