"""SGD with momentum and Nesterov momentum (as ``torch.optim.SGD``), 32-bit or block-wise 8-bit
momentum buffer."""

from __future__ import annotations

from . import families
from .optimizer import (DOC_8BIT, DOC_8BIT_ARGS, DOC_EXTRAS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer,
                        torch_flags)

_DOC = r"""
    Per parameter tensor, with ``t`` its step count after this step and ``g`` its gradient
    times the step's multiplier (``1/grad_scale`` under GradScaler, times the clip coefficient
    when ``max_grad_norm`` is set)::

        g = -g                                          if maximize
        g = g + weight_decay * p
        buf = g                                         at the first step (t = 1)
        buf = momentum * buf + (1 - dampening) * g      after it
        g = g + momentum * buf    if nesterov,   else   g = buf      (when momentum != 0)
        p = p - lr * g

    The momentum buffer (state ``"momentum_buffer"``) exists only when ``momentum != 0``.

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        momentum: momentum factor (0: plain SGD, no state).
        dampening: dampening of the momentum's new gradient.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum (Sutskever et al., 2013); needs ``momentum > 0`` and
            ``dampening == 0``.
        maximize: maximize the objective instead of minimizing it.
""" + DOC_TORCH_FLAGS + DOC_EXTRAS + DOC_STORAGE


class _SGDFamily(FusedOptimizer):
    _spec = families.SGD

    def __init__(self, params, lr, momentum, dampening, weight_decay, nesterov, *, maximize, foreach,
                 capturable, differentiable, fused, max_grad_norm, backend, **extra):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, **torch_flags(foreach, capturable, differentiable, fused),
                        **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class SGD(_SGDFamily):
    __doc__ = ("SGD with momentum, fused: one multi-tensor pass per param group.\n"
               "    A drop-in for ``torch.optim.SGD`` (same arguments, defaults and state keys).\n" + _DOC + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
""")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class SGD8bit(_SGDFamily):
    __doc__ = ("SGD with a block-wise 8-bit momentum buffer.\n" + DOC_8BIT + _DOC + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.SGD8bit(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["momentum_buffer"].dtype
        torch.uint8
""")
    _quantized = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", block_size=256, min_8bit_size=4096, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size)
