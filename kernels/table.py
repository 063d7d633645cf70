"""Launch tables: how one kernel launch reaches every tensor of a batch.

A :class:`Table` is a device tensor of int64 rows, one per tensor: the address of each of its
streams (param, grad, states, step, ...), then its element count and two integers of
stochastic rounding (the param's position in its group, which salts the noise, and the
tensor's first element's index in its full param, which a shard's element indices start
from; both 0 without stochastic rounding). Its work list has one
``(tensor << 32) | chunk`` item per chunk of ``chunk`` elements, tensor by tensor, so a launch
over 20,000 tensors is still one launch with one program per chunk.

Tables live in ``batch.cache`` and are rebuilt only when something they hold changes: an
address (a param re-bound with ``p.data = ...``, a grad replaced by a new tensor, a state
replaced), an element count, or the set of tensors (a grad that became ``None`` drops its
param from the batch). The check costs one ``data_ptr()`` per stream per tensor per step and
never touches the device; a rebuild copies the new rows from pinned memory without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import capture, quant, reference

#: Elements per work item of the 32-bit kernels (a multiple of every BLOCK they loop with).
CHUNK = 16384


@dataclass
class Table:
    rows: torch.Tensor  # int64 [n_tensors, width] on the device
    work: torch.Tensor  # int64 [n_work]: (tensor << 32) | chunk, tensor by tensor
    first: torch.Tensor  # int32 [n_tensors + 1]: index of each tensor's first work item
    n_tensors: int
    n_work: int
    width: int
    aligned: bool  # every vector stream is 16-byte aligned
    steps: torch.Tensor  # fp32 [n_tensors, 4] scratch written by common.step_kernel
    scratch: dict = field(default_factory=dict)  # per-family device buffers sized for this table


def to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait (pinned, non-blocking)."""
    if device.type == "cpu":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


def lookup(cache: dict, name: str, streams: Sequence[Sequence[torch.Tensor]], vector_streams: int,
           chunk: int, extra: Sequence[int] | None = None) -> Table:
    """The table ``name`` of a batch for ``streams`` (one list of tensors per column, every list
    as long as the first, which holds the params and gives the element counts), rebuilt when
    its key changes.

    The first ``vector_streams`` columns are read with vector accesses and decide ``aligned``.
    ``extra`` is a ``(salt, offset)`` pair per tensor (see :func:`rounding`), stored after the
    element count; zeros when None.
    """
    key = key_of(streams, chunk, extra)
    entry = cache.get(name)
    if entry is not None and entry[0] == key:
        return entry[1]
    table = build(streams, vector_streams, chunk, extra, key=key)
    if not capture.capturing(streams[0][0].device):  # see capture.capturing
        cache[name] = (key, table)
    return table


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def key_of(streams: Sequence[Sequence[torch.Tensor]], chunk: int, extra: Sequence[int] | None = None) -> tuple:
    """Everything a table depends on: every address, every element count, the chunk size.
    (Called every step: ``map`` over the unbound methods is about twice as fast as a generator
    at 20,000 tensors.)"""
    addresses: list[int] = []
    for column in streams:
        addresses.extend(map(_data_ptr, column))
    return (
        chunk,
        tuple(addresses),
        tuple(map(_numel, streams[0])),
        None if extra is None else tuple(extra),
    )


def build(streams: Sequence[Sequence[torch.Tensor]], vector_streams: int, chunk: int,
          extra: Sequence[int] | None = None, key: tuple | None = None) -> Table:
    """A new table for ``streams`` (see :func:`lookup`), copied to the params' device.
    ``key``: their :func:`key_of`, when the caller has it (its addresses are reused)."""
    device = streams[0][0].device
    _, addresses, numels, _ = key if key is not None else key_of(streams, chunk, extra)
    n = len(numels)
    width = len(streams) + 3
    rows = torch.empty((n, width), dtype=torch.int64)
    rows[:, : len(streams)] = torch.tensor(addresses, dtype=torch.int64).view(len(streams), n).t()
    sizes = torch.tensor(numels, dtype=torch.int64)
    rows[:, len(streams)] = sizes
    rows[:, len(streams) + 1:] = torch.tensor(list(extra), dtype=torch.int64).view(n, 2) if extra is not None else 0
    chunks = (sizes + (chunk - 1)).div(chunk, rounding_mode="floor")
    first = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(chunks, 0, out=first[1:])
    n_work = int(first[-1])
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), chunks)
    index = torch.arange(n_work, dtype=torch.int64) - first[:-1].repeat_interleave(chunks)
    work = (owner << 32) | index
    return Table(
        rows=to_device(rows, device),
        work=to_device(work, device),
        first=to_device(first.to(torch.int32), device),
        n_tensors=n,
        n_work=n_work,
        width=width,
        aligned=bool((rows[:, :vector_streams] % 16 == 0).all()),
        steps=torch.empty((n, 4), dtype=torch.float32, device=device),
    )


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------


