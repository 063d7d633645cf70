"""Global-norm gradient clipping, a drop-in for ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import functools

import torch

from . import backends


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                    *, backend="auto") -> torch.Tensor:
    r"""Clip the gradients of ``parameters`` in place so that their global norm is at most
    ``max_norm``; return the norm before clipping.

    ``N = (sum_i ||g_i||_p^p)^(1/p)`` over every gradient (``max |g|`` for ``p = inf``),
    accumulated in fp32 (float64 for float64 gradients); every gradient is multiplied by
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
            ``"reference"``).

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

    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    norms = [backends.resolve(backend, d, gs).global_norm(gs, norm_type) for d, gs in by_device.items()]
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
    for device, gs in by_device.items():
        c = coef.to(device)
        if foreach is False:
            for g in gs:
                g.mul_(c)
        else:
            torch._foreach_mul_(gs, c)
    out_dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
    return total.to(out_dtype)
