"""The reference backend: the specification every other backend is tested against.

Torch ops only, on any device. Math in fp32 (float64 for float64 params), states in fp32
(float64 for float64 params) or 8-bit block-wise codes, params written back in their own dtype
(round to nearest). Each family is one pure function of fp32 tensors named as in DESIGN.md;
8-bit states and the skip on non-finite gradients are handled around it, never inside it.

A backend exposes ``adam(batch)``, ``lamb(batch)``, ``lion(batch)`` and
``global_norm(tensors, norm_type)``; see :class:`fusedopt.step.Batch` for what a batch
holds. Nothing here calls ``.item()``: the skip flag and the gradient multiplier stay on the
device, so a skipped step is decided without a host sync.
"""

from __future__ import annotations

import math

import torch

from . import families, layout, quant
from .families import log_beta, one_minus_power  # noqa: F401  (the Triton launchers read log_beta)
from .scalars import GRAD_MULT, SKIP

# --------------------------------------------------------------------------------------------
# The math, once per family. Inputs are tensors in the compute dtype; returns new tensors.
# ``t`` is the step count after the increment (a float64 tensor, so it may live on the device).
# --------------------------------------------------------------------------------------------


def _add_decay(x, p, weight_decay):
    """``x + weight_decay * p``, or ``x`` where ``weight_decay == 0``: torch's Adam skips the
    term (``if weight_decay != 0``), so that ``0 * inf`` never makes a NaN of an infinite
    param's gradient. A tensor weight decay is decided on the device (no host sync)."""
    if isinstance(weight_decay, torch.Tensor):
        return torch.where(weight_decay != 0, x + weight_decay * p, x)
    return x + weight_decay * p if weight_decay != 0 else x


def adam_math(p, g, m, v, v_max, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              step_size, bias_correction2_sqrt):
    """Adam / AdamW (torch semantics). Returns ``(p, m, v, v_max)``; ``v_max`` is None unless
    ``amsgrad``. ``step_size = lr / (1 - beta1^t)`` and ``bias_correction2_sqrt =
    sqrt(1 - beta2^t)`` (``families.ADAM.derive``: in float64, each rounded once, as torch's
    for-loop takes them on the host)."""
    if maximize:
        g = -g
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = _add_decay(g, p, weight_decay)
    # torch updates m by lerp, m + w * (g - m) for w = 1 - beta1 < 0.5, else g - (g - m) * (1 - w):
    # NaN where m is infinite in the first form, where g is in the second
    lerp_from = torch.where(beta1 > 0.5, m, g) if isinstance(beta1, torch.Tensor) else (m if beta1 > 0.5 else g)
    m = torch.where(torch.isinf(lerp_from), torch.nan, beta1 * m + (1 - beta1) * g)
    v = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        v_max = torch.maximum(v_max, v)
    v_hat = v_max if amsgrad else v
    denom = torch.sqrt(v_hat) / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    return p, m, v, v_max


def lamb_math(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, bias_correction, bias_correction1,
              bias_correction2, all_reduce=None):
    """LAMB (You et al., 2020), one tensor. Returns ``(p, m, v)``. ``bias_correction1``,
    ``bias_correction2``: ``1 - beta^t`` (``families.LAMB.derive``). ``all_reduce`` sums the
    squared norms over the shards when ``p`` is one shard of a larger tensor."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if bias_correction:
        m_hat = m / bias_correction1
        v_hat = v / bias_correction2
    else:
        m_hat, v_hat = m, v
    u = _add_decay(m_hat / (torch.sqrt(v_hat) + eps), p, weight_decay)
    p_norm, u_norm = _norms(p, u, all_reduce)
    r = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
    p = p - lr * r * u
    return p, m, v


def _norms(p, u, all_reduce=None):
    """``(||p||, ||u||)`` of one tensor; of the whole param when ``p`` is one shard of it
    (``all_reduce`` sums the squares over the shards)."""
    if all_reduce is None:
        return torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
    squares = torch.stack([(p * p).sum(), (u * u).sum()])
    all_reduce(squares)
    return torch.sqrt(squares)


def lion_math(p, g, m, *, lr, beta1, beta2, weight_decay):
    """Lion (Chen et al., 2023). Returns ``(p, m)``."""
    p = p * (1 - lr * weight_decay)
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    return p, m


def _momentum(buf, d, *, first, momentum, dampening, nesterov):
    """The heavy-ball buffer of torch's SGD (and bitsandbytes' LARS) and the direction it gives:
    ``(buf, u)``. ``buf`` is a copy of ``d`` at the first step (``first``), else
    ``momentum * buf + (1 - dampening) * d``; ``u = d + momentum * buf`` with Nesterov, else
    ``buf``. Without a buffer (``momentum == 0``), ``u = d``."""
    if buf is None:
        return None, d
    buf = torch.where(first, d, momentum * buf + (1 - dampening) * d)
    return buf, (d + momentum * buf if nesterov else buf)


def sgd_math(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    """SGD with momentum (torch.optim.SGD). Returns ``(p, buf)``; ``buf`` is None without
    momentum. ``first``: whether this is the tensor's first step (``families.SGD.derive``)."""
    if maximize:
        g = -g
    g = _add_decay(g, p, weight_decay)
    buf, g = _momentum(buf, g, first=first, momentum=momentum, dampening=dampening, nesterov=nesterov)
    p = p - lr * g
    return p, buf


