"""LAMB (32-bit or 8-bit states) on the two-pass skeleton of :mod:`fusedopt.kernels.twopass`:
pass 1 the moments and the per-tensor ``||p||^2``, ``||u||^2`` partials, the finish the trust
ratio ``r = ||p|| / ||u||``, pass 2 ``p -= (lr * r) * u``."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import families
from . import table, twopass


@triton.jit
def lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2,
                   BIAS_CORRECTION: tl.constexpr):
    """``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``."""
    if BIAS_CORRECTION:
        m_hat = tl.div_rn(m, bias_correction1)
        v_hat = tl.div_rn(v, bias_correction2)
    else:
        m_hat = m
        v_hat = v
    u = tl.div_rn(m_hat, tl.sqrt_rn(v_hat) + eps)
    if weight_decay != 0.0:  # a runtime branch: 0 * inf would make a NaN
        u = u + weight_decay * p
    return u


@triton.jit
def lamb_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
              bias_correction1, bias_correction2, BIAS_CORRECTION: tl.constexpr):
    """LAMB's per-element half on fp32 values: the new moments and the update direction,
    ``(m, v, u)``; the order of operations is the reference's (``fusedopt.reference.lamb_math``).
    The other half, ``p - lr * r * u`` with ``r = ||p|| / ||u||``, needs the whole tensor."""
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    u = lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2, BIAS_CORRECTION)
    return m, v, u


# The skeleton's interface (hypers: ``hyper_values`` below; FLAGS: ``(BIAS_CORRECTION,)``).


@triton.jit
def lamb_update(p, g, m, v, t, bias_correction1, bias_correction2, hypers, FLAGS: tl.constexpr):
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay = hypers
    return lamb_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                     bias_correction1, bias_correction2, FLAGS[0])


@triton.jit
def lamb_stored_direction(p, g, m, v, t, bias_correction1, bias_correction2, hypers, FLAGS: tl.constexpr):
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay = hypers
    return lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2, FLAGS[0])


@triton.jit
def lamb_trust_ratio(p_sq, u_sq, hypers, FLAGS: tl.constexpr):
    """``r = ||p|| / ||u||``, 1 unless both norms are positive."""
    p_norm = tl.sqrt_rn(p_sq)
    u_norm = tl.sqrt_rn(u_sq)
    return tl.where((p_norm > 0) & (u_norm > 0), tl.div_rn(p_norm, tl.where(u_norm > 0, u_norm, 1.0)), 1.0)


FAMILY = twopass.Family("lamb", update=lamb_update, direction=lamb_stored_direction, finish=lamb_trust_ratio)


def hyper_values(group, device):
    """LAMB's runtime hyper-parameters in the kernels' order, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    eps = table.group_value(group["eps"], device)
    weight_decay = table.group_value(group["weight_decay"], device)
    return [lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay]


def step(batch) -> None:
    """LAMB over ``batch`` (32-bit or 8-bit states): four launches whatever the tensor count."""
    states = families.LAMB.state_names(batch.group)
    twopass.step(batch, FAMILY, states, signed=tuple(map(families.signed, states)),
                 hypers=hyper_values(batch.group, batch.params[0].device),
                 flags=(bool(batch.group["bias_correction"]),), reads_grad=False, beta_indices=(1, 3))
