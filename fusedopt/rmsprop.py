"""RMSprop (Hinton, 2012; as ``torch.optim.RMSprop``, centered and with momentum), 32-bit or
block-wise 8-bit states."""

from __future__ import annotations

from . import families
from .optimizer import (DOC_8BIT, DOC_8BIT_ARGS, DOC_EXTRAS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer,
                        torch_flags)

_DOC = r"""
    Per parameter tensor, with ``g`` its gradient times the step's multiplier (unscale and
    clip)::

        g = -g                                              if maximize
        g = g + weight_decay * p
        square_avg = alpha * square_avg + (1 - alpha) * g^2
        grad_avg = lerp(grad_avg, g, 1 - alpha)             if centered
        avg = sqrt(square_avg - grad_avg^2) + eps           if centered,  else  sqrt(square_avg) + eps
        buf = momentum * buf + g / avg;  p = p - lr * buf   if momentum > 0
        p = p - lr * g / avg                                otherwise

    States: ``"square_avg"``, ``"momentum_buffer"`` (momentum > 0), ``"grad_avg"`` (centered).

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        alpha: smoothing constant of the running averages.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty.
        momentum: momentum factor (0: none, no buffer).
        centered: normalize by an estimate of the gradient's variance instead of its second moment.
        maximize: maximize the objective instead of minimizing it.
""" + DOC_TORCH_FLAGS + DOC_EXTRAS + DOC_STORAGE


class _RMSpropFamily(FusedOptimizer):
    _spec = families.RMSPROP

    def __init__(self, params, lr, alpha, eps, weight_decay, momentum, centered, *, maximize, foreach, capturable,
                 differentiable, fused, max_grad_norm, backend, **extra):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        maximize=maximize, **torch_flags(foreach, capturable, differentiable, fused), **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class RMSprop(_RMSpropFamily):
    __doc__ = ("RMSprop, fused: one multi-tensor pass per param group.\n"
               "    A drop-in for ``torch.optim.RMSprop`` (same arguments, defaults and state keys).\n" + _DOC + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
""")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class RMSprop8bit(_RMSpropFamily):
    __doc__ = ("RMSprop with block-wise 8-bit states.\n" + DOC_8BIT + _DOC + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.RMSprop8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["square_avg"].dtype
        torch.uint8
""")
    _quantized = True

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", block_size=256, min_8bit_size=4096, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size)
