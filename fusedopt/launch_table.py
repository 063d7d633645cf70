"""Launch tables: how one kernel launch reaches every tensor of a batch (both device backends).

A table is a device tensor of int64 rows, one per tensor, :data:`ROW_WIDTH` columns each, laid
out as ``csrc/params.h``'s ``Column`` enum (a test parses it): the element count, whether every
vector stream of the row is 16-byte aligned, the param's :data:`SCALAR_KINDS` code, the
addresses of the param, the grad, up to three states, their absmaxes (8-bit), the 0-d fp32
step, and two integers of stochastic rounding (the param's position in its group, which salts
the noise, and the index of the tensor's first element in its full param, where a shard's
element indices start). An unused stream's address is 0. The work list is int32
``[n_work, 2]``: one ``(tensor, chunk)`` pair per chunk of ``chunk`` elements, tensor by
tensor; a tensor without elements still gets one (its step advances). ``counters`` (int32, one
per tensor, zero between launches) is what the kernels count finished chunks with, so that the
program that finishes a tensor last advances its step (see ``fusedopt.kernels.common``).

The chunk size is the backend's: it is given to :func:`build`. Tables live in a batch's cache
and are rebuilt only when something they hold changes: an address (a param re-bound with
``p.data = ...``, a grad replaced by a new tensor, a state replaced), an element count, or the
set of tensors (a grad that became ``None`` drops its param from the batch). The check costs one
``data_ptr()`` per stream per tensor per step and never touches the device; a rebuild copies the
new rows from pinned memory without waiting. A table built while a CUDA graph is being
captured is never kept (:func:`fusedopt.capture.capturing`).

The 8-bit kernels of both backends read one codebook (:func:`codebook`).

This module imports no Triton: the CUDA backend can build its tables with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from . import capture, quant

# csrc/params.h's ``Column`` enum.
NUMEL = 0
ALIGNED = 1
DTYPE = 2
PARAM = 3
GRAD = 4
STATE0 = 5
STATE1 = 6
STATE2 = 7
ABSMAX0 = 8
ABSMAX1 = 9
ABSMAX2 = 10
STEP = 11
SALT = 12
OFFSET = 13
ROW_WIDTH = 14

#: The address columns, in the order :func:`columns` names them.
STATES = (STATE0, STATE1, STATE2)
ABSMAXES = (ABSMAX0, ABSMAX1, ABSMAX2)
#: The columns read with vector accesses: what ``ALIGNED`` is about.
VECTOR_COLUMNS = (PARAM, GRAD, STATE0, STATE1, STATE2)

# csrc/params.h's ``ScalarKind`` enum.
FLOAT32 = 0
BFLOAT16 = 1
FLOAT16 = 2
SCALAR_KINDS = {torch.float32: FLOAT32, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}


@dataclass
class Table:
    rows: torch.Tensor  # int64 [n_tensors, ROW_WIDTH] on the device
    work: torch.Tensor  # int32 [n_work, 2]: (tensor, chunk), tensor by tensor
    counters: torch.Tensor  # int32 [n_tensors], zero between launches
    n_tensors: int
    n_work: int
    chunk: int
    aligned: bool  # every row's vector streams are 16-byte aligned
    scratch: dict = field(default_factory=dict)  # per-family device buffers sized for this table


def columns(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None,
            states: Sequence[Sequence[torch.Tensor]] = (), absmaxes: Sequence[Sequence[torch.Tensor]] = (),
            steps: Sequence[torch.Tensor] | None = None) -> dict[int, Sequence[torch.Tensor]]:
    """The address columns of a batch's streams: ``{column: tensors}`` (each list one tensor per
    param; ``states`` and ``absmaxes`` at most three lists each, in the family's order)."""
    if len(states) > 3 or len(absmaxes) > 3:
        raise ValueError(f"a table row holds at most 3 states, got {len(states)} states and {len(absmaxes)} absmaxes")
    out = {PARAM: params}
    if grads is not None:
        out[GRAD] = grads
    out.update(zip(STATES, states))
    out.update(zip(ABSMAXES, absmaxes))
    if steps is not None:
        out[STEP] = steps
    return out