def hyper_args(values: Sequence, device: torch.device):
    """Runtime hyper-parameters for a kernel: ``(floats, in_memory, tensor)``.

    Python numbers are passed as kernel arguments (a new value never recompiles anything).
    When any value is a tensor on the device (a learning rate a scheduler updates in place,
    for instance), every value goes into one fp32 device tensor the kernel reads instead,
    built with device ops only: no host sync, and a captured CUDA graph follows the tensor.
    """
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values], False, None
    parts = [
        v.to(device=device, dtype=torch.float32).reshape(()) if isinstance(v, torch.Tensor)
        else torch.full((), float(v), dtype=torch.float32, device=device)
        for v in values
    ]
    return [0.0] * len(values), True, torch.stack(parts)


def group_value(value, device: torch.device):
    """A group hyper-parameter as the reference computes with it: a Python number stays one
    (exact double arithmetic on the host, rounded to fp32 once), a device tensor stays on the
    device (fp32 tensor arithmetic), a CPU tensor becomes a number (reading it does not sync)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and device.type != "cpu":
            return float(value)
        return value.to(device=device, dtype=torch.float32).reshape(())
    return value


# ---------------------------------------------------------------------------------------------
# 8-bit codebooks on the device
# ---------------------------------------------------------------------------------------------

_CODEBOOKS: dict = {}


def codebooks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, midpoints)`` as fp32 ``[2, 256]`` device tensors, row 0 unsigned and row 1
    signed (``row = signed``); the midpoints row ends with ``+inf`` so that the 8-step binary
    search never reads past it."""
    books = _CODEBOOKS.get(device)
    if books is None:
        values = torch.stack([quant.dynamic_map(False), quant.dynamic_map(True)])
        inf = torch.full((1,), float("inf"))
        mids = torch.stack([torch.cat([quant.midpoints(False), inf]), torch.cat([quant.midpoints(True), inf])])
        books = (to_device(values.contiguous(), device), to_device(mids.contiguous(), device))
        if not capture.capturing(device):  # see capture.capturing
            _CODEBOOKS[device] = books
    return books


# ---------------------------------------------------------------------------------------------
# Per-batch launch helpers
# ---------------------------------------------------------------------------------------------

STEP_BLOCK = 1024

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(tensor: torch.Tensor) -> str | None:
    """Why the kernels cannot take ``tensor`` (a param or a grad), or None. Any layout runs:
    dense tensors as flat memory, others through gathered copies (:mod:`fusedopt.layout`)."""
    if tensor.dtype not in _DTYPES:
        return f"the kernels compute in fp32 and take float32, bfloat16 and float16 tensors, not {tensor.dtype}"
    return None


_TL_DTYPES = {}


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch dtype the kernels take."""
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TL_DTYPES[dtype]


def stochastic(batch) -> bool:
    """Whether params of this batch are stored with stochastic rounding (bf16 params only:
    wider params are stored exactly); the reference decides."""
    return reference.stochastic(batch)


def seed(group) -> int:
    """The group's stochastic-rounding seed (``group["seed"]``, default 0)."""
    return int(group.get("seed", 0)) & 0xFFFFFFFF


def rounding(batch) -> list[tuple[int, int]]:
    """Each tensor's ``(salt, offset)``: the param's position in its group and the index of the
    tensor's first element in the full param (``batch.offsets``; 0 unless it is a shard). With
    the seed, the step and the element's index in the tensor, what makes its rounding noise
    (the same in every backend)."""
    offsets = batch.offsets or [0] * len(batch.positions)
    return list(zip(batch.positions, offsets))


