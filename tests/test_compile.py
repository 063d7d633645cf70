"""Every Triton kernel compiles for real GPUs, with 16-byte accesses and no spills; no GPU needed.

The interpreter replaces ``triton.jit``, so a kernel can pass every interpreted test and still
not compile, or compile to scalar accesses. Here each kernel is compiled for sm_80 and sm_90
(``triton.compile(..., target=GPUTarget("cuda", cc, 32))``) in a subprocess without
``TRITON_INTERPRET``, in the configuration the launchers use, and its PTX must show at least
the 16-byte vector loads and stores that the main (unmasked) path needs for every stream it
reads and writes; ``ptxas -v`` must report no spills.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CCS = (80, 90)

_POINTERS = {
    "table": "*i64", "work": "*i64", "first": "*i32", "steps": "*fp32", "scalars": "*fp32",
    "hyper_values": "*fp32", "code_values": "*fp32", "code_mids": "*fp32", "partials": "*fp32",
    "ratios": "*fp32", "scales": "*fp32", "out": "*fp32",
}
_INTS = {"seed", "n", "offset"}
#: Tuple arguments of fp32 values (the two-pass kernels' runtime hyper-parameters): a case gives
#: the tuple's length under the argument's name among its constexprs.
_FP32_TUPLES = {"hypers"}


def _cases():
    """``(name, kernel, constexprs, num_warps, loads, stores)``: ``loads`` / ``stores`` list the
    bytes per element of each stream the main path reads / writes with vector accesses."""
    import triton.language as tl

    from fusedopt.kernels import adam, lamb, lars, lion, norm, quant, table, twopass
    from fusedopt.kernels.common import step_kernel

    chunk = dict(CHUNK=table.CHUNK, ALIGNED=True, HYPER_IN_MEMORY=False)
    out = []
    for p_name, p_dtype, p_bytes, g_dtype, g_bytes in (
        ("fp32", tl.float32, 4, tl.float32, 4),
        ("bf16", tl.bfloat16, 2, tl.bfloat16, 2),  # with stochastic rounding
        ("fp32-bf16grad", tl.float32, 4, tl.bfloat16, 2),
    ):
        dt = dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype)
        sr = p_dtype == tl.bfloat16
        out.append((f"adam-amsgrad-{p_name}", adam.adam_kernel,
                    dict(WIDTH=8, **dt, AMSGRAD=True, MAXIMIZE=False, DECOUPLED=True, STOCHASTIC=sr,
                         BLOCK=adam.BLOCK, **chunk), adam.NUM_WARPS, [p_bytes, g_bytes, 4, 4, 4], [p_bytes, 4, 4, 4]))
        out.append((f"norm-2-{p_name}", norm.norm_partial_kernel,
                    dict(G_DTYPE=g_dtype, ORD=2, ALIGNED=True, CHUNK=table.CHUNK, BLOCK=norm.BLOCK),
                    norm.NUM_WARPS, [g_bytes], []))
        if p_name == "fp32-bf16grad":
            continue  # the other kernels read grads the same way
        out.append((f"lion-{p_name}", lion.lion_kernel,
                    dict(WIDTH=6, **dt, STOCHASTIC=sr, BLOCK=lion.BLOCK, **chunk), lion.NUM_WARPS,
                    [p_bytes, g_bytes, 4], [p_bytes, 4]))
        two = dict(BLOCK=twopass.BLOCK, **chunk)
        out.append((f"lamb-norms-{p_name}", twopass.norms_kernel,
                    dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(True,), STATES=2, WIDTH=8, **dt, **two),
                    twopass.NUM_WARPS, [p_bytes, g_bytes, 4, 4], [4, 4]))
        out.append((f"lamb-apply-{p_name}", twopass.apply_kernel,
                    dict(hypers=7, DIRECTION=lamb.lamb_stored_direction, FLAGS=(True,), STATES=2, READS_GRAD=False,
                         WIDTH=8, **dt, STOCHASTIC=sr, **two), twopass.NUM_WARPS, [p_bytes, 4, 4], [p_bytes]))
        out.append((f"lars-norms-{p_name}", twopass.norms_kernel,
                    dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(True, True), STATES=1, WIDTH=7, **dt, **two),
                    twopass.NUM_WARPS, [p_bytes, g_bytes, 4], [4]))
        out.append((f"lars-apply-nesterov-{p_name}", twopass.apply_kernel,
                    dict(hypers=5, DIRECTION=lars.lars_stored_direction, FLAGS=(True, True), STATES=1,
                         READS_GRAD=True, WIDTH=7, **dt, STOCHASTIC=sr, **two), twopass.NUM_WARPS,
                    [p_bytes, g_bytes, 4], [p_bytes]))
        for block_size in (256, 2048) if sr else (256,):
            eight = dict(ALIGNED=True, HYPER_IN_MEMORY=False, **quant.layout(block_size))
            out.append((f"adam8bit-amsgrad-{block_size}-{p_name}", adam.adam8bit_kernel,
                        dict(WIDTH=11, **dt, AMSGRAD=True, MAXIMIZE=False, DECOUPLED=True, STOCHASTIC=sr,
                             **eight), quant.NUM_WARPS, [p_bytes, g_bytes, 1, 1, 1], [p_bytes, 1, 1, 1]))
            out.append((f"lion8bit-{block_size}-{p_name}", lion.lion8bit_kernel,
                        dict(WIDTH=7, **dt, STOCHASTIC=sr, **eight), quant.NUM_WARPS,
                        [p_bytes, g_bytes, 1], [p_bytes, 1]))
            out.append((f"lamb8bit-norms-{block_size}-{p_name}", twopass.norms8bit_kernel,
                        dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(True,), STATES=2, CODEBOOKS=(1, 0),
                             WIDTH=10, **dt, **eight), quant.NUM_WARPS, [p_bytes, g_bytes, 1, 1], []))
            out.append((f"lamb8bit-apply-{block_size}-{p_name}", twopass.apply8bit_kernel,
                        dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(True,), STATES=2, CODEBOOKS=(1, 0),
                             WIDTH=10, **dt, STOCHASTIC=sr, **eight), quant.NUM_WARPS,
                        [p_bytes, g_bytes, 1, 1], [p_bytes, 1, 1]))
            if block_size != 256:
                continue  # LARS8bit (one state) runs the LAMB8bit kernels' code with less to hold
            out.append((f"lars8bit-norms-{block_size}-{p_name}", twopass.norms8bit_kernel,
                        dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(True, True), STATES=1, CODEBOOKS=(1,),
                             WIDTH=8, **dt, **eight), quant.NUM_WARPS, [p_bytes, g_bytes, 1], []))
            out.append((f"lars8bit-apply-{block_size}-{p_name}", twopass.apply8bit_kernel,
                        dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(True, True), STATES=1, CODEBOOKS=(1,),
                             WIDTH=8, **dt, STOCHASTIC=sr, **eight), quant.NUM_WARPS,
                        [p_bytes, g_bytes, 1], [p_bytes, 1]))
    # the other switches compile too: fp16, tensor hyper-parameters, unaligned tables, Adam's L2
    # decay and maximize, LAMB without bias correction, a block size that is not a power of two
    other = dict(CHUNK=table.CHUNK, ALIGNED=False, HYPER_IN_MEMORY=True)
    fp16 = dict(P_DTYPE=tl.float16, G_DTYPE=tl.float16)
    out.append(("adam-variants-fp16", adam.adam_kernel,
                dict(WIDTH=7, **fp16, AMSGRAD=False, MAXIMIZE=True, DECOUPLED=False, STOCHASTIC=False,
                     BLOCK=adam.BLOCK, **other), adam.NUM_WARPS, [], []))
    out.append(("lion-variants-fp16", lion.lion_kernel,
                dict(WIDTH=6, **fp16, STOCHASTIC=False, BLOCK=lion.BLOCK, **other), lion.NUM_WARPS, [], []))
    two = dict(BLOCK=twopass.BLOCK, **other)
    out.append(("lamb-norms-variants-fp16", twopass.norms_kernel,
                dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(False,), STATES=2, WIDTH=8, **fp16, **two),
                twopass.NUM_WARPS, [], []))
    out.append(("lamb-apply-variants-fp16", twopass.apply_kernel,
                dict(hypers=7, DIRECTION=lamb.lamb_stored_direction, FLAGS=(False,), STATES=2, READS_GRAD=False,
                     WIDTH=8, **fp16, STOCHASTIC=False, **two), twopass.NUM_WARPS, [], []))
    # LARS: momentum without nesterov (pass 2 reads no grad), no momentum (no state)
    for flags, states, width in (((False, True), 1, 7), ((False, False), 0, 6)):
        name = "momentum" if states else "no-momentum"
        out.append((f"lars-norms-{name}-fp32", twopass.norms_kernel,
                    dict(hypers=5, UPDATE=lars.lars_update, FLAGS=flags, STATES=states, WIDTH=width,
                         P_DTYPE=tl.float32, G_DTYPE=tl.float32, BLOCK=twopass.BLOCK, **chunk), twopass.NUM_WARPS,
                    [4, 4] + [4] * states, [4] * states))
        out.append((f"lars-apply-{name}-fp32", twopass.apply_kernel,
                    dict(hypers=5, DIRECTION=lars.lars_stored_direction, FLAGS=flags, STATES=states,
                         READS_GRAD=not states, WIDTH=width, P_DTYPE=tl.float32, G_DTYPE=tl.float32,
                         STOCHASTIC=False, BLOCK=twopass.BLOCK, **chunk), twopass.NUM_WARPS,
                    [4] + [4] * (1 - states) + [4] * states, [4]))
    out.append(("lars-norms-variants-fp16", twopass.norms_kernel,
                dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(False, True), STATES=1, WIDTH=7, **fp16, **two),
                twopass.NUM_WARPS, [], []))
    eight96 = dict(ALIGNED=True, HYPER_IN_MEMORY=True, **quant.layout(96))
    out.append(("adam8bit-96-variants-fp16", adam.adam8bit_kernel,
                dict(WIDTH=9, **fp16, AMSGRAD=False, MAXIMIZE=True, DECOUPLED=False, STOCHASTIC=False, **eight96),
                quant.NUM_WARPS, [2, 2, 1, 1], [2, 1, 1]))
    out.append(("lion8bit-96-fp16", lion.lion8bit_kernel, dict(WIDTH=7, **fp16, STOCHASTIC=False, **eight96),
                quant.NUM_WARPS, [2, 2, 1], [2, 1]))
    out.append(("lamb8bit-apply-96-variants-fp16", twopass.apply8bit_kernel,
                dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(False,), STATES=2, CODEBOOKS=(1, 0), WIDTH=10,
                     **fp16, STOCHASTIC=False, **eight96), quant.NUM_WARPS, [2, 2, 1, 1], [2, 1, 1]))
    out.append(("lars8bit-apply-96-variants-fp16", twopass.apply8bit_kernel,
                dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(False, True), STATES=1, CODEBOOKS=(1,), WIDTH=8,
                     **fp16, STOCHASTIC=False, **eight96), quant.NUM_WARPS, [2, 2, 1], [2, 1]))
    out.append(("norm-inf", norm.norm_partial_kernel,
                dict(G_DTYPE=tl.float32, ORD=0, ALIGNED=True, CHUNK=table.CHUNK, BLOCK=norm.BLOCK),
                norm.NUM_WARPS, [4], []))
    out.append(("norm-finish", norm.norm_finish_kernel, dict(ORD=2, BLOCK=norm.FINISH_BLOCK), 4, [], []))
    for finish_name, finish, n_hypers in (("lamb", lamb.lamb_trust_ratio, 7), ("lars", lars.lars_clip, 5)):
        for in_memory in (False, True):
            out.append((f"{finish_name}-finish{'-variants-in-memory' if in_memory else ''}", twopass.finish_kernel,
                        dict(hypers=n_hypers, FINISH=finish, FLAGS=(True, True), HYPER_IN_MEMORY=in_memory,
                             BLOCK=twopass.FINISH_BLOCK), 4, [], []))
    for in_memory in (False, True):
        out.append((f"steps-{'in-memory' if in_memory else 'args'}", step_kernel,
                    dict(WIDTH=7, STEP_COL=4, ADAM=in_memory, LR_IN_MEMORY=in_memory, BETA1_INDEX=1, BETA2_INDEX=3,
                         BETA1_IN_MEMORY=in_memory, BETA2_IN_MEMORY=in_memory, BLOCK=table.STEP_BLOCK), 4, [], []))
    out.append(("steps-adam-args", step_kernel,
                dict(WIDTH=7, STEP_COL=4, ADAM=True, LR_IN_MEMORY=False, BETA1_INDEX=1, BETA2_INDEX=3,
                     BETA1_IN_MEMORY=False, BETA2_IN_MEMORY=False, BLOCK=table.STEP_BLOCK), 4, [], []))
    out.append(("norm-1-fp16", norm.norm_partial_kernel,
                dict(G_DTYPE=tl.float16, ORD=1, ALIGNED=False, CHUNK=table.CHUNK, BLOCK=norm.BLOCK),
                norm.NUM_WARPS, [], []))
    return out


def _ptxas() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    return shutil.which("ptxas") or (str(Path("/usr/local/cuda/bin/ptxas")) if Path("/usr/local/cuda/bin/ptxas").exists() else None)


def _compile_all() -> dict:
    """Runs in the subprocess: compile every case for every cc; report what the test checks."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = _ptxas()
    report = {}
    for name, kernel, constexprs, num_warps, loads, stores in _cases():
        signature, attrs = {}, {}
        constexprs = dict(constexprs)
        tuples = {arg: constexprs.pop(arg) for arg in _FP32_TUPLES if arg in constexprs}
        for i, arg in enumerate(kernel.arg_names):
            if arg in tuples:
                signature[arg] = ("fp32",) * tuples[arg]
            elif arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in _POINTERS:
                signature[arg] = _POINTERS[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in _INTS:
                signature[arg] = "i32"
            elif kernel.params[i].annotation == "fp64":  # annotated tl.float64 (the step prologue's)
                signature[arg] = "fp64"
            else:
                signature[arg] = "fp32"
        for cc in CCS if "variants" not in name else CCS[:1]:  # the switches compile alike on both
            source = triton.compiler.ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": num_warps, "enable_fp_fusion": False})
            ptx = compiled.asm["ptx"]
            arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
            path = Path(os.environ["FUSEDOPT_PTX_DIR"]) / f"{name}-{cc}.ptx"
            path.write_text(ptx)
            result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(path), "-o", os.devnull],
                                    capture_output=True, text=True)
            report[f"{name}-sm{cc}"] = dict(
                threads=32 * num_warps,
                block=constexprs.get("BLOCK") or constexprs.get("ROWS", 1) * constexprs.get("BLOCK_PAD", 1),
                loads=loads,
                stores=stores,
                ld_v4=len(re.findall(r"\bld\.global(?:\.[\w:]+)*\.v4\.", ptx)),
                st_v4=len(re.findall(r"\bst\.global(?:\.[\w:]+)*\.v4\.", ptx)),
                ptxas_rc=result.returncode,
                ptxas=result.stdout + result.stderr,
            )
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    if _ptxas() is None:
        pytest.skip("no ptxas (neither Triton's bundled one nor CUDA's)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSEDOPT_PTX_DIR"] = str(tmp_path_factory.mktemp("ptx"))
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, f"compiling the kernels failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _vectors(streams: list[int], block: int, threads: int) -> int:
    """16-byte accesses one pass of the main loop needs for these streams (bytes/element)."""
    return sum(max(1, block * nbytes // (16 * threads)) for nbytes in streams)


@pytest.mark.full  # compiles every Triton kernel for sm_80 and sm_90: 86 s on a busy 2-core machine
def test_kernels_compile_vectorized_without_spills(report):
    problems = []
    for name, r in sorted(report.items()):
        if r["ptxas_rc"] != 0:
            problems.append(f"{name}: ptxas failed: {r['ptxas'][-500:]}")
            continue
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", r["ptxas"])
        if any(int(s) for s in spills):
            problems.append(f"{name}: ptxas reports spills: {r['ptxas'].strip()[-300:]}")
        need_ld = _vectors(r["loads"], r["block"], r["threads"]) if r["loads"] else 0
        need_st = _vectors(r["stores"], r["block"], r["threads"]) if r["stores"] else 0
        if r["ld_v4"] < need_ld:
            problems.append(f"{name}: {r['ld_v4']} ld.global.v4, the main path needs {need_ld} for streams {r['loads']}")
        if r["st_v4"] < need_st:
            problems.append(f"{name}: {r['st_v4']} st.global.v4, the main path needs {need_st} for streams {r['stores']}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_compile_all()))