def to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait (pinned, non-blocking)."""
    if torch.device(device).type == "cpu":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def key_of(cols: Mapping[int, Sequence[torch.Tensor]], chunk: int, extra: Sequence | None = None) -> tuple:
    """Everything a table depends on: the columns, every address, every element count, the
    chunk size, the rounding integers. (Called every step: ``map`` over the unbound methods is
    about twice as fast as a generator at 20,000 tensors.)"""
    addresses: list[int] = []
    for column in cols.values():
        addresses.extend(map(_data_ptr, column))
    return (
        chunk,
        tuple(cols),
        tuple(addresses),
        tuple(map(_numel, cols[PARAM])),
        None if extra is None else tuple(extra),
    )


def lookup(cache: dict, name: str, cols: Mapping[int, Sequence[torch.Tensor]], chunk: int,
           extra: Sequence | None = None) -> Table:
    """The table ``name`` of a batch (its ``cache``) for ``cols`` (:func:`columns`), rebuilt when
    its key changes (see :func:`build`)."""
    key = key_of(cols, chunk, extra)
    entry = cache.get(name)
    if entry is not None and entry[0] == key:
        return entry[1]
    table = build(cols, chunk, extra, key=key)
    if not capture.capturing(cols[PARAM][0].device):  # see capture.capturing
        cache[name] = (key, table)
    return table


def build(cols: Mapping[int, Sequence[torch.Tensor]], chunk: int, extra: Sequence | None = None,
          key: tuple | None = None) -> Table:
    """A new table for ``cols`` (:func:`columns`; ``PARAM`` gives the element counts, dtypes
    and device) with ``chunk`` elements per work item, copied to the params' device: the rows
    ``csrc/ops.cpp``'s ``make_table`` makes. ``extra``: one ``(salt, offset)`` pair per tensor,
    zeros when None. ``key``: their :func:`key_of`, when the caller has it."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    params = cols[PARAM]
    device = params[0].device
    _, names, addresses, numels, _ = key if key is not None else key_of(cols, chunk, extra)
    n = len(numels)
    for column, tensors in cols.items():
        if len(tensors) != n:
            raise ValueError(f"column {column} has {len(tensors)} tensors; expected one per param ({n})")
    kinds = []
    for i, p in enumerate(params):
        kind = SCALAR_KINDS.get(p.dtype)
        if kind is None:
            raise TypeError(f"params[{i}]: the tables take float32, bfloat16 and float16 tensors, not {p.dtype}")
        kinds.append(kind)
    rows = torch.zeros((n, ROW_WIDTH), dtype=torch.int64)
    if n:
        rows[:, list(names)] = torch.tensor(addresses, dtype=torch.int64).view(len(names), n).t()
    sizes = torch.tensor(numels, dtype=torch.int64)
    rows[:, NUMEL] = sizes
    rows[:, DTYPE] = torch.tensor(kinds, dtype=torch.int64)
    if extra is not None and n:
        rows[:, SALT:OFFSET + 1] = torch.tensor(list(extra), dtype=torch.int64).view(n, 2)
    aligned = (rows[:, list(VECTOR_COLUMNS)] % 16 == 0).all(dim=1)
    rows[:, ALIGNED] = aligned.to(torch.int64)
    chunks = (sizes + (chunk - 1)).div(chunk, rounding_mode="floor").clamp_(min=1)
    if n and int(chunks.max()) > 2**31 - 1:
        raise ValueError(f"a tensor of {int(sizes.max())} elements is too large for chunks of {chunk}")
    first = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(chunks, 0, out=first[1:])
    n_work = int(first[-1])
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), chunks)
    index = torch.arange(n_work, dtype=torch.int64) - first[:-1].repeat_interleave(chunks)
    work = torch.stack([owner, index], dim=1).to(torch.int32)
    return Table(
        rows=to_device(rows, device),
        work=to_device(work, device),
        counters=torch.zeros(n, dtype=torch.int32, device=device),
        n_tensors=n,
        n_work=n_work,
        chunk=chunk,
        aligned=bool(aligned.all()),
    )


# csrc/ops.cpp's codebook rows (see :func:`codebook`).
SIGNED_VALUES = 0
UNSIGNED_VALUES = 1
SIGNED_MIDS = 2
UNSIGNED_MIDS = 3

_CODEBOOKS: dict = {}


def codebook(device: torch.device) -> torch.Tensor:
    """The 8-bit kernels' codebook, fp32 ``[4, 256]`` on ``device``: the signed and the unsigned
    dynamic map's values (rows :data:`SIGNED_VALUES`, :data:`UNSIGNED_VALUES`), then their 255
    midpoints padded with ``+inf`` (rows :data:`SIGNED_MIDS`, :data:`UNSIGNED_MIDS`: the 8-step
    binary search never reads past them), exactly :mod:`fusedopt.quant`'s tables. Kept per
    device, except while a CUDA graph is being captured."""
    device = torch.device(device)
    book = _CODEBOOKS.get(device)
    if book is None:
        pad = torch.tensor([float("inf")])
        book = to_device(torch.stack([
            quant.dynamic_map(True), quant.dynamic_map(False),
            torch.cat([quant.midpoints(True), pad]), torch.cat([quant.midpoints(False), pad]),
        ]).to(torch.float32).contiguous(), device)
        if not capture.capturing(device):  # see capture.capturing
            _CODEBOOKS[device] = book
    return book
