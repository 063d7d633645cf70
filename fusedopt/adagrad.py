"""Adagrad (Duchi et al., JMLR 2011; as ``torch.optim.Adagrad``), 32-bit or block-wise 8-bit
accumulator."""

from __future__ import annotations

from . import families
from .optimizer import (DOC_8BIT, DOC_8BIT_ARGS, DOC_EXTRAS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer,
                        torch_flags)

_DOC = r"""
    Per parameter tensor, with ``t`` its step count after this step and ``g`` its gradient
    times the step's multiplier (unscale and clip)::

        g = -g                                  if maximize
        g = g + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        sum = sum + g^2
        p = p - clr * g / (sqrt(sum) + eps)

    As torch's, the state (``"step"``, ``"sum"`` filled with ``initial_accumulator_value``) of
    every param is made when the optimizer is.

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        lr_decay: learning-rate decay per step.
        weight_decay: L2 penalty.
        initial_accumulator_value: the starting value of ``sum``.
        eps: added to the denominator for numerical stability.
        maximize: maximize the objective instead of minimizing it.
""" + DOC_TORCH_FLAGS + DOC_EXTRAS + DOC_STORAGE


class _AdagradFamily(FusedOptimizer):
    _spec = families.ADAGRAD

    def __init__(self, params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, *, maximize, foreach,
                 capturable, differentiable, fused, max_grad_norm, backend, **extra):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
                        **torch_flags(foreach, capturable, differentiable, fused), **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class Adagrad(_AdagradFamily):
    __doc__ = ("Adagrad, fused: one multi-tensor pass per param group.\n"
               "    A drop-in for ``torch.optim.Adagrad`` (same arguments, defaults and state keys).\n" + _DOC + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.Adagrad(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
""")

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class Adagrad8bit(_AdagradFamily):
    __doc__ = ("Adagrad with a block-wise 8-bit accumulator (unsigned map).\n" + DOC_8BIT + _DOC + DOC_8BIT_ARGS
               + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.Adagrad8bit(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["sum"].dtype
        torch.uint8
""")
    _quantized = True

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", block_size=256, min_8bit_size=4096, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size)
