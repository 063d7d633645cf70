"""CI compile check of the CUDA extension: no GPU needed, only nvcc.

The extension is compiled for sm_80 and sm_90 (``fusedopt.build``, with ``-Xptxas -v``; a
build of the same sources and flags in the cache is reused). The tests fail on a compile
error, on any register spill ptxas reports, and on a kernel whose SASS has no 128-bit global
load (``LDG.E.128``) or, for a kernel that writes tensors, no 128-bit store (``STG.E.128``):
the vector path of every stream is what makes the kernels run at memory bandwidth, and it is
what quietly disappears when the compiler cannot prove an address space or an alignment.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fusedopt import build

ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(build.cannot_build() is not None, reason=f"cannot compile: {build.cannot_build()}")

# Kernels that move whole tensors, and whether they write them. Helpers that touch only a
# handful of values (the norm's finishing block, the tests' stand-alone quantizer) are not
# main loops.
KERNELS = {
    "elementwise_kernel": True,
    "quant8_kernel": True,
    "quant8_wide_kernel": True,
    "two_pass_norms_kernel": True,  # LAMB, LARS pass 1, fp32 states written
    "two_pass_norms_only_kernel": False,  # pass 1 with 8-bit states (or none): writes no tensor
    "two_pass_apply_kernel": True,
    "norm_partials_kernel": False,
}
HELPERS = ("norm_finish_kernel", "quantize_kernel")


def find_cuobjdump() -> str | None:
    from fusedopt import static

    return static.find_cuobjdump()


@pytest.fixture(scope="module")
def library() -> Path:
    """The extension built for sm_80 and sm_90 (a compile error fails here, with its log)."""
    return build.build(";".join(f"{a[0]}.{a[1]}" for a in ARCHS))


def ptxas_reports(log: str) -> dict[tuple[str, str], str]:
    """(kernel, arch) -> the ptxas line of its stack frame and spills."""
    reports = {}
    pattern = re.compile(
        r"Compiling entry function '(\w+)' for '(sm_\d+)'\s*\n"
        r"(?:.*\n)*?.*Function properties for \1\s*\n\s*(.*spill.*)"
    )
    for name, arch, line in pattern.findall(log):
        reports[(name, arch)] = line.strip()
    return reports


def sass_functions(sass: str) -> dict[tuple[str, str], str]:
    """(kernel, arch) -> its SASS."""
    functions = {}
    for block in re.split(r"\n(?=\s*arch = )", sass):
        arch = re.search(r"arch = (sm_\d+)", block)
        if not arch:
            continue
        parts = re.split(r"\n\s*Function : (\S+)\n", block)
        for name, body in zip(parts[1::2], parts[2::2]):
            functions[(name, arch.group(1))] = body
    return functions


def kernel_kind(mangled: str) -> str | None:
    return next((k for k in (*KERNELS, *HELPERS) if k in mangled), None)


def spills(reports: dict[tuple[str, str], str]) -> dict[str, str]:
    """The kernels whose ptxas report shows a spill (or a stack frame used for one)."""
    return {
        f"{name} ({arch})": line
        for (name, arch), line in reports.items()
        if not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line)
    }


def vector_access_problems(functions: dict[tuple[str, str], str]) -> list[str]:
    """Main-loop kernels without a 128-bit global load (or store, for writers), or with generic
    loads and stores."""
    problems = []
    for (name, arch), body in functions.items():
        kind = kernel_kind(name)
        if kind not in KERNELS:
            continue
        if not re.search(r"\bLDG\.E(\.\w+)*\.128\b", body):
            problems.append(f"{name} ({arch}): no LDG.E.128")
        if KERNELS[kind] and not re.search(r"\bSTG\.E(\.\w+)*\.128\b", body):
            problems.append(f"{name} ({arch}): no STG.E.128")
        if re.search(r"\b(LD|ST)\.E", body):
            problems.append(f"{name} ({arch}): generic LD/ST (an address the compiler did not know was global)")
    return problems


def test_compiles_for_both_architectures(library):
    log = (library.parent / "build.log").read_text()
    reports = ptxas_reports(log)
    for arch in ARCHS:
        kinds = {kernel_kind(name) for name, a in reports if a == f"sm_{arch}"}
        assert set(KERNELS) <= kinds, f"sm_{arch}: kernels missing from the ptxas report: {set(KERNELS) - kinds}"


def test_no_register_spills(library):
    reports = ptxas_reports((library.parent / "build.log").read_text())
    assert reports, "no ptxas report in the build log (is -Xptxas -v in the flags?)"
    found = spills(reports)
    assert not found, "register spills:\n" + "\n".join(f"  {k}: {v}" for k, v in found.items())


def test_main_loops_use_128_bit_accesses(library):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    sass = subprocess.run([cuobjdump, "-sass", str(library)], check=True, capture_output=True, text=True).stdout
    functions = sass_functions(sass)
    assert functions, "cuobjdump found no SASS in the extension"
    for arch in ARCHS:
        found = {kernel_kind(n) for n, a in functions if a == f"sm_{arch}"}
        assert set(KERNELS) <= found, f"sm_{arch}: kernels missing from the SASS: {set(KERNELS) - found}"
    problems = vector_access_problems(functions)
    assert not problems, "\n".join(problems)


# The checks themselves, on made-up compiler output: they must see what they look for.

_LOG = """ptxas info    : Compiling entry function '_ZN8fusedopt18elementwise_kernelIfE' for 'sm_90'
ptxas info    : Function properties for _ZN8fusedopt18elementwise_kernelIfE
    24 bytes stack frame, 20 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 128 registers
ptxas info    : Compiling entry function '_ZN8fusedopt13quant8_kernelIfE' for 'sm_80'
ptxas info    : Function properties for _ZN8fusedopt13quant8_kernelIfE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

_SASS = """
	code for sm_90
		Function : _ZN8fusedopt18elementwise_kernelIfE
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   STG.E.64 desc[UR4][R2.64], R4 ;
		Function : _ZN8fusedopt20norm_partials_kernelIfE
        /*0100*/                   LD.E.128 R4, [R2.64] ;
"""


def test_the_checks_see_spills_and_scalar_accesses():
    reports = ptxas_reports(_LOG)
    assert set(reports) == {("_ZN8fusedopt18elementwise_kernelIfE", "sm_90"), ("_ZN8fusedopt13quant8_kernelIfE", "sm_80")}
    assert list(spills(reports)) == ["_ZN8fusedopt18elementwise_kernelIfE (sm_90)"]
    functions = sass_functions("arch = sm_90" + _SASS)
    assert set(functions) == {("_ZN8fusedopt18elementwise_kernelIfE", "sm_90"), ("_ZN8fusedopt20norm_partials_kernelIfE", "sm_90")}
    problems = vector_access_problems(functions)
    assert any("elementwise_kernel" in p and "no STG.E.128" in p for p in problems)
    assert any("norm_partials_kernel" in p and "no LDG.E.128" in p for p in problems)
    assert any("norm_partials_kernel" in p and "generic" in p for p in problems)
    assert not any("elementwise_kernel" in p and "LDG" in p for p in problems)
