"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020)."""

from __future__ import annotations

from . import families
from .optimizer import DOC_8BIT, DOC_8BIT_ARGS, DOC_LR, DOC_STORAGE, DOC_TORCH_FLAGS, FusedOptimizer, torch_flags


class _LambFamily(FusedOptimizer):
    _spec = families.LAMB

    def __init__(self, params, lr, betas, eps, weight_decay, *, bias_correction, foreach, capturable,
                 differentiable, fused, max_grad_norm, backend, stochastic_rounding, master_weights, **extra):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, bias_correction=bias_correction,
                        **torch_flags(foreach, capturable, differentiable, fused),
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, **extra)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)


class LAMB(_LambFamily):
    __doc__ = r"""LAMB, fused: moments for every tensor in one pass, the per-tensor trust ratio applied
    in a second.

    Per parameter tensor, with ``t`` its step count after this step and ``g`` its gradient
    times the step's multiplier (unscale and clip)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)    (m, v if not bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p
        r = ||p|| / ||u||   if both norms are positive, else 1
        p = p - lr * r * u

    Args:
        params: an iterable of tensors or of param-group dicts.
""" + DOC_LR + r"""        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator for numerical stability.
        weight_decay: decay added to the update before the trust ratio.
        bias_correction: divide the moments by ``1 - beta^t``.
""" + DOC_TORCH_FLAGS + r"""        max_grad_norm: clip the global 2-norm of all gradients inside the step (``None``: no
            clipping); the norm is kept on the device as ``last_grad_norm``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
""" + DOC_STORAGE + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fusedopt.LAMB(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, *,
                 bias_correction=True, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction=bias_correction, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights)


class LAMB8bit(_LambFamily):
    __doc__ = ("LAMB with block-wise 8-bit moments.\n" + DOC_8BIT + "\n" + LAMB.__doc__.split("\n\n", 1)[1].split("    Example:")[0]
               + DOC_8BIT_ARGS + r"""
    Example:
        >>> import torch, fusedopt
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = fusedopt.LAMB8bit(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 128)).square().mean().backward()
        >>> opt.step(); opt.state[model.weight]["exp_avg"].dtype
        torch.uint8
""")
    _quantized = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, *,
                 bias_correction=True, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", block_size=256, min_8bit_size=4096, stochastic_rounding=False,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction=bias_correction, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         max_grad_norm=max_grad_norm, backend=backend, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size)
