"""LAMB: layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", ICLR 2020)."""

from __future__ import annotations

from .optimizer import (
    DOC_LR,
    DOC_STORAGE,
    DOC_TORCH_FLAGS,
    FusedOptimizer,
    check_betas,
    check_eps,
    check_flag,
    check_lr,
    check_master_weights,
    check_stochastic_rounding,
    check_torch_flags,
    check_weight_decay,
    torch_flags,
)


class LAMB(FusedOptimizer):
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

    _family = "lamb"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, *,
                 bias_correction=True, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None, backend="auto", stochastic_rounding=False, master_weights=False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, bias_correction=bias_correction,
                        **torch_flags(foreach, capturable, differentiable, fused),
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    def _check_group(self, group: dict) -> None:
        check_lr(group["lr"])
        check_eps(group["eps"])
        check_betas(group["betas"])
        check_weight_decay(group["weight_decay"])
        check_flag("bias_correction", group["bias_correction"])
        check_torch_flags(group)
        check_stochastic_rounding(group)
        check_master_weights(group)

    def _state_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")
