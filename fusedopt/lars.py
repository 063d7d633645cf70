"""LARS: layer-wise adaptive rate scaling (You et al., "Large Batch Training of Convolutional
Networks", 2017), as bitsandbytes' ``PytorchLARS``: SGD with momentum whose update is clipped,
per tensor, to ``max_unorm`` times the norm of the param. 32-bit or block-wise 8-bit buffer."""

from __future__ import annotations

from . import families
from .optimizer import (DOC_8BIT, DOC_8BIT_ARGS, DOC_EXTRAS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer,
                        torch_flags)

_DOC = r"""
    Per parameter tensor, with ``t`` its step count after this step and ``g`` its gradient
    times the step's multiplier (unscale and clip)::

        d = g + weight_decay * p
        buf = d  at the first step,  else  momentum * buf + (1 - dampening) * d   (momentum != 0)
        u = d + momentum * buf  if nesterov,  else  buf          (u = d when momentum == 0)
        s = max_unorm * ||p|| / ||u||  if max_unorm > 0 and ||u|| > max_unorm * ||p||,  else 1
        p = p - lr * s * u

    The norms are over the whole tensor: a step is two passes (the buffer and the norms, then
    the update), one launch each whatever the tensor count.

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        momentum: momentum factor (0: no buffer).
        dampening: dampening of the momentum's new gradient.
        weight_decay: L2 penalty, added to the gradient.
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        max_unorm: the largest update norm relative to the param's norm (0: no clip).
""" + DOC_TORCH_FLAGS + DOC_EXTRAS + DOC_STORAGE


class _LARSFamily(FusedOptimizer):
    _spec = families.LARS

    def __init__(self, params, lr, momentum, dampening, weight_decay, nesterov, *, max_unorm, foreach, capturable,
                 differentiable, fused, max_grad_norm, backend, **extra):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        max_unorm=max_unorm, **torch_flags(foreach, capturable, differentiable, fused), **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class LARS(_LARSFamily):
    __doc__ = ("LARS, fused: the buffer and per-tensor norms in one pass, the clipped update in a second.\n"
               + _DOC + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.LARS(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
""")

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 max_unorm=0.02, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, max_unorm=max_unorm, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class LARS8bit(_LARSFamily):
    __doc__ = ("LARS with a block-wise 8-bit momentum buffer.\n" + DOC_8BIT + _DOC + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.LARS8bit(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["momentum_buffer"].dtype
        torch.uint8
""")
    _quantized = True

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 max_unorm=0.02, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", block_size=256, min_8bit_size=4096, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, max_unorm=max_unorm, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size)
