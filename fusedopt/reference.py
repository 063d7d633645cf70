"""The reference backend: the specification every other backend is tested against.

Torch ops only, on any device. Math in fp32 (float64 for float64 params), states in fp32
(float64 for float64 params) or 8-bit block-wise codes, params written back in their own dtype
(round to nearest). Each family is one pure function of fp32 tensors named as in DESIGN.md;
8-bit states and the skip on non-finite gradients are handled around it, never inside it.

A backend exposes ``adam(batch)``, ``lamb(batch)``, ``lion(batch)`` and
``global_norm(tensors, norm_type)``; see :class:`fusedopt.optimizer.Batch` for what a batch
holds. Nothing here calls ``.item()``: the skip flag and the gradient multiplier stay on the
device, so a skipped step is decided without a host sync.
"""

from __future__ import annotations

import torch

from . import quant
from .scalars import GRAD_MULT, SKIP

# --------------------------------------------------------------------------------------------
# The math, once per family. Inputs are tensors in the compute dtype; returns new tensors.
# ``t`` is the step count after the increment (a tensor, so it may live on the device).
# --------------------------------------------------------------------------------------------


def adam_math(p, g, m, v, v_max, *, t, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
              decoupled):
    """Adam / AdamW (torch semantics). Returns ``(p, m, v, v_max)``; ``v_max`` is None unless
    ``amsgrad``."""
    if maximize:
        g = -g
    if decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        v_max = torch.maximum(v_max, v)
    v_hat = v_max if amsgrad else v
    bias_correction1 = 1 - beta1 ** t
    bias_correction2_sqrt = torch.sqrt(1 - beta2 ** t)
    denom = torch.sqrt(v_hat) / bias_correction2_sqrt + eps
    p = p - (lr / bias_correction1) * m / denom
    return p, m, v, v_max