def adagrad_math(p, g, state_sum, *, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize,
                 clr):
    """Adagrad (torch.optim.Adagrad). Returns ``(p, sum)``. ``clr = lr / (1 + (t - 1) *
    lr_decay)`` (``families.ADAGRAD.derive``); ``(clr * g) / std`` is torch's ``addcdiv``."""
    if maximize:
        g = -g
    g = _add_decay(g, p, weight_decay)
    state_sum = state_sum + g * g
    std = torch.sqrt(state_sum) + eps
    p = p - clr * g / std
    return p, state_sum


def rmsprop_math(p, g, square_avg, buf, grad_avg, *, lr, alpha, eps, weight_decay, momentum, centered,
                 maximize):
    """RMSprop (torch.optim.RMSprop). Returns ``(p, square_avg, buf, grad_avg)``; ``buf`` is
    None without momentum, ``grad_avg`` None unless ``centered``. The order of operations is
    torch's (``addcmul``: ``(value * a) * b``; ``lerp`` for ``grad_avg``)."""
    if maximize:
        g = -g
    g = _add_decay(g, p, weight_decay)
    square_avg = alpha * square_avg + (1 - alpha) * g * g
    if centered:
        grad_avg = torch.lerp(grad_avg, g, 1 - alpha)
        avg = torch.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = torch.sqrt(square_avg) + eps
    if buf is not None:
        buf = momentum * buf + g / avg
        p = p - lr * buf
    else:
        p = p - lr * g / avg
    return p, square_avg, buf, grad_avg


def lars_math(p, g, buf, *, lr, momentum, dampening, weight_decay, max_unorm, nesterov, first, all_reduce=None):
    """LARS as bitsandbytes' ``PytorchLARS``, one tensor. Returns ``(p, buf)``. The update
    ``u`` (after momentum) is scaled down to ``max_unorm * ||p||`` when its norm is larger
    (``max_unorm > 0``); momentum 0 is plain SGD with that clip."""
    d = _add_decay(g, p, weight_decay)
    buf, u = _momentum(buf, d, first=first, momentum=momentum, dampening=dampening, nesterov=nesterov)
    if isinstance(max_unorm, torch.Tensor) or max_unorm > 0:  # a tensor is decided on the device
        p_norm, u_norm = _norms(p, u, all_reduce)
        bound = max_unorm * p_norm
        scale = torch.where((max_unorm > 0) & (u_norm > bound), bound / u_norm, torch.ones_like(u_norm))
        p = p - (lr * scale) * u
    else:
        p = p - lr * u
    return p, buf


