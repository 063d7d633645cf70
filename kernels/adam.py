"""Adam / AdamW (weight decay, amsgrad, maximize) with 32-bit or block-wise 8-bit states: the
math, run by the generic kernels of :mod:`fusedopt.kernels.elementwise`."""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .. import families
from . import common, table
from .elementwise import Family

#: The runtime hyper-parameters, as the math reads them (``decay = 1 - lr * weight_decay``).
AdamHypers = namedtuple("AdamHypers", ["beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                                       "weight_decay", "decay"])
#: What the kernels derive the per-step scalars from: ``lr`` and ``log(beta1)``, ``log(beta2)``.
AdamStep = namedtuple("AdamStep", ["lr", "log_beta1", "log_beta2"])
#: Per tensor and step: ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``.
AdamDerived = namedtuple("AdamDerived", ["step_size", "bias_correction2_sqrt"])


@triton.jit
def adam_math(p, g, s, h, d, FLAGS: tl.constexpr):
    """One Adam/AdamW step on fp32 values: ``s = (m, v[, v_max])`` (exp_avg, exp_avg_sq,
    max_exp_avg_sq with ``FLAGS.amsgrad``); returns ``(p, s)``. The order of operations is the
    reference's (``fusedopt.reference.adam_math``)."""
    m = s[0]
    v = s[1]
    if FLAGS.maximize:
        g = -g
    if FLAGS.decoupled_weight_decay:
        p = p * h.decay
    elif h.weight_decay != 0.0:  # a runtime branch, as torch's: 0 * inf would make a NaN
        g = g + h.weight_decay * p
    # torch updates m by lerp, m + w * (g - m) for w = 1 - beta1 < 0.5, else g - (g - m) * (1 - w):
    # NaN where m is infinite in the first form, where g is in the second
    lerp_from = tl.where(h.beta1 > 0.5, m, g)
    m = tl.where(tl.abs(lerp_from) == float("inf"), float("nan"), h.beta1 * m + h.one_minus_beta1 * g)
    v = h.beta2 * v + h.one_minus_beta2 * g * g
    if FLAGS.amsgrad:
        v_max = tl.maximum(s[2], v, propagate_nan=tl.PropagateNan.ALL)
        v_hat = v_max
        s = (m, v, v_max)
    else:
        v_hat = v
        s = (m, v)
    denom = tl.div_rn(tl.sqrt_rn(v_hat), d.bias_correction2_sqrt) + h.eps
    p = p - tl.div_rn(d.step_size * m, denom)
    return p, s


@triton.jit
def adam_derive(t, k):
    """``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` in fp64 (IEEE-rounded / and sqrt:
    div.rn.f64, sqrt.rn.f64), as the reference derives them."""
    return AdamDerived(k.lr / common.one_minus_power(k.log_beta1, t),
                       tl.sqrt(common.one_minus_power(k.log_beta2, t)))


def hypers(group, device) -> AdamHypers:
    """Adam's runtime hyper-parameters, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    weight_decay = table.group_value(group["weight_decay"], device)
    return AdamHypers(beta1, 1 - beta1, beta2, 1 - beta2, table.group_value(group["eps"], device), weight_decay,
                      1 - lr * weight_decay)


def step_hypers(group, device) -> AdamStep:
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    return AdamStep(table.group_value(group["lr"], device), table.log_of(beta1), table.log_of(beta2))


ADAM = Family(
    spec=families.ADAM,
    math=adam_math,
    hypers=hypers,
    derive=adam_derive,
    step_hypers=step_hypers,
    derived=AdamDerived,
)
