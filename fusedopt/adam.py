"""Adam and AdamW, with 32-bit or block-wise 8-bit states."""

from __future__ import annotations

from . import families
from .optimizer import DOC_8BIT, DOC_8BIT_ARGS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer, torch_flags

_MATH = r"""
    Per parameter tensor, with ``t`` the tensor's step count after this step and ``g`` its
    gradient times the step's multiplier (``1/grad_scale`` under GradScaler, times the clip
    coefficient when ``max_grad_norm`` is set)::

        g = -g                                   if maximize
        g = g + weight_decay * p                 (Adam)
        p = p * (1 - lr * weight_decay)          (AdamW)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        v_max = max(v_max, v)                    if amsgrad (and used as v below)
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

_ARGS = r"""
    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty (Adam) or decoupled decay (AdamW).
        amsgrad: use the maximum of past second moments (Reddi et al., 2018).
        maximize: maximize the objective instead of minimizing it.
""" + DOC_TORCH_FLAGS + r"""        max_grad_norm: clip the global 2-norm of all gradients to this value inside the step
            (``None``: no clipping). The unclipped norm is kept on the device as
            ``last_grad_norm``; a non-finite norm skips the step.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (the environment
            variable ``FUSEDOPT_BACKEND`` overrides ``"auto"``).
""" + DOC_STORAGE


class _AdamFamily(FusedOptimizer):
    _spec = families.ADAM

    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, *, foreach, maximize, capturable,
                 differentiable, fused, decoupled_weight_decay, max_grad_norm, backend, stochastic_rounding,
                 **extra):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        **torch_flags(foreach, capturable, differentiable, fused),
                        decoupled_weight_decay=decoupled_weight_decay,
                        stochastic_rounding=stochastic_rounding, **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class Adam(_AdamFamily):
    __doc__ = (
        "Adam (Kingma & Ba, 2015), fused: one multi-tensor pass per param group.\n"
        "    A drop-in for ``torch.optim.Adam`` (same arguments, defaults and state keys).\n"
        + _MATH + _ARGS + r"""        decoupled_weight_decay: use AdamW's decoupled decay (as torch.optim.Adam allows).

    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
"""
    )

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False, differentiable=False,
                 fused=None, decoupled_weight_decay=False, max_grad_norm=None, backend="auto",
                 stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay,
                         max_grad_norm=max_grad_norm, backend=backend,
                         stochastic_rounding=stochastic_rounding, master_weights=master_weights)


class AdamW(_AdamFamily):
    __doc__ = (
        "AdamW (Loshchilov & Hutter, 2019), fused: Adam with decoupled weight decay.\n"
        "    A drop-in for ``torch.optim.AdamW`` (same arguments, defaults and state keys).\n"
        + _MATH + _ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
"""
    )

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, max_grad_norm=None, backend="auto",
                 stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class Adam8bit(_AdamFamily):
    __doc__ = (
        "Adam with block-wise 8-bit states.\n" + DOC_8BIT + _MATH + _ARGS + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.Adam8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["exp_avg"].dtype
        torch.uint8
"""
    )
    _quantized = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False, differentiable=False,
                 fused=None, decoupled_weight_decay=False, max_grad_norm=None, backend="auto",
                 block_size=256, min_8bit_size=4096,
                 stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay,
                         max_grad_norm=max_grad_norm, backend=backend,
                         stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                         block_size=block_size, min_8bit_size=min_8bit_size)


class AdamW8bit(_AdamFamily):
    __doc__ = (
        "AdamW with block-wise 8-bit states.\n" + DOC_8BIT + _MATH + _ARGS + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.AdamW8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["exp_avg_sq"].dtype
        torch.uint8
"""
    )
    _quantized = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False, differentiable=False,
                 fused=None, max_grad_norm=None, backend="auto",
                 block_size=256, min_8bit_size=4096, stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights,
                         block_size=block_size, min_8bit_size=min_8bit_size)