# --------------------------------------------------------------------------------------------
# Loading and committing one tensor's state.
# --------------------------------------------------------------------------------------------


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _in_param_layout(batch, i: int, t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as param ``i`` (see :mod:`fusedopt.layout`): 8-bit blocks run over the
    param's memory order, whatever the layout of the state tensor holding the codes."""
    order = layout.strides(batch.params[i])
    return t if layout.dense(t) and layout.same(t, order) else layout.to_layout(t, order)


def _load(batch, name: str, i: int, dtype: torch.dtype) -> torch.Tensor:
    s = batch.state[name][i]
    if batch.quantized:
        return quant.dequantize_blockwise(
            _in_param_layout(batch, i, s), batch.state[name + "_absmax"][i], families.signed(name),
            batch.block_size,
        ).to(dtype)
    return s.to(dtype)


def _commit(batch, name: str, i: int, new: torch.Tensor, keep: torch.Tensor) -> None:
    """Write ``new`` into state ``name`` of tensor ``i`` where ``keep`` (a device bool)."""
    dst = batch.state[name][i]
    if batch.quantized:
        absmax_dst = batch.state[name + "_absmax"][i]
        new = _in_param_layout(batch, i, new.to(torch.float32))
        codes, absmax = quant.quantize_blockwise(new, families.signed(name), batch.block_size)
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
# Storing a param: round to nearest, or stochastically (bf16, ``stochastic_rounding=True``).
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in two 16-bit halves (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (``lowbias32``) on int64 tensors holding values in
    [0, 2**32); every backend uses the same one, so stochastic rounding draws the same bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_noise(seed: int, t: torch.Tensor, salt: int, numel: int, offset: int = 0) -> torch.Tensor:
    """The 16 random bits of each element of a tensor at step ``t`` (a device tensor):
    ``mix32(key ^ mix32(low32(i) ^ mix32(high32(i))))`` with
    ``key = mix32(mix32(mix32(seed ^ 0x9E3779B9) ^ t) ^ salt)``, where ``salt`` is the param's
    position in its group and ``i = offset + j`` the element's index in the full param
    (``offset``: where a shard starts in it, see ``Batch.offsets``; ``j``: the element's
    position in the memory order of the tensor's layout, see :mod:`fusedopt.layout`: the
    row-major index for a contiguous tensor). Returned in that memory order (1-d)."""
    device = t.device
    key = mix32(torch.full((), (seed ^ 0x9E3779B9) & _M32, dtype=torch.int64, device=device))
    key = mix32(key ^ t.to(torch.int64))
    key = mix32(key ^ (salt & _M32))
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return mix32(key ^ mix32((index & _M32) ^ mix32(index >> 32))) & 0xFFFF


def round_stochastic_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` to bf16, rounded up (in magnitude) with probability equal to the discarded
    fraction: add 16 random bits below the bf16 mantissa, then truncate. NaN stays NaN.
    ``noise``: one value per element, shaped as ``x`` (or 1-d in ``x``'s row-major order)."""
    bits = x.view(torch.int32).to(torch.int64) & _M32
    rounded = ((bits + noise.view(x.shape)) & _M32) >> 16
    rounded = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded.view(torch.bfloat16))


def stochastic(batch) -> bool:
    """Whether this batch's params are stored with stochastic rounding (bf16 params of a
    group with ``stochastic_rounding=True``)."""
    return bool(batch.group.get("stochastic_rounding", False)) and batch.params[0].dtype == torch.bfloat16


def _store(batch, i: int, new: torch.Tensor, keep: torch.Tensor, t: torch.Tensor | None, salts) -> None:
    """Write the updated fp32 (or float64) param ``new`` into param ``i`` where ``keep``."""
    param = batch.params[i]
    if salts is not None:
        offset = batch.offsets[i] if batch.offsets else 0
        noise = rounding_noise(int(batch.group.get("seed", 0)), t, salts[i], param.numel(), offset)
        noise = layout.unflat(noise, param.shape, layout.strides(param))  # drawn in memory order
        stored = round_stochastic_bf16(new.float(), noise)
    else:
        stored = new.to(param.dtype)
    param.copy_(torch.where(keep, stored, param))


def _salts(batch):
    """Each param's position in its group (salts the rounding noise), when rounding
    stochastically; else None."""
    return batch.positions if stochastic(batch) else None


# --------------------------------------------------------------------------------------------
# The backend entry points.
# --------------------------------------------------------------------------------------------


def _run(batch, family: families.Family, update) -> None:
    """One step of ``family`` over ``batch``: per tensor, its states loaded in fp32 (or float64),
    ``update(p, g, states, h)`` with ``h`` the group's hyper-parameters by name (in the compute
    dtype) and the family's per-step scalars (:meth:`Family.derive`), returning the new param and
    the new states by name; then the param stored and the states committed, unless the step is
    skipped."""
    layout.settle_states(batch, quant.relayout)
    group = batch.group
    names = family.state_names(group)
    grad_mult, keep = _scalars(batch)
    salts = _salts(batch)
    for i, (param, grad, step) in enumerate(zip(batch.params, batch.grads, batch.steps)):
        dt = compute_dtype(param)
        t = step.to(torch.float64) + 1
        h = family.values(group, lambda v: _hyper(v, dt))
        h.update(family.derive(h, t, dt))
        states = {name: _load(batch, name, i, dt) for name in names}
        p, new = update(param.to(dt), grad.to(dt) * grad_mult.to(dt), states, h, batch)
        _store(batch, i, p, keep, t, salts)
        for name in names:
            _commit(batch, name, i, new[name], keep)
        _advance(step, keep)


def _flags(group, *names) -> dict:
    return {name: group[name] for name in names}


def adam(batch) -> None:
    def update(p, g, s, h, batch):
        group = batch.group
        p, m, v, v_max = adam_math(p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"), **h,
                                   amsgrad=group["amsgrad"], maximize=group["maximize"],
                                   decoupled=group["decoupled_weight_decay"])
        return p, dict(exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=v_max)

    _run(batch, families.ADAM, update)


def lamb(batch) -> None:
    def update(p, g, s, h, batch):
        p, m, v = lamb_math(p, g, s["exp_avg"], s["exp_avg_sq"], **h, bias_correction=batch.group["bias_correction"],
                            all_reduce=batch.all_reduce)
        return p, dict(exp_avg=m, exp_avg_sq=v)

    _run(batch, families.LAMB, update)


def lion(batch) -> None:
    def update(p, g, s, h, batch):
        p, m = lion_math(p, g, s["exp_avg"], **h)
        return p, dict(exp_avg=m)

    _run(batch, families.LION, update)


def sgd(batch) -> None:
    def update(p, g, s, h, batch):
        p, buf = sgd_math(p, g, s.get("momentum_buffer"), **h, **_flags(batch.group, "nesterov", "maximize"))
        return p, dict(momentum_buffer=buf)

    _run(batch, families.SGD, update)


def adagrad(batch) -> None:
    def update(p, g, s, h, batch):
        p, state_sum = adagrad_math(p, g, s["sum"], **h, maximize=batch.group["maximize"])
        return p, dict(sum=state_sum)

    _run(batch, families.ADAGRAD, update)


def rmsprop(batch) -> None:
    def update(p, g, s, h, batch):
        p, square_avg, buf, grad_avg = rmsprop_math(p, g, s["square_avg"], s.get("momentum_buffer"),
                                                    s.get("grad_avg"), **h,
                                                    **_flags(batch.group, "centered", "maximize"))
        return p, dict(square_avg=square_avg, momentum_buffer=buf, grad_avg=grad_avg)

    _run(batch, families.RMSPROP, update)


def lars(batch) -> None:
    def update(p, g, s, h, batch):
        p, buf = lars_math(p, g, s.get("momentum_buffer"), **h, nesterov=batch.group["nesterov"],
                           all_reduce=batch.all_reduce)
        return p, dict(momentum_buffer=buf)

    _run(batch, families.LARS, update)


#: The step of each family (``fusedopt.backends``).
STEPS = {"adam": adam, "lamb": lamb, "lion": lion, "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "lars": lars}


def global_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` together, as a 0-d tensor on their device,
    accumulated in fp32 (float64 if any tensor is float64). ``inf`` is ``max |x|``."""
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # An empty tensor adds nothing to any norm (torch's inf-norm refuses one, having no
    # identity for max; for |x| >= 0 the identity is 0).
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return torch.zeros((), dtype=acc, device=tensors[0].device)
    per_tensor = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in nonempty])
    return torch.linalg.vector_norm(per_tensor, norm_type)


def available(device: torch.device) -> str | None:
    """None when this backend runs on ``device``, else the reason it cannot."""
    return None


NAME = "reference"
DESCRIPTION = "torch ops, any device; the specification (slow: several launches per tensor)"