def lamb_math(p, g, m, v, *, t, lr, beta1, beta2, eps, weight_decay, bias_correction, all_reduce=None):
    """LAMB (You et al., 2020), one tensor. Returns ``(p, m, v)``. ``all_reduce`` sums the
    squared norms over the shards when ``p`` is one shard of a larger tensor."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if bias_correction:
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
    else:
        m_hat, v_hat = m, v
    u = m_hat / (torch.sqrt(v_hat) + eps) + weight_decay * p
    if all_reduce is None:
        p_norm = torch.linalg.vector_norm(p)
        u_norm = torch.linalg.vector_norm(u)
    else:
        squares = torch.stack([(p * p).sum(), (u * u).sum()])
        all_reduce(squares)
        p_norm, u_norm = torch.sqrt(squares)
    r = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
    p = p - lr * r * u
    return p, m, v


def lion_math(p, g, m, *, lr, beta1, beta2, weight_decay):
    """Lion (Chen et al., 2023). Returns ``(p, m)``."""
    p = p * (1 - lr * weight_decay)
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    return p, m


# --------------------------------------------------------------------------------------------
# Loading and committing one tensor's state.
# --------------------------------------------------------------------------------------------


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _load(batch, name: str, i: int, dtype: torch.dtype) -> torch.Tensor:
    s = batch.state[name][i]
    if batch.quantized:
        return quant.dequantize_blockwise(
            s, batch.state[name + "_absmax"][i], quant.signed_state(name), batch.block_size
        ).to(dtype)
    return s.to(dtype)


def _commit(batch, name: str, i: int, new: torch.Tensor, keep: torch.Tensor) -> None:
    """Write ``new`` into state ``name`` of tensor ``i`` where ``keep`` (a device bool)."""
    dst = batch.state[name][i]
    if batch.quantized:
        absmax_dst = batch.state[name + "_absmax"][i]
        codes, absmax = quant.quantize_blockwise(new, quant.signed_state(name), batch.block_size)
        dst.copy_(torch.where(keep, codes, dst))
        absmax_dst.copy_(torch.where(keep, absmax, absmax_dst))
    else:
        dst.copy_(torch.where(keep, new.to(dst.dtype), dst))


def _scalars(batch):
    grad_mult = batch.scalars[GRAD_MULT]
    keep = batch.scalars[SKIP] == 0
    return grad_mult, keep


def _hyper(value, dtype):
    """A group hyper-parameter in the compute dtype: Python numbers stay Python numbers
    (exactly what torch.optim computes with), tensors are cast."""
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def _advance(step: torch.Tensor, keep: torch.Tensor) -> None:
    step.add_(keep.to(step.dtype))


# --------------------------------------------------------------------------------------------
# The backend entry points.
# --------------------------------------------------------------------------------------------


def adam(batch) -> None:
    group = batch.group
    amsgrad = group["amsgrad"]
    grad_mult, keep = _scalars(batch)
    for i, (param, grad, step) in enumerate(zip(batch.params, batch.grads, batch.steps)):
        dt = compute_dtype(param)
        beta1, beta2 = (_hyper(b, dt) for b in group["betas"])
        t = (step.to(torch.float64) + 1).to(dt)
        p, m, v, v_max = adam_math(
            param.to(dt),
            grad.to(dt) * grad_mult.to(dt),
            _load(batch, "exp_avg", i, dt),
            _load(batch, "exp_avg_sq", i, dt),
            _load(batch, "max_exp_avg_sq", i, dt) if amsgrad else None,
            t=t,
            lr=_hyper(group["lr"], dt),
            beta1=beta1,
            beta2=beta2,
            eps=_hyper(group["eps"], dt),
            weight_decay=_hyper(group["weight_decay"], dt),
            amsgrad=amsgrad,
            maximize=group["maximize"],
            decoupled=group["decoupled_weight_decay"],
        )
        param.copy_(torch.where(keep, p.to(param.dtype), param))
        _commit(batch, "exp_avg", i, m, keep)
        _commit(batch, "exp_avg_sq", i, v, keep)
        if amsgrad:
            _commit(batch, "max_exp_avg_sq", i, v_max, keep)
        _advance(step, keep)


def lamb(batch) -> None:
    group = batch.group
    grad_mult, keep = _scalars(batch)
    for i, (param, grad, step) in enumerate(zip(batch.params, batch.grads, batch.steps)):
        dt = compute_dtype(param)
        beta1, beta2 = (_hyper(b, dt) for b in group["betas"])
        t = (step.to(torch.float64) + 1).to(dt)
        p, m, v = lamb_math(
            param.to(dt),
            grad.to(dt) * grad_mult.to(dt),
            _load(batch, "exp_avg", i, dt),
            _load(batch, "exp_avg_sq", i, dt),
            t=t,
            lr=_hyper(group["lr"], dt),
            beta1=beta1,
            beta2=beta2,
            eps=_hyper(group["eps"], dt),
            weight_decay=_hyper(group["weight_decay"], dt),
            bias_correction=group["bias_correction"],
            all_reduce=batch.all_reduce,
        )
        param.copy_(torch.where(keep, p.to(param.dtype), param))
        _commit(batch, "exp_avg", i, m, keep)
        _commit(batch, "exp_avg_sq", i, v, keep)
        _advance(step, keep)


def lion(batch) -> None:
    group = batch.group
    grad_mult, keep = _scalars(batch)
    for i, (param, grad, step) in enumerate(zip(batch.params, batch.grads, batch.steps)):
        dt = compute_dtype(param)
        beta1, beta2 = (_hyper(b, dt) for b in group["betas"])
        p, m = lion_math(
            param.to(dt),
            grad.to(dt) * grad_mult.to(dt),
            _load(batch, "exp_avg", i, dt),
            lr=_hyper(group["lr"], dt),
            beta1=beta1,
            beta2=beta2,
            weight_decay=_hyper(group["weight_decay"], dt),
        )
        param.copy_(torch.where(keep, p.to(param.dtype), param))
        _commit(batch, "exp_avg", i, m, keep)
        _advance(step, keep)


def global_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` together, as a 0-d tensor on their device,
    accumulated in fp32 (float64 if any tensor is float64). ``inf`` is ``max |x|``."""
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    per_tensor = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors])
    return torch.linalg.vector_norm(per_tensor, norm_type)


def available(device: torch.device) -> str | None:
    """None when this backend runs on ``device``, else the reason it cannot."""
    return None


NAME = "reference"
DESCRIPTION = "torch ops, any device; the specification (slow: several launches per tensor)"
