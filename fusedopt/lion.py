"""Lion: evolved sign momentum (Chen et al., "Symbolic Discovery of Optimization
Algorithms", NeurIPS 2023), with 32-bit or block-wise 8-bit state."""

from __future__ import annotations

from . import families
from .optimizer import DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer, torch_flags

_DOC = r"""
    Per parameter tensor, with ``g`` its gradient times the step's multiplier (unscale and
    clip)::

        p = p * (1 - lr * weight_decay)
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    Lion's update has unit magnitude per element: use a learning rate 3-10x smaller and a
    weight decay 3-10x larger than with AdamW.

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        betas: interpolation for the update direction (beta1) and the momentum (beta2).
        weight_decay: decoupled weight decay.
""" + DOC_TORCH_FLAGS + r"""        max_grad_norm: clip the global 2-norm of all gradients inside the step (``None``: no
            clipping); the norm is kept on the device as ``last_grad_norm``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
""" + DOC_STORAGE


class _LionFamily(FusedOptimizer):
    _spec = families.LION

    def __init__(self, params, lr, betas, weight_decay, *, foreach, capturable, differentiable, fused,
                 max_grad_norm, backend, stochastic_rounding, **extra):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        weight_decay=weight_decay, **torch_flags(foreach, capturable, differentiable, fused),
                        stochastic_rounding=stochastic_rounding, **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class Lion(_LionFamily):
    __doc__ = "Lion, fused: one multi-tensor pass per param group.\n" + _DOC + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
"""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, foreach=None,
                 capturable=False, differentiable=False, fused=None, max_grad_norm=None, backend="auto",
                 stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, weight_decay, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, max_grad_norm=max_grad_norm,
                         backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class Lion8bit(_LionFamily):
    __doc__ = ("Lion with a block-wise 8-bit momentum (signed dynamic map, fp32 absmax per block).\n"
               + _DOC) + r"""        block_size: elements per quantization block, one fp32 absmax each (a multiple of 32).
            The Triton kernels take blocks of up to 4096: ``backend="auto"`` runs larger ones
            on another backend, ``backend="triton"`` refuses them with a ``RuntimeError``.
        min_8bit_size: tensors with fewer elements keep an fp32 state.

    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.Lion8bit(model.parameters(), lr=1e-4)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["exp_avg"].dtype
        torch.uint8
"""
    _quantized = True

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, foreach=None,
                 capturable=False, differentiable=False, fused=None, max_grad_norm=None, backend="auto",
                 block_size=256, min_8bit_size=4096, stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, weight_decay, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, max_grad_norm=max_grad_norm,
                         backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights,
                         block_size=block_size, min_8bit_size=min_8bit_size)
