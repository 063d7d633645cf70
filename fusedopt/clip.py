"""Global-norm gradient clipping, a drop-in for ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import functools
import math

import torch

from . import backends, distributed


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                    *, backend="auto") -> torch.Tensor:
    r"""Clip the gradients of ``parameters`` in place so that their global norm is at most
    ``max_norm``; return the norm before clipping.

    ``N = (sum_i ||g_i||_p^p)^(1/p)`` over every gradient (``max |g|`` for ``p = inf``),
    accumulated in fp32 (float64 for float64 gradients); an empty gradient adds nothing (torch
    raises for the inf-norm of a list that holds one; every backend here agrees on 0);
    every gradient is multiplied by
    ``min(1, max_norm / (N + 1e-6))``. The norm is computed by ``backend`` (the fused
    two-pass reduction on GPUs, torch ops on CPU) and nothing waits for the device unless
    ``error_if_nonfinite`` asks for a check.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest norm allowed (>= 0).
        norm_type: the ``p`` of the p-norm; ``inf`` (or ``"inf"``) for the max-norm.
        error_if_nonfinite: raise ``RuntimeError`` (and clip nothing) if the norm is nan/inf.
        foreach: ``None`` or ``True`` scales all gradients of a device with one multi-tensor
            operation, ``False`` one tensor at a time (same result).
        backend: which implementation computes the norm (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"reference"``). ``"auto"`` takes one that supports ``norm_type`` and the
            gradients' dtypes (the fused kernels take the 1-, 2- and inf-norms of float32,
            bfloat16 and float16 gradients; the reference any); a backend named here that
            cannot raises ``RuntimeError`` with the reason, before any gradient changes.

    Returns:
        The total norm as a 0-d tensor in the gradients' dtype, as torch returns it.

    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().sum().backward()
        >>> norm = fusedopt.clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"Invalid max_norm: {max_norm}; expected a number >= 0")
    norm_type = float(norm_type)
    if foreach not in (None, True, False):
        raise TypeError(f"Invalid foreach: {foreach!r}; expected None, True or False")
    backends.check_name(backend)
    if not grads:
        return torch.tensor(0.0)

    # One part per (device, shard groups): sharded (FSDP2 DTensor) gradients are reduced over
    # the mesh dimensions they are sharded on; everything works on local shards.
    parts: dict[tuple, tuple] = {}
    for g in grads:
        key = (g.device, distributed.shard_key(g))
        parts.setdefault(key, (distributed.shard_groups(g), []))[1].append(distributed.local(g))
    norms = []
    for (device, _), (groups, local) in sorted(parts.items(), key=lambda kv: str(kv[0])):
        n = backends.resolve(backend, device, local, "norm", norm_type=norm_type).global_norm(local, norm_type)
        if groups:
            if math.isinf(norm_type):
                distributed.all_reduce_max(n, groups)
            else:
                n = n ** norm_type
                distributed.all_reduce_sum(groups)(n)
                n = n ** (1.0 / norm_type)
        norms.append(n)
    first = grads[0].device
    if len(norms) == 1:
        total = norms[0]
    else:
        total = torch.linalg.vector_norm(torch.stack([n.to(first, torch.float64) for n in norms]), norm_type)

    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), (_, local) in parts.items():
        c = coef.to(device)
        if foreach is False:
            for g in local:
                g.mul_(c)
        else:
            torch._foreach_mul_(local, c)
    out_dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
    return total.to(out_dtype)
