"""One step's work, shared by the eager step (:mod:`fusedopt.optimizer`) and the compiled one
(:mod:`fusedopt.compiled`): the :class:`Batch` a backend family function receives, the
device scalars of a step (:func:`step_scalars`) and the backend calls (:func:`run_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: The state name of a param's fp32 master copy (``master_weights``).
MASTER = "master_param"


@dataclass
class Batch:
    """What a backend family function receives: tensors of one param group that share a
    device, a param dtype, a grad dtype and a state layout, in a stable order.

    Attributes:
        params, grads: the tensors to update and their gradients.
        state: state name -> one tensor per param (``exp_avg``, ...). When ``quantized``, each
            name holds uint8 codes shaped like the param and ``name + "_absmax"`` the fp32
            per-block scales.
        steps: per-param step counts (0-d fp32 on the device); the backend advances each by one
            unless the step is skipped.
        group: the param group (hyper-parameters and flags).
        scalars: fp32 device tensor laid out as in :mod:`fusedopt.scalars`.
        quantized: whether states are 8-bit block-wise.
        block_size: quantization block size (8-bit only).
        cache: backend-owned storage that lives as long as this batch key (address tables).
        positions: each param's index in ``group["params"]`` (what salts its stochastic
            rounding noise; the batch's own tensors may be shards, not the group's objects).
        offsets: each tensor's first element's index in its full param (FSDP2 shards on dim 0:
            see ``distributed.flat_offset``): stochastic rounding's noise is drawn for element
            ``offsets[i] + j``, so a sharded param rounds as the unsharded one. Empty: all 0.
        all_reduce: for sharded (FSDP2 DTensor) params, an in-place sum over the shards of a
            tensor of partial sums (LAMB's per-tensor ``||p||^2``, ``||u||^2``); None otherwise.
            Tensors in a batch are always the local shards.
        outputs: with ``master_weights``, the 16-bit params, rewritten from ``params`` (then
            their fp32 master copies) after the backend's update; None otherwise.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    state: dict[str, list[torch.Tensor]]
    steps: list[torch.Tensor]
    group: dict[str, Any]
    scalars: torch.Tensor | None
    quantized: bool = False
    block_size: int = 256
    cache: dict = field(default_factory=dict)
    all_reduce: Callable[[torch.Tensor], None] | None = None
    positions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    outputs: list[torch.Tensor] | None = None


def step_scalars(work, grad_scale, found_inf, max_grad_norm, unit) -> tuple[dict, torch.Tensor | None]:
    """The device scalars of one step, ``[grad multiplier, skip, norm]`` per device (see
    :mod:`fusedopt.scalars`), and the global gradient norm when ``max_grad_norm`` clips (else
    None). ``work`` is ``(key, batch, backend)`` per batch; ``unit(device)`` gives the constant
    scalars of a step with no scaler and no clipping. Device ops only: no host sync."""
    devices = list(dict.fromkeys(key[0] for key, _, _ in work))
    if grad_scale is None and found_inf is None and max_grad_norm is None:
        return {d: unit(d) for d in devices}, None

    home = devices[0]
    mult = torch.ones((), dtype=torch.float32, device=home)
    skip = torch.zeros((), dtype=torch.float32, device=home)
    norm = torch.zeros((), dtype=torch.float32, device=home)
    clipped = None
    if grad_scale is not None:
        # Exactly the inverse GradScaler.unscale_ uses.
        mult = grad_scale.to(home).double().reciprocal().float().reshape(())
    if found_inf is not None:
        skip = (found_inf.to(home).reshape(()) > 0).float()
    if max_grad_norm is not None:
        # Sum of squares per (device, shard groups, backend): each backend takes the norm of
        # the grads it was resolved for (an fp32 batch on Triton and a float64 one on the
        # reference share a device); shards are summed over their groups.
        parts: dict[tuple, list] = {}
        for key, batch, backend in work:
            parts.setdefault((key[0], key[4], backend.NAME), [backend, batch.all_reduce, []])[2].extend(batch.grads)
        ordered = sorted(parts.items(), key=lambda kv: str(kv[0]))
        if len(ordered) == 1 and ordered[0][1][1] is None:
            backend, _, grads = ordered[0][1]
            norm = backend.global_norm(grads, 2.0).to(home, torch.float32)
        else:
            total = torch.zeros((), dtype=torch.float32, device=home)
            for _, (backend, reduce, grads) in ordered:
                sq = backend.global_norm(grads, 2.0).to(torch.float32) ** 2
                if reduce is not None:
                    reduce(sq)
                total = total + sq.to(home)
            norm = torch.sqrt(total)
        norm = norm * mult
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        skip = torch.maximum(skip, (~torch.isfinite(norm)).float())
        mult = mult * coef
        clipped = norm
    packed = torch.stack([mult, skip, norm])  # the order of fusedopt.scalars
    return {d: packed if d == home else packed.to(d) for d in devices}, clipped


def run_batches(family: str, work, scalars: dict) -> None:
    """Hand each batch of ``work`` (``(key, batch, backend)``) its device's scalars and call
    the backend's ``family`` function on it; then rewrite 16-bit params from their fp32
    masters (``master_weights``)."""
    for key, batch, backend in work:
        batch.scalars = scalars[key[0]]
        backend.STEPS[family](batch)
        if batch.outputs is not None:
            # Round to nearest from the fp32 masters (a skipped step rewrites the same bits).
            torch._foreach_copy_(batch.outputs, batch.params)
