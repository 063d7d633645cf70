"""LARS (bitsandbytes' ``PytorchLARS``; 32-bit or 8-bit momentum) on the two-pass skeleton of
:mod:`fusedopt.kernels.twopass`: pass 1 the momentum buffer and the per-tensor ``||p||^2``,
``||u||^2`` partials, the finish the clip ``scale``, pass 2 ``p -= (lr * scale) * u``."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import families
from . import table, twopass


@triton.jit
def lars_decayed(p, g, weight_decay):
    """``d = g + weight_decay * p``; ``g`` where ``weight_decay == 0`` (``0 * inf`` would make a
    NaN). A select, not a branch: with a runtime branch here, and the first step's select below,
    ptxas spilled 8 bytes in the unaligned fp16 pass 1 on sm_80 (64 registers), and with both as
    branches 4 bytes in the 8-bit pass 2 (block 256, fp32) on sm_90 (128 registers); with
    selects neither spills and the 8-bit pass 2 takes 80 to 96 registers (tests/test_compile.py)."""
    return tl.where(weight_decay != 0.0, g + weight_decay * p, g)


@triton.jit
def lars_math(p, g, buf, t, momentum, one_minus_dampening, weight_decay, NESTEROV: tl.constexpr,
              MOMENTUM: tl.constexpr):
    """LARS's per-element half on fp32 values: the new momentum buffer and the update direction,
    ``(buf, u)``, in the reference's order of operations (``fusedopt.reference.lars_math``)::

        d = g + weight_decay * p
        buf = d  if t == 1  else  momentum * buf + (1 - dampening) * d      (MOMENTUM)
        u = d + momentum * buf  if NESTEROV  else  buf                     (MOMENTUM; else u = d)

    The other half, ``p - lr * scale * u`` with ``scale`` from ``||p||`` and ``||u||``, needs
    the whole tensor."""
    d = lars_decayed(p, g, weight_decay)
    if MOMENTUM:
        buf = tl.where(t == 1.0, d, momentum * buf + one_minus_dampening * d)  # torch's first step copies d
        if NESTEROV:
            u = d + momentum * buf
        else:
            u = buf
    else:
        u = d
    return buf, u


# The skeleton's interface (hypers: ``hyper_values`` below; FLAGS: ``(NESTEROV, MOMENTUM)``;
# the one state, when MOMENTUM, is the momentum buffer).


@triton.jit
def lars_update(p, g, buf, unused, t, bias_correction1, bias_correction2, hypers, FLAGS: tl.constexpr):
    lr, momentum, one_minus_dampening, weight_decay, max_unorm = hypers
    buf, u = lars_math(p, g, buf, t, momentum, one_minus_dampening, weight_decay, FLAGS[0], FLAGS[1])
    return buf, unused, u


@triton.jit
def lars_stored_direction(p, g, buf, unused, t, bias_correction1, bias_correction2, hypers, FLAGS: tl.constexpr):
    """``u`` from the new momentum buffer (``g``: read only with NESTEROV or without MOMENTUM)."""
    lr, momentum, one_minus_dampening, weight_decay, max_unorm = hypers
    NESTEROV: tl.constexpr = FLAGS[0]
    MOMENTUM: tl.constexpr = FLAGS[1]
    if MOMENTUM:
        if NESTEROV:
            u = lars_decayed(p, g, weight_decay) + momentum * buf
        else:
            u = buf
    else:
        u = lars_decayed(p, g, weight_decay)
    return u


@triton.jit
def lars_clip(p_sq, u_sq, hypers, FLAGS: tl.constexpr):
    """``scale = max_unorm * ||p|| / ||u||`` where ``max_unorm > 0`` and
    ``||u|| > max_unorm * ||p||``, else 1."""
    lr, momentum, one_minus_dampening, weight_decay, max_unorm = hypers
    p_norm = tl.sqrt_rn(p_sq)
    u_norm = tl.sqrt_rn(u_sq)
    bound = max_unorm * p_norm
    clip = (max_unorm > 0.0) & (u_norm > bound)
    return tl.where(clip, tl.div_rn(bound, tl.where(clip, u_norm, 1.0)), 1.0)


FAMILY = twopass.Family("lars", update=lars_update, direction=lars_stored_direction, finish=lars_clip)


def hyper_values(group, device):
    """LARS's runtime hyper-parameters in the kernels' order, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    momentum = table.group_value(group["momentum"], device)
    dampening = table.group_value(group["dampening"], device)
    weight_decay = table.group_value(group["weight_decay"], device)
    max_unorm = table.group_value(group["max_unorm"], device)
    return [lr, momentum, 1 - dampening, weight_decay, max_unorm]


def step(batch) -> None:
    """LARS over ``batch`` (32-bit or 8-bit momentum buffer, or none when ``momentum == 0``):
    four launches whatever the tensor count."""
    group = batch.group
    states = families.LARS.state_names(group)  # the momentum buffer, when momentum != 0
    nesterov = bool(group["nesterov"])
    has_momentum = len(states) > 0
    twopass.step(batch, FAMILY, states, signed=tuple(map(families.signed, states)),
                 hypers=hyper_values(group, batch.params[0].device), flags=(nesterov, has_momentum),
                 reads_grad=nesterov or not has_momentum)