def hyper_struct(values):
    """A family's runtime hyper-parameters for the kernels: ``(struct, in_memory)``.

    ``values`` is the family's struct (a namedtuple) of group values (:func:`group_value`).
    Python numbers become float kernel arguments (a new value never recompiles anything); a
    device tensor (a learning rate a scheduler updates in place, or what is derived from one)
    stays a tensor, which the kernel reads through its pointer: no host sync, and a captured
    CUDA graph follows it. ``in_memory[i]`` says which (``common.hypers``)."""
    tensors = tuple(isinstance(v, torch.Tensor) for v in values)
    return type(values)(*(v if t else float(v) for v, t in zip(values, tensors))), tensors


class LogOf:
    """A device-tensor beta whose ``log`` the step prologue takes in fp64 (see :func:`log_of`)."""

    __slots__ = ("beta",)

    def __init__(self, beta: torch.Tensor):
        self.beta = beta


def log_of(beta):
    """A step-prologue field holding ``log(beta)`` in fp64 (``reference.log_beta``): of a Python
    number on the host, of a device tensor (:func:`group_value`) in the prologue."""
    return LogOf(beta) if isinstance(beta, torch.Tensor) else reference.log_beta(beta)


def step_args(values, scalars: torch.Tensor):
    """The step prologue's arguments for a family's step struct ``values`` (a namedtuple of at
    most three fields: Python numbers, device tensors, :func:`log_of` markers):
    ``(pointers, numbers, modes)``, see ``common.step_hypers``. Numbers pass in float64."""
    if not values:  # none (an empty tuple is no kernel argument: the scalars stand in, never read)
        return (scalars,), (0.0, 0.0, 0.0), ()
    if len(values) > 3:
        raise ValueError(f"the step prologue takes at most 3 hyper-parameters, not {len(values)}: {values}")
    pointers, numbers, modes = [], [0.0, 0.0, 0.0], []
    for i, v in enumerate(values):
        if isinstance(v, LogOf):
            pointers.append(v.beta)
            modes.append(2)
        elif isinstance(v, torch.Tensor):
            pointers.append(v)
            modes.append(1)
        else:
            pointers.append(scalars)  # never read
            numbers[i] = float(v)
            modes.append(0)
    return tuple(pointers), tuple(numbers), tuple(modes)


def launch_steps(tab: Table, scalars: torch.Tensor, derive=None, values=None) -> None:
    """Write ``t`` of every tensor and the family's per-step scalars (``derive``, a
    ``triton.jit`` function of ``t`` and ``values``, the family's step struct: see
    :func:`step_args`) into ``tab.steps``, and advance every step unless the step is skipped
    (one launch; see ``common.step_kernel``)."""
    from .common import step_kernel

    pointers, numbers, modes = step_args(values if derive is not None else None, scalars)
    step_kernel[(-(-tab.n_tensors // STEP_BLOCK),)](
        tab.rows, tab.steps, tab.n_tensors, scalars, pointers, *numbers, DERIVE=derive,
        HYPERS=type(values) if derive is not None else None, MODES=modes, WIDTH=tab.width,
        STEP_COL=tab.width - 4, BLOCK=STEP_BLOCK,
    )


def prologue(batch, tab: Table, values, beta1_index: int | None = None, beta2_index: int | None = None):
    """What a family launch with positional hyper-parameters (LAMB) starts with: its runtime
    hyper-parameters (:func:`hyper_args` of ``values``) and the step prologue (:func:`launch_steps`),
    which with both beta indices writes ``1 - beta1^t``, ``1 - beta2^t`` (read back by
    ``common.bias_corrections``). Returns ``(values, in_memory, hyper_tensor)``; ``hyper_tensor``
    is the batch's scalars when no value is a tensor (the kernels then never read it)."""
    from . import common

    derive = step = None
    if beta1_index is not None and beta2_index is not None:
        derive = common.bias_corrections_derive
        step = common.BiasCorrections(log_of(values[beta1_index]), log_of(values[beta2_index]))
    values, in_memory, values_tensor = hyper_args(values, batch.params[0].device)
    hyper_tensor = values_tensor if in_memory else batch.scalars
    launch_steps(tab, batch.scalars, derive, step)
    return values, in_memory, hyper_tensor
