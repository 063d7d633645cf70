"""The Triton backend with each launch's programs run in another order (reversed, shuffled).

Triton's interpreter runs the programs of a launch one after another in grid order, so a
kernel in which a program reads what another program of the same launch writes (a race on a
GPU) would pass every interpreted test. Here a selection of ``tests/test_backends.py``'s grid
(every family, fp32 and bf16, 8-bit, LAMB, clipping with a non-finite skip and a scaler,
stochastic rounding, a 304-tensor model) and its norm and clipping tests run again under
:func:`program_order.program_order`, compared with the reference exactly as the grid compares
them (its own ``_check``). First, the harness itself is shown to reorder.

``FUSEDOPT_ORDER_SEED`` (an integer) changes the shuffles' seeds, for runs beyond CI's.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from program_order import ProgramOrderError, check_source, permutation, program_order

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import test_backends as grid  # noqa: E402
from fusedopt import backends  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET or backends.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="program order is a property of Triton's interpreter (TRITON_INTERPRET=1, CPU tensors)",
)
pytestmark = needs_interpreter

SEED = int(os.environ.get("FUSEDOPT_ORDER_SEED", "0"))


# ---------------------------------------------------------------------------------------------
# The harness reorders, and says so when it cannot
# ---------------------------------------------------------------------------------------------


@triton.jit
def _record(counter, out, NY: tl.constexpr):
    """Appends this program's flat grid index to ``out`` (the order programs ran in)."""
    i = tl.load(counter)
    tl.store(out + i, tl.program_id(0) * NY + tl.program_id(1))
    tl.store(counter, i + 1)


@triton.jit
def _chain(buf):
    """Program ``i`` writes ``buf[i] + 1`` into ``buf[i + 1]``: a cross-program dependency."""
    i = tl.program_id(0)
    tl.store(buf + i + 1, tl.load(buf + i) + 1)


def _launch_order(nx: int, ny: int = 1) -> list[int]:
    counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((nx * ny,), -1, dtype=torch.int32)
    _record[(nx, ny)](counter, out, NY=ny)
    assert int(counter) == nx * ny
    return out.tolist()


@pytest.mark.parametrize("nx, ny", [(37, 1), (5, 7)])
def test_programs_run_in_the_requested_order(nx, ny):
    n = nx * ny
    assert _launch_order(nx, ny) == list(range(n)), "the interpreter's own order is the grid's"
    with program_order("sequential") as stats:
        assert _launch_order(nx, ny) == list(range(n))
    assert (stats.launches, stats.programs, stats.reordered) == (1, n, 0)
    with program_order("reversed") as stats:
        assert _launch_order(nx, ny) == list(range(n))[::-1]
    assert (stats.launches, stats.programs, stats.reordered) == (1, n, 1)
    shuffles = []
    for seed in (1, 2):
        with program_order("shuffled", seed) as stats:
            got = _launch_order(nx, ny)
        assert got == permutation(n, "shuffled", seed) and sorted(got) == list(range(n))
        assert got != list(range(n)) and got != list(range(n))[::-1]
        assert stats.reordered == 1
        shuffles.append(got)
    assert shuffles[0] != shuffles[1], "the seed chooses the shuffle"
    assert _launch_order(nx, ny) == list(range(n)), "leaving the block restores the interpreter"


def test_a_cross_program_dependency_shows():
    """What the harness is for: a kernel whose programs depend on each other gives other
    results in another order."""
    results = {}
    for mode in ("sequential", "reversed", "shuffled"):
        buf = torch.zeros(33, dtype=torch.int32)
        with program_order(mode, seed=3):
            _chain[(32,)](buf)
        results[mode] = buf.tolist()
    assert results["sequential"] == list(range(33))
    assert results["reversed"] == [0] + [1] * 32
    assert results["shuffled"] != results["sequential"]


def test_fails_loudly_when_it_cannot_reorder():
    with pytest.raises(ProgramOrderError, match="no Triton launch"):
        with program_order("reversed"):
            pass  # nothing launched: nothing was tested
    with pytest.raises(ProgramOrderError, match="no longer runs the grid"):
        check_source("for x in range(grid[0]):\n    self.fn(**args)\n")
    with pytest.raises(ValueError, match="mode"):
        with program_order("backwards"):
            pass
    with program_order("reversed"):
        with pytest.raises(ProgramOrderError, match="nested"):
            with program_order("shuffled"):
                pass
        _launch_order(3)


# ---------------------------------------------------------------------------------------------
# The backend grid under other orders
# ---------------------------------------------------------------------------------------------

