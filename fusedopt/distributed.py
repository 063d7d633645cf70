"""Sharded parameters (FSDP2's DTensors) for the optimizers and clipping.

Backends only ever see plain local tensors: the base optimizer hands them each DTensor's local
shard. What a shard cannot know alone, a sum over the whole tensor (the global gradient norm,
LAMB's per-tensor ``||p||`` and ``||u||``), is all-reduced over the process groups of the mesh
dimensions the tensor is *sharded* on (replicated dimensions already hold the whole sum).

Collectives are issued in the same order on every rank: batches are ordered by keys made of
devices, dtypes and rank lists, never by object addresses.
"""

from __future__ import annotations

from typing import Callable

import torch

try:  # public since torch 2.5; torch.distributed may be absent from some builds
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    try:
        from torch.distributed._tensor import DTensor, Shard
    except ImportError:
        DTensor = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates: a DTensor's local shard (same storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_groups(t: torch.Tensor) -> tuple:
    """Process groups of the mesh dimensions ``t`` is sharded on (empty if not a DTensor)."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i, pl in enumerate(t.placements) if pl.is_shard())


def flat_offset(t: torch.Tensor) -> int:
    """Where this rank's shard of ``t`` starts in the full tensor's flattened (row-major)
    elements, when the shard is a contiguous range of them: every mesh dimension ``t`` is
    sharded on shards dim 0 (``Shard(0)``, FSDP2's default), split as ``torch.chunk`` splits
    (the last ranks may get fewer rows, or none). 0 for any other tensor: not a DTensor,
    replicated, or sharded on another dim (a shard is then no range of the flat tensor).
    Stochastic rounding adds it to each element's index in the shard."""
    if not is_dtensor(t) or t.dim() == 0:
        return 0
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return 0
    begin, rows = 0, t.shape[0]
    for i, placement in enumerate(t.placements):
        if not placement.is_shard():
            continue
        if type(placement) is not Shard or placement.dim not in (0, -t.dim()):
            return 0  # Shard(d > 0), _StridedShard: local indices (see DOC_STORAGE)
        chunk = -(-rows // mesh.size(i))
        start = min(coordinate[i] * chunk, rows)
        begin, rows = begin + start, min(chunk, rows - start)
    if rows != t.to_local().shape[0]:  # not the layout described above: local indices
        return 0
    return begin * (t.numel() // t.shape[0]) if t.shape[0] else 0


def shard_key(t: torch.Tensor) -> tuple:
    """A deterministic, hashable name for :func:`shard_groups` (the ranks of each group)."""
    import torch.distributed as dist

    return tuple(tuple(dist.get_process_group_ranks(g)) for g in shard_groups(t))


def all_reduce_sum(groups: tuple) -> Callable[[torch.Tensor], None] | None:
    """An in-place sum over ``groups``, or None when there is nothing to reduce."""
    if not groups:
        return None
    import torch.distributed as dist

    def reduce(x: torch.Tensor) -> None:
        for g in groups:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=g)

    return reduce


def all_reduce_max(x: torch.Tensor, groups: tuple) -> None:
    import torch.distributed as dist

    for g in groups:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=g)


def like(param: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this rank's shard of a tensor shaped like ``param``) as a DTensor with
    ``param``'s mesh and placements."""
    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def blockwise(param: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """A 1-d per-shard tensor (e.g. 8-bit absmax: one entry per block of this rank's shard) as
    a DTensor sharded along its only dimension wherever ``param`` is sharded, so a distributed
    checkpoint saves every rank's entries."""
    n = torch.tensor([local_tensor.numel()], device=local_tensor.device)
    reduce = all_reduce_sum(shard_groups(param))
    reduce(n)
    placements = [Shard(0) if pl.is_shard() else pl for pl in param.placements]
    return DTensor.from_local(local_tensor, param.device_mesh, placements, run_check=False,
                              shape=(int(n),), stride=(1,))
