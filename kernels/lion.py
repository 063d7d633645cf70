"""Lion with a 32-bit or block-wise 8-bit state: the math, run by the generic kernels of
:mod:`fusedopt.kernels.elementwise` (no per-step scalars: its programs only advance the steps)."""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .. import families
from . import table
from .elementwise import Family

#: The runtime hyper-parameters, as the math reads them (``decay = 1 - lr * weight_decay``).
LionHypers = namedtuple("LionHypers", ["lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay"])


@triton.jit
def lion_math(p, g, s, h, d, FLAGS: tl.constexpr):
    """One Lion step on fp32 values: ``s = (m,)`` (exp_avg); returns ``(p, s)``. The order of
    operations is the reference's (``fusedopt.reference.lion_math``)."""
    m = s[0]
    p = p * h.decay
    c = h.beta1 * m + h.one_minus_beta1 * g
    sign = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)  # torch.sign: 0 for 0 and for NaN
    p = p - h.lr * sign
    m = h.beta2 * m + h.one_minus_beta2 * g
    return p, (m,)


def hypers(group, device) -> LionHypers:
    """Lion's runtime hyper-parameters, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    weight_decay = table.group_value(group["weight_decay"], device)
    return LionHypers(lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay)


LION = Family(
    spec=families.LION,
    math=lion_math,
    hypers=hypers,
)