# (case id in tests/test_backends.py, modes): every family, fp32 and bf16 (and a bf16 grad),
# hyper-parameters in device memory, 8-bit states (block sizes 64, 96, 2048), LAMB's and LARS's passes,
# clipping with a non-finite skip and GradScaler, stochastic rounding, 304 tensors.
SELECTION = [
    ("AdamW-fp32-b.lr=0.003-b.weight_decay=0.0", ("reversed", "shuffled")),
    ("Adam-bf16-weight_decay=0.1-amsgrad=True-b.weight_decay=0.0-b.lr=0.002", ("reversed",)),
    ("AdamW-bf16-maximize=True-max_grad_norm=100.0-b.weight_decay=0.3-nonfinite", ("shuffled",)),
    ("AdamW-fp32-amsgrad=True-max_grad_norm=50.0-b.betas=(0.8,0.9)-scaler", ("reversed",)),
    ("AdamW-fp32-b.lr=tensor(0.002)-b.betas=(tensor(0.85),0.99)", ("shuffled",)),
    ("Lion-fp32-weight_decay=0.1-b.lr=0.0003-b.betas=(0.95,0.98)", ("shuffled",)),
    ("Lion-bf16-max_grad_norm=100.0-b.weight_decay=0.5-scaler-nonfinite", ("reversed",)),
    ("LAMB-fp32-max_grad_norm=100.0-b.weight_decay=0.0-b.eps=1e-08-scaler-nonfinite", ("reversed",)),
    ("LAMB-bf16-weight_decay=0.1-b.lr=0.003-b.bias_correction=False", ("shuffled",)),
    ("LAMB-fp32-bf16grad-weight_decay=0.1-b.lr=0.003-b.bias_correction=False", ("reversed",)),
    ("AdamW8bit-bf16-min_8bit_size=256-b.lr=0.003-b.weight_decay=0.0-b.block_size=96", ("reversed",)),
    ("Lion8bit-fp32-min_8bit_size=256-weight_decay=0.1-b.block_size=2048", ("shuffled",)),
    ("Adam8bit-fp32-min_8bit_size=256-amsgrad=True-maximize=True-b.block_size=64", ("reversed",)),
    ("Adam8bit-bf16-min_8bit_size=256-weight_decay=0.1-max_grad_norm=100.0-b.amsgrad=True-scaler-nonfinite",
     ("shuffled",)),
    ("AdamW-bf16-stochastic_rounding=True-b.seed=12345-b.lr=0.003", ("reversed",)),
    ("Lion-bf16-stochastic_rounding=True-max_grad_norm=100.0-b.seed=4294967295-scaler", ("shuffled",)),
    ("LAMB-bf16-stochastic_rounding=True-b.stochastic_rounding=False", ("reversed",)),
    ("AdamW8bit-bf16-stochastic_rounding=True-min_8bit_size=256-b.seed=7", ("shuffled",)),
    ("LAMB-bf16-304tensors", ("shuffled",)),
    ("LARS-fp32-lr=0.05-momentum=0.9-nesterov=True-max_grad_norm=100.0-b.weight_decay=0.1-b.max_unorm=0.05-b.lr=0.02"
     "-scaler-nonfinite", ("shuffled",)),
    ("LAMB8bit-fp32-min_8bit_size=256-weight_decay=0.1-b.lr=0.003-b.bias_correction=False-b.block_size=96",
     ("reversed",)),
    ("LARS8bit-bf16-min_8bit_size=256-lr=0.05-momentum=0.9-weight_decay=0.01-b.nesterov=True-b.max_unorm=0.0"
     "-b.lr=0.0003-b.block_size=2048", ("shuffled",)),
]


def _params():
    by_id = {case.id: case for case in grid.CASES}
    missing = [name for name, _ in SELECTION if name not in by_id]
    assert not missing, f"cases no longer in tests/test_backends.py: {missing}"
    out, seen = [], set()
    for index, (name, modes) in enumerate(SELECTION):
        for mode in modes:
            # the default tier: the first case of each kind of step; the rest are `full`
            kind = by_id[name].cls.lower().replace("adamw", "adam")
            out.append(pytest.param(by_id[name], mode, SEED + 1000 * index, id=f"{name}-{mode}",
                                    marks=() if kind not in seen else pytest.mark.full))
            seen.add(kind)
    return out


def _check_ordered(mode: str, seed: int, check) -> None:
    with program_order(mode, seed) as stats:
        check()
    # the test ran launches of several programs, each in the requested order
    assert stats.reordered > 0, f"no launch of more than one program ran ({stats})"


@pytest.mark.parametrize("case, mode, seed", _params())
def test_against_reference_in_another_order(case, mode, seed):
    _check_ordered(mode, seed, lambda: grid._check(case, "cpu", "triton"))


@pytest.mark.parametrize("dtypes, norm_type, mode", [
    ("mixed", 2.0, "shuffled"),
    *(pytest.param(*case, marks=pytest.mark.full) for case in (
        ("mixed", 2.0, "reversed"),
        ("bf16", math.inf, "reversed"),
        ("fp32", math.inf, "shuffled"),
        ("fp16", 1.0, "shuffled"),
    )),
])
def test_global_norm_in_another_order(dtypes, norm_type, mode):
    _check_ordered(mode, SEED + 17, lambda: grid.test_global_norm(dtypes, norm_type, "cpu", "triton"))


@pytest.mark.parametrize("mode", ["reversed", "shuffled"])
def test_clip_grad_norm_in_another_order(mode):
    _check_ordered(mode, SEED + 23, lambda: grid.test_clip_grad_norm("cpu", "triton"))
