"""``python -m fusedopt static``: the SASS reader on hand-written functions (every rule of
fusedopt.sass), the occupancy and issue-rate arithmetic, and the whole tool on the CUDA
extension built for sm_80 and sm_90 (where nvcc is present), with ``--check`` as CI runs it."""

from __future__ import annotations

import json

import pytest

from fusedopt import build, sass, static


def _sass(*lines: str) -> str:
    """A function body in cuobjdump's format, one instruction per line, addresses from 0."""
    return "\n".join(f"        /*{16 * k:04x}*/    {line} ;   /* 0x0 */" for k, line in enumerate(lines))


# A persistent loop over work items (0x10..) around a segment loop (0x30..): the segment loop's
# full path loads p and g with two 128-bit loads each under a runtime switch (@P1: fp32 grad,
# two loads; @!P1: a 16-bit grad, one), stores p, and has a slow path (a call) it skips.
NESTED = _sass(
    "MOV R1, c[0x0][0x28]",  # 0x00
    "LDG.E.64 R2, desc[UR4][R4.64]",  # 0x10  outer header: a table row
    "IADD3 R5, R5, 0x1, RZ",  # 0x20
    "LDG.E.128 R8, desc[UR4][R2.64]",  # 0x30  segment loop header: p
    "@P1 LDG.E.128 R12, desc[UR4][R6.64]",  # 0x40  fp32 grad
    "@P1 LDG.E.128 R16, desc[UR4][R6.64+0x10]",  # 0x50
    "@!P1 LDG.E.128 R12, desc[UR4][R7.64]",  # 0x60  16-bit grad
    "FCHK P0, R8, R12",  # 0x70
    "@!P0 BRA 0xb0",  # 0x80  the fast division
    "CALL.REL.NOINC 0x100",  # 0x90  the slow one
    "FMUL R8, R8, R9",  # 0xa0
    "FFMA R8, R12, R8, R9",  # 0xb0
    "STG.E.128 desc[UR4][R2.64], R8",  # 0xc0
    "@P2 BRA 0x30",  # 0xd0  segment back edge
    "@P3 BRA 0x10",  # 0xe0  work-item back edge
    "EXIT",  # 0xf0
    "FMUL R8, R8, R8",  # 0x100  slow path
    "RET.REL.NODEC R20 0x0",  # 0x110
)


def test_the_main_loop_is_the_innermost_with_vector_loads_and_stores():
    loop = sass.main_loop(NESTED)
    assert (loop.header, loop.latch) == (0x30, 0xd0)


def test_the_executed_path_skips_the_slow_path_and_takes_a_switch_side():
    loop = sass.main_loop(NESTED)
    # 0x30 .. 0x80, then the branch to 0xb0 (not the call and the FMUL), 0xb0 .. 0xd0: 6 + 3
    assert loop.path.instructions == 9
    # with no roofline given, the side with the most 128-bit accesses: fp32 grads
    assert (loop.path.vector_loads, loop.path.vector_stores) == (3, 1)
    # the 16-bit grad side when the roofline says so (per thread: 16 + 16 bytes loaded, 16 stored)
    p16 = sass.main_loop(NESTED, want=(32, 16)).path
    assert (p16.vector_loads, p16.vector_stores, p16.instructions) == (2, 1, 9)
    # predicated-off instructions still issue: the same count either side
    assert p16.instructions == loop.path.instructions


def test_a_loop_per_case_of_a_runtime_switch():
    """A norm with one loop per dtype: the loop whose path moves the roofline's bytes."""
    text = _sass(
        "@P0 BRA 0x50",  # 0x00
        "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x10  16-bit loop: one load per iteration
        "FADD R0, R0, R4",  # 0x20
        "@P1 BRA 0x10",  # 0x30
        "EXIT",  # 0x40
        "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x50  fp32 loop: two loads
        "LDG.E.128 R8, desc[UR4][R2.64+0x10]",  # 0x60
        "FADD R0, R0, R4",  # 0x70
        "@P1 BRA 0x50",  # 0x80
        "EXIT",  # 0x90
    )
    assert sass.main_loop(text, want=(32, 0)).header == 0x50
    assert sass.main_loop(text, want=(16, 0)).header == 0x10


def test_no_vector_access_no_main_loop():
    text = _sass("LDG.E R4, desc[UR4][R2.64]", "@P1 BRA 0x0", "EXIT")
    assert sass.main_loop(text) is None


def test_functions_split_by_arch_and_name():
    dump = ("\tarch = sm_80\n\t\tFunction : _Z1av\n" + _sass("EXIT") + "\n\t\t..........\n"
            "\tarch = sm_90\n\t\tFunction : _Z1av\n" + _sass("NOP", "EXIT") + "\n")
    found = sass.functions(dump)
    assert set(found) == {("_Z1av", "sm_80"), ("_Z1av", "sm_90")}
    assert [i.op for i in sass.parse(found[("_Z1av", "sm_90")])] == ["NOP", "EXIT"]


