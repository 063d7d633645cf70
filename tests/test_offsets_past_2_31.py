"""Element offsets past 2**31 in the Triton kernels, checked in the interpreter without 2**31
elements of memory.

A tensor over 2**31 elements needs every offset computed from a chunk index in int64: in
int32, ``chunk * CHUNK`` wraps, and the kernel reads and writes 8 GiB away from the tensor (on a
GPU: a fault or another tensor's memory). The real test of that (tests/test_triton.py,
``test_more_than_2_31_elements``) needs a GPU with 16 to 28 GiB free. Here every launch table
is built for real (small) tensors and then shifted: each tensor is presented as the last part
of a virtual one of ``SHIFT`` more elements (its address moved back by ``SHIFT`` elements, its
element count raised by ``SHIFT``, its work items moved to the chunks past ``SHIFT``, an 8-bit
state's absmax moved back by ``SHIFT / block_size`` blocks). The kernels then address the real
tensors only through offsets past 2**31 (the chunks of the larger param straddle 2**31), and
must give exactly what the grid of tests/test_backends.py expects. (Stochastic rounding is left
out: its noise depends on the element index, which the shift changes.)

A kernel that computes such an offset in int32 reaches unmapped memory: the interpreter then
crashes the test process (a segmentation fault names the test) or the comparison fails.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import test_backends as grid
from fusedopt import backends

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


def _shifted(build, shift: int, stats: dict):
    """``table.build`` whose tables present every tensor as the end of one ``shift`` elements
    longer (see the module's docstring)."""

    def shifted_build(streams, vector_streams, chunk, extra=None, key=None):
        tab = build(streams, vector_streams, chunk, extra, key=key)
        assert shift % chunk == 0, f"SHIFT is not a multiple of the chunk {chunk}"
        numels = [t.numel() for t in streams[0]]
        rows = tab.rows.clone()
        for c, column in enumerate(streams):
            if all(t.dim() == 0 for t in column):
                continue  # the steps: one value a tensor
            if all(t.numel() == n for t, n in zip(column, numels)):
                rows[:, c] -= shift * column[0].element_size()  # an element stream
                continue
            # an 8-bit state's absmax: one fp32 per block of block_size elements
            block_size = next(b for b in (64, 96, 256, 2048, 4096)
                              if all(t.numel() == -(-n // b) for t, n in zip(column, numels)))
            assert column[0].dtype == torch.float32 and shift % block_size == 0, (column[0].dtype, block_size)
            rows[:, c] -= shift // block_size * 4
        rows[:, len(streams)] += shift
        stats["tables"] = stats.get("tables", 0) + 1
        return dataclasses.replace(tab, rows=rows, work=tab.work + shift // chunk)

    return shifted_build


@pytest.fixture
def shifted(monkeypatch):
    stats: dict = {}
    monkeypatch.setattr(table, "build", _shifted(table.build, SHIFT, stats))
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
    tab = table.lookup({}, "t", [[p], [p]], vector_streams=2, chunk=table.CHUNK)
    chunks = (tab.work & 0xFFFFFFFF).tolist()
    starts = [c * table.CHUNK for c in chunks]
    assert starts[0] == SHIFT and starts[-1] < 2**31 + SIZES[0]
    assert any(s < 2**31 <= s + table.CHUNK for s in starts) and any(s >= 2**31 for s in starts)
    assert int(tab.rows[0, 0]) + SHIFT * 4 == p.data_ptr()
    assert int(tab.rows[0, 2]) == SHIFT + SIZES[0]
