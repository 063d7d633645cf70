"""fusedopt.launch_table: the launch-table layout and the codebook both device backends read.

The column and dtype constants are csrc/params.h's enums (parsed here, not copied); a table
built here is, row for row and work item for work item, what csrc/ops.cpp's ``make_table``
builds for the same tensors (through the emulated extension of tests/cuda_emu, which compiles
ops.cpp for the host, when it can be built here; a hand-written row otherwise too); the
codebook is the CUDA backend's; the cache keeps a table until an address or a size changes,
and never one made while a CUDA graph is being captured.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fusedopt import capture, launch_table, quant

PARAMS_H = Path(__file__).resolve().parents[1] / "csrc" / "params.h"


def _enum(name: str) -> dict[str, int]:
    """The enumerators of C++ ``enum name : int { ... }`` in params.h and their values."""
    text = re.sub(r"//[^\n]*", "", PARAMS_H.read_text())
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{(.*?)\}", text, re.S).group(1)
    values, next_value = {}, 0
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, _, value = (x.strip() for x in item.partition("="))
        next_value = int(value) if value else next_value
        values[key] = next_value
        next_value += 1
    return values


def test_columns_are_params_h_column_enum():
    names = {"kNumel": "NUMEL", "kAligned": "ALIGNED", "kDtype": "DTYPE", "kParam": "PARAM", "kGrad": "GRAD",
             "kState0": "STATE0", "kState1": "STATE1", "kState2": "STATE2", "kAbsmax0": "ABSMAX0",
             "kAbsmax1": "ABSMAX1", "kAbsmax2": "ABSMAX2", "kStep": "STEP", "kSalt": "SALT", "kOffset": "OFFSET",
             "kRowWidth": "ROW_WIDTH"}
    column = _enum("Column")
    assert set(column) == set(names), "params.h's Column enum and launch_table's columns differ"
    assert {names[k]: v for k, v in column.items()} == {n: getattr(launch_table, n) for n in names.values()}


def test_scalar_kinds_are_params_h_scalar_kind_enum():
    kinds = _enum("ScalarKind")
    assert kinds == {"kFloat32": launch_table.FLOAT32, "kBFloat16": launch_table.BFLOAT16,
                     "kFloat16": launch_table.FLOAT16}
    assert launch_table.SCALAR_KINDS == {torch.float32: kinds["kFloat32"], torch.bfloat16: kinds["kBFloat16"],
                                         torch.float16: kinds["kFloat16"]}


def _batch(quantized: bool):
    """Params of mixed dtypes and odd sizes (none, one chunk, several, a view at an odd
    offset), with grads, two states (8-bit codes and absmaxes, or fp32), steps, salts, offsets."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(70_000, generator=gen)
    params = [torch.randn(n, generator=gen).to(dtype) for n, dtype in
              ((0, torch.float32), (1, torch.bfloat16), (257, torch.float16), (65_537, torch.float32),
               (140_000, torch.bfloat16))]
    params.append(flat[3:69_000])  # not 16-byte aligned
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    block = 256
    if quantized:
        states = [[torch.zeros(p.shape, dtype=torch.uint8) for p in params] for _ in range(2)]
        absmaxes = [[torch.zeros(-(-p.numel() // block)) for p in params] for _ in range(2)]
    else:
        states = [[torch.zeros(p.shape) for p in params] for _ in range(2)]
        absmaxes = []
    steps = [torch.zeros(()) for _ in params]
    salts = [7 * i + 1 for i in range(len(params))]
    offsets = [1000 * i for i in range(len(params))]
    return params, grads, states, absmaxes, steps, salts, offsets, block


def _chunk_elements(block_size: int) -> int:
    """csrc/params.h's ``chunk_elements`` (kThreads 256, kQuantVec 16, 8 spans a chunk)."""
    if block_size <= 0:
        return 64 * 1024
    span = 256 * 16
    if block_size <= span:
        return (span // block_size) * block_size * 8
    return max(span * 8 // block_size, 1) * block_size


def test_row_by_hand():
    """One row and the work list, written out (what make_table's loop writes)."""
    p = torch.randn(40_000, dtype=torch.bfloat16)
    e = torch.randn(0)
    g, g_e = torch.randn_like(p), torch.randn_like(e)
    m, m_e = torch.zeros(p.shape), torch.zeros(0)
    step, step_e = torch.zeros(()), torch.zeros(())
    cols = launch_table.columns([p, e], [g, g_e], [[m, m_e]], steps=[step, step_e])
    tab = launch_table.build(cols, 16384, extra=[(3, 500), (4, 0)])
    aligned = int(all(t.data_ptr() % 16 == 0 for t in (p, g, m)))
    assert tab.rows.tolist()[0] == [40_000, aligned, launch_table.BFLOAT16, p.data_ptr(), g.data_ptr(),
                                    m.data_ptr(), 0, 0, 0, 0, 0, step.data_ptr(), 3, 500]
    assert tab.rows.tolist()[1][launch_table.NUMEL] == 0 and tab.rows.tolist()[1][launch_table.SALT] == 4
    assert tab.work.dtype == torch.int32 and tab.work.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]  # 3 chunks, 1
    assert tab.counters.tolist() == [0, 0] and tab.counters.dtype == torch.int32
    assert (tab.n_tensors, tab.n_work, tab.chunk, tab.aligned) == (2, 4, 16384, bool(aligned))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32-states", "8bit-states"])
def test_build_is_ops_make_table(quantized):
    from cuda_emu import emulator

    reason = emulator.cannot_build()
    if reason:
        pytest.skip(f"the emulated cuda extension (ops.cpp on the host) cannot be built here: {reason}")
    emulator.load()
    params, grads, states, absmaxes, steps, salts, offsets, block = _batch(quantized)
    block_size = block if quantized else 0
    rows, work = torch.ops.fusedopt_emu.make_table(params, grads, *states, [], *(absmaxes or [[], []]), [],
                                                   steps, block_size, salts, offsets)
    cols = launch_table.columns(params, grads, states, absmaxes, steps)
    tab = launch_table.build(cols, _chunk_elements(block_size), extra=list(zip(salts, offsets)))
    assert torch.equal(tab.rows, rows)
    assert torch.equal(tab.work, work)
    assert tab.aligned == bool(rows[:, launch_table.ALIGNED].all()) and not tab.aligned  # the view at 3


def test_codebook_is_the_cuda_backends():
    from fusedopt import cuda_backend

    book = launch_table.codebook(torch.device("cpu"))
    assert book.shape == (4, 256) and book.dtype == torch.float32
    assert torch.equal(book, cuda_backend.codebook(torch.device("cpu")))
    assert torch.equal(book[launch_table.SIGNED_VALUES], quant.dynamic_map(True))
    assert torch.equal(book[launch_table.UNSIGNED_MIDS, :255], quant.midpoints(False))
    assert book[launch_table.SIGNED_MIDS, 255] == float("inf")


def test_lookup_rebuilds_only_on_a_change_and_keeps_nothing_while_capturing(monkeypatch):
    params = [torch.randn(n) for n in (5, 300)]
    grads = [torch.randn_like(p) for p in params]
    cache: dict = {}
    first = launch_table.lookup(cache, "t", launch_table.columns(params, grads), 1024)
    assert launch_table.lookup(cache, "t", launch_table.columns(params, grads), 1024) is first
    grads[1] = grads[1].clone()  # a new address
    second = launch_table.lookup(cache, "t", launch_table.columns(params, grads), 1024)
    assert second is not first and cache["t"][1] is second
    assert launch_table.lookup(cache, "t", launch_table.columns(params, grads), 2048) is not second  # chunk
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    cache.clear()
    launch_table.lookup(cache, "t", launch_table.columns(params, grads), 1024)
    launch_table._CODEBOOKS.clear()
    launch_table.codebook(torch.device("cpu"))
    assert cache == {} and launch_table._CODEBOOKS == {}


def test_bad_input():
    p = torch.randn(4)
    with pytest.raises(ValueError, match="one per param"):
        launch_table.build(launch_table.columns([p], []), 1024)
    with pytest.raises(TypeError, match="params\\[0\\]"):
        launch_table.build(launch_table.columns([p.double()]), 1024)
    with pytest.raises(ValueError, match="chunk"):
        launch_table.build(launch_table.columns([p]), 0)
