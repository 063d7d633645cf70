"""The global gradient norm: a deterministic two-pass reduction, no float atomics.

Pass 1 (one launch per gradient dtype, usually one): each program reduces one chunk of one
tensor and writes its partial into its own slot. Pass 2 (one program) reduces the slots in a
fixed order and finishes the norm. The same gradients give the same bits every time.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .. import launch_table, layout
from . import common, table
from .table import unsupported

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8
FINISH_BLOCK = 1024

# ORD: 1, 2, or 0 for the inf-norm (max |x|).
_ORDS = {1.0: 1, 2.0: 2, math.inf: 0}


def unsupported_order(norm_type: float) -> str | None:
    """Why the norm kernels cannot compute the ``norm_type``-norm, or None."""
    if float(norm_type) not in _ORDS:
        return f"its global norm takes norm_type 1, 2 or inf, not {norm_type}"
    return None

# Tables of recent gradient lists (least recently used first): a step calls this with the same
# gradients every time, clip_grad_norm_ may call it with others.
_TABLES: OrderedDict = OrderedDict()
_MAX_TABLES = 16


@triton.jit
def _accumulate(acc, x, ORD: tl.constexpr):
    if ORD == 2:
        return acc + x * x
    elif ORD == 1:
        return acc + tl.abs(x)
    else:
        return tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _reduce(acc, ORD: tl.constexpr):
    if ORD == 0:
        # tl.max drops NaNs; a NaN gradient must give a NaN norm (the step is then skipped)
        nans = tl.sum((acc != acc).to(tl.int32), axis=0)
        return tl.where(nans > 0, float("nan"), tl.max(acc, axis=0))
    else:
        return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["offset"])
def norm_partial_kernel(table, work, partials, offset, G_DTYPE: tl.constexpr, ORD: tl.constexpr,
                        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Slot ``offset + program`` gets the partial of one chunk (sum of squares, sum of
    magnitudes or max magnitude; 0 for a tensor without elements). Table row
    (``fusedopt.launch_table``): the tensor at column ``PARAM``."""
    tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
    g_ptr = common.load_ptr(row, common.PARAM, G_DTYPE, ALIGNED) + start
    o = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    if n >= CHUNK:
        for off in range(0, CHUNK, BLOCK):
            acc = _accumulate(acc, tl.load(g_ptr + off + o).to(tl.float32), ORD)
    else:
        tail = n.to(tl.int32)
        for off in range(0, tail, BLOCK):
            acc = _accumulate(acc, tl.load(g_ptr + off + o, mask=off + o < tail, other=0.0).to(tl.float32), ORD)
    tl.store(partials + offset + tl.program_id(0), _reduce(acc, ORD))


@triton.jit(do_not_specialize=["n"])
def norm_finish_kernel(partials, n, out, ORD: tl.constexpr, BLOCK: tl.constexpr):
    """One program: reduce the ``n`` partials in order and finish the norm into ``out``."""
    o = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, n, BLOCK):
        x = tl.load(partials + off + o, mask=off + o < n, other=0.0)
        if ORD == 0:
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc = acc + x
    total = _reduce(acc, ORD)
    if ORD == 2:
        total = tl.sqrt_rn(total)
    tl.store(out, total)


def _tables(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, launch_table.Table]]:
    """One table per gradient dtype (cached while the same gradients come back)."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    key = tuple((dtype, launch_table.key_of(launch_table.columns(ts), table.CHUNK)) for dtype, ts in by_dtype.items())
    tables = _TABLES.get(key)
    if tables is None:
        tables = [(dtype, launch_table.build(launch_table.columns(ts), table.CHUNK)) for dtype, ts in by_dtype.items()]
        _TABLES[key] = tables
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def global_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """``norm_type``-norm of all ``tensors`` together as a 0-d fp32 tensor on their device.

    Orders 1, 2 and inf, of the tensors the kernels take (not float64): ``fusedopt.backends``
    resolves any other norm to another backend, and this raises if reached with one (never
    a fallback). A norm is the same in any memory order: dense tensors are read as they lie,
    others (an expanded grad) through a contiguous copy."""
    reason = unsupported_order(norm_type) or next((r for r in map(unsupported, tensors) if r is not None), None)
    if reason is not None:
        raise RuntimeError(f"the Triton backend cannot compute this norm: {reason}")
    order = _ORDS[float(norm_type)]
    tensors = [t if layout.dense(t) else t.contiguous() for t in tensors]
    device = tensors[0].device
    tables = _tables(tensors)
    total = sum(tab.n_work for _, tab in tables)
    partials = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    offset = 0
    for dtype, tab in tables:
        if tab.n_work:
            norm_partial_kernel[(tab.n_work,)](
                tab.rows, tab.work, partials, offset, G_DTYPE=table.tl_dtype(dtype),
                ORD=order, ALIGNED=tab.aligned, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
        offset += tab.n_work
    out = torch.empty((), dtype=torch.float32, device=device)
    norm_finish_kernel[(1,)](partials, total, out, ORD=order, BLOCK=FINISH_BLOCK, num_warps=4)
    return out