def test_occupancy_and_issue_rate():
    # 256-thread blocks: 64 registers -> 4 blocks (32 warps); 128 -> 2 (16); 168 -> 1 (8)
    assert static.warps_per_sm(64, 256) == 32
    assert static.warps_per_sm(128, 256) == 16
    assert static.warps_per_sm(168, 256) == 8
    assert static.warps_per_sm(32, 256) == 64  # capped at 64 warps
    # the issue's figure: 190 instructions per element at 16 bytes per element on an H100 (1.98
    # GHz, 132 SMs) allow about 2.8 TB/s, under its 3.35: issue-bound
    tb = static.issue_bandwidth("sm_90", 190, 16)
    assert 2.7 < tb < 2.9
    assert static.verdict("sm_90", tb).startswith("issue-bound at 2.8")
    assert static.verdict("sm_90", 3.4) == "memory-bound"


@pytest.mark.parametrize("demangled, expected", [
    ("void fusedopt::elementwise_kernel<fusedopt::Adam<false>, float, false>(fusedopt::MultiTensor, fusedopt::Adam<false>)",
     (8, (16, 12))),
    ("void fusedopt::elementwise_kernel<fusedopt::Adam<true>, __nv_bfloat16, true>(fusedopt::MultiTensor)", (8, (16, 14))),
    ("void fusedopt::quant8_kernel<fusedopt::Adam<false>, __nv_bfloat16, false>(fusedopt::MultiTensor)", (16, (6, 4))),
    ("void fusedopt::quant8_kernel<fusedopt::Applied<fusedopt::Lars<true> >, float, false>(fusedopt::MultiTensor)",
     (16, (9, 5))),
    ("void fusedopt::two_pass_norms_kernel<fusedopt::Lamb, float>(fusedopt::MultiTensor)", (8, (16, 8))),
    ("void fusedopt::two_pass_apply_kernel<fusedopt::Lars<true>, float, false, true>(fusedopt::MultiTensor)",
     (8, (12, 4))),
    ("void fusedopt::two_pass_norms_only_kernel<fusedopt::Lars<false>, __half, false>(fusedopt::MultiTensor)",
     (8, (4, 0))),
    ("void fusedopt::elementwise_kernel<fusedopt::Sgd<false>, float, false>(fusedopt::MultiTensor)", (8, (8, 4))),
    ("void fusedopt::elementwise_kernel<fusedopt::Rmsprop<true, true>, float, false>(fusedopt::MultiTensor)",
     (8, (20, 16))),
    ("void fusedopt::norm_finish_kernel<(fusedopt::NormKind)2>(long, fusedopt::NormArgs)", (None, None)),
])
def test_roofline_of_each_cuda_kernel(demangled, expected):
    """The bytes per element a kernel must move, from its template arguments (bench's roofline
    split per pass): 3p + 8k one pass, 8-bit 3p + 2k, LAMB's norms pass writes its states."""
    assert static.cuda_expected(demangled) == expected


def test_the_triton_rows_of_two_classes(tmp_path, capsys):
    """The launches the Triton backend really makes (here SGD's and Lion8bit's, compiled for
    sm_90 by Triton's own binder): a row per kernel, its main loop's 128-bit accesses moving
    exactly its roofline row, no spill. (CI runs the whole tool, every class and both
    architectures, with --check: .ci/run.)"""
    pytest.importorskip("triton")
    out = tmp_path / "static.json"
    assert static.main(["--backend", "triton", "--arch", "90", "--classes", "SGD", "Lion8bit",
                        "--json", str(out), "--check"]) == 0, capsys.readouterr().err
    rows = [r for r in json.loads(out.read_text())["rows"] if r["roofline_bytes"] is not None]
    assert {r["kernel"].split("[")[1] for r in rows} == {"SGD float32]", "SGD bfloat16]", "Lion8bit float32]",
                                                          "Lion8bit bfloat16]"}
    assert all(r["matched"] and not r["spill_bytes"] and r["arch"] == "sm_90" for r in rows)
    sgd = next(r for r in rows if r["kernel"].endswith("[SGD float32]"))
    # SGD with momentum, fp32: p, g, buf read and p, buf written: 20 bytes per element
    assert (sgd["bytes_per_element"], sgd["roofline_bytes"]) == (20.0, 20.0)


@pytest.mark.skipif(build.cannot_build() is not None, reason=f"cannot compile: {build.cannot_build()}")
def test_the_cuda_rows(tmp_path, capsys):
    """Every kernel of the extension built for sm_80 and sm_90 (the build test_cuda_build.py
    makes, reused) gets a row, and every streaming kernel moves its roofline row with 128-bit
    accesses, without spills."""
    out = tmp_path / "static.json"
    code = static.main(["--backend", "cuda", "--arch", "80", "90", "--json", str(out), "--check"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert any(k.startswith("elementwise_kernel<Sgd<true>") for k in kernels)
    assert any(k.startswith("two_pass_apply_kernel<Lars") for k in kernels)
    streaming = [r for r in rows if r["roofline_bytes"] is not None and r["kernel"].startswith(
        ("elementwise_kernel", "quant8", "two_pass"))]
    assert streaming and all(r["matched"] for r in streaming)
    assert all(not r["spill_bytes"] for r in rows)
