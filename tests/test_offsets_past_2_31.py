"""Element offsets past 2**31 in the Triton kernels, checked in the interpreter without 2**31
elements of memory.

A tensor over 2**31 elements needs every offset computed from a chunk index in int64: in
int32, ``chunk * CHUNK`` wraps, and the kernel reads and writes 8 GiB away from the tensor (on a
GPU: a fault or another tensor's memory). The real test of that (tests/test_triton.py,
``test_more_than_2_31_elements``) needs a GPU with 16 to 28 GiB free. Here every launch table
is built for real (small) tensors and then shifted: the first tensor of each table is
presented as the last part of a virtual one of ``SHIFT`` more elements (its address moved back
by ``SHIFT`` elements, its element count raised by ``SHIFT``, its work items moved to the chunks
past ``SHIFT``, an 8-bit state's absmax moved back by ``SHIFT / block_size`` blocks). The
kernels then address the real tensor only through offsets past 2**31 (its chunks straddle
2**31), and must give exactly what the grid of tests/test_backends.py expects. (Stochastic
rounding is left out: its noise depends on the element index, which the shift changes.)

The kernels count a tensor's finished chunks (``common.finished_tensor``) against its element
count, and the two-pass kernels find its partials from its first work item's index: for the
virtual tensor, ``SHIFT / chunk`` chunks (its first ones) are counted done before each launch,
and its partials' buffer starts ``SHIFT / chunk`` zero slots earlier (:class:`_Shifted`).

A kernel that computes such an offset in int32 reaches unmapped memory: the interpreter then
crashes the test process (a segmentation fault names the test) or the comparison fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import test_backends as grid
from fusedopt import backends, launch_table

pytest.importorskip("triton")
from fusedopt.kernels import quant, table  # noqa: E402

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="shifted launch tables reach CPU memory only in Triton's interpreter (TRITON_INTERPRET=1)",
)

# A multiple of every chunk the kernels use in the interpreter (16384 elements for the 32-bit
# kernels, 4 tiles of whole blocks for 8-bit: 32768 for 256-blocks, 24576 for 96-blocks).
SHIFT = 2**31 - 32768
SIZES = (98_309, 1_000)  # the first one's chunks straddle 2**31 after the shift, its last is a tail
SIZES_B = (40_001,)


class _Scratch(dict):
    """A table's scratch buffers, which only the two-pass kernels ask for (their ``(partials,
    norms)``): made here, with the partials starting ``pad`` zero slots after the start of their
    memory, where the first tensor's work items, moved by ``pad`` chunks, find them
    (``twopass.finish_norms``)."""

    def __init__(self, tab, pad: int):
        super().__init__()
        self.tab = tab
        self.pad = pad

    def get(self, name, default=None):
        if name not in self:
            tab = self.tab
            big = torch.zeros((self.pad + tab.n_work, 2), dtype=torch.float32, device=tab.rows.device)
            self[name] = (big[self.pad:], torch.empty((tab.n_tensors, 2), dtype=torch.float32, device=big.device))
        return super().get(name, default)


class _Shifted:
    """A shifted table: the table's own attributes, but its rows and work list shifted, and its
    counters set before each launch (each reads ``counters`` once) to the chunks of the virtual
    tensor that no work item covers."""

    def __init__(self, tab, rows, work, base, pad):
        self._tab = tab
        self.rows = rows
        self.work = work
        self._base = base
        self.scratch = _Scratch(tab, pad)

    def __getattr__(self, name):
        return getattr(self._tab, name)

    @property
    def counters(self):
        return self._tab.counters.copy_(self._base)


def _shifted(build, shift: int, stats: dict):
    """``launch_table.build`` whose tables present their first tensor as the end of one ``shift``
    elements longer (see the module's docstring)."""

    def shifted_build(cols, chunk, extra=None, key=None):
        tab = build(cols, chunk, extra, key=key)
        assert shift % chunk == 0, f"SHIFT is not a multiple of the chunk {chunk}"
        numel = cols[launch_table.PARAM][0].numel()
        rows = tab.rows.clone()
        for column, tensors in cols.items():
            t = tensors[0]
            if column == launch_table.STEP:
                continue  # one value a tensor
            if t.numel() == numel:
                rows[0, column] -= shift * t.element_size()  # an element stream
                continue
            # an 8-bit state's absmax: one fp32 per block of block_size elements
            block_size = next(b for b in (64, 96, 256, 2048, 4096) if t.numel() == -(-numel // b))
            assert t.dtype == torch.float32 and shift % block_size == 0, (t.dtype, block_size)
            rows[0, column] -= shift // block_size * 4
        rows[0, launch_table.NUMEL] += shift
        work = tab.work.clone()
        first = work[:, 0] == 0
        work[first, 1] += shift // chunk
        base = torch.zeros_like(tab.counters)
        base[0] = -(-(numel + shift) // chunk) - max(1, -(-numel // chunk))  # shift // chunk, but for no elements
        stats["tables"] = stats.get("tables", 0) + 1
        return _Shifted(tab, rows, work, base, shift // chunk)

    return shifted_build


@pytest.fixture
def shifted(monkeypatch):
    stats: dict = {}
    monkeypatch.setattr(launch_table, "build", _shifted(launch_table.build, SHIFT, stats))
    yield stats
    assert stats.get("tables"), "no launch table was built (and shifted)"


CASES = [
    grid.Case("AdamW", "fp32", dict(amsgrad=True, max_grad_norm=grid.CLIP), dict(lr=3e-3), scaler=True,
              nonfinite=True, sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("Adam", "bf16", dict(weight_decay=0.1), dict(lr=torch.tensor(2e-3)), sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("Lion", "fp32-bf16grad", dict(weight_decay=0.1), dict(lr=3e-4), sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("LAMB", "bf16", dict(weight_decay=0.1), dict(bias_correction=False), sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("AdamW8bit", "bf16", dict(min_8bit_size=256, amsgrad=True), dict(block_size=96), sizes=SIZES,
              sizes_b=SIZES_B),
    grid.Case("Lion8bit", "fp32", dict(min_8bit_size=256), dict(block_size=2048), sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("LARS", "fp32-bf16grad", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
              dict(lr=3e-4, momentum=0.0, nesterov=False), sizes=SIZES, sizes_b=SIZES_B),
    grid.Case("LAMB8bit", "bf16", dict(min_8bit_size=256, weight_decay=0.1), dict(block_size=96), sizes=SIZES,
              sizes_b=SIZES_B),
    grid.Case("LARS8bit", "fp32", dict(min_8bit_size=256, lr=0.05, momentum=0.9), dict(block_size=2048), sizes=SIZES,
              sizes_b=SIZES_B),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_against_reference_past_2_31(case, shifted):
    grid._check(case, "cpu", "triton")


def test_global_norm_past_2_31(shifted):
    for norm_type in (2.0, math.inf):
        grid.test_global_norm("mixed", norm_type, "cpu", "triton")


def test_the_shift_reaches_past_2_31(shifted):
    """The shifted tables do what the tests above rely on: the chunks of the larger param lie
    past and across 2**31, and the kernels address the real tensor through them."""
    assert SHIFT % quant.chunk(96) == SHIFT % quant.chunk(256) == SHIFT % quant.chunk(2048) == 0
    assert SHIFT % table.CHUNK == 0
    p = torch.randn(SIZES[0])
    tab = launch_table.lookup({}, "t", launch_table.columns([p], [p]), table.CHUNK)
    chunks = tab.work[:, 1].tolist()
    starts = [c * table.CHUNK for c in chunks]
    assert starts[0] == SHIFT and starts[-1] < 2**31 + SIZES[0]
    assert any(s < 2**31 <= s + table.CHUNK for s in starts) and any(s >= 2**31 for s in starts)
    assert int(tab.rows[0, launch_table.PARAM]) + SHIFT * 4 == p.data_ptr()
    assert int(tab.rows[0, launch_table.NUMEL]) == SHIFT + SIZES[0]
