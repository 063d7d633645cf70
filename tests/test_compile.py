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
    "table": "*i64", "work": "*i32", "counters": "*i32", "scalars": "*fp32", "hyper_values": "*fp32",
    "codebook": "*fp32", "partials": "*fp32", "norms": "*fp32", "out": "*fp32",
}
_INTS = {"seed", "n", "offset"}
#: Tuple arguments of fp32 values (the two-pass kernels' runtime hyper-parameters): a case gives
#: the tuple's length under the argument's name among its constexprs.
_FP32_TUPLES = {"hypers"}


def _family(family, group: dict, in_memory: bool = False) -> dict:
    """The constexprs that make the generic kernels ``family``'s for ``group`` (hyper-parameters
    as kernel arguments, or all read from memory; the per-step derivation's likewise: see
    :func:`_steps`)."""
    import torch

    hypers = family.hypers(group, torch.device("cpu"))
    return dict(MATH=family.math, FLAGS=family.flags(group), HYPERS=type(hypers),
                IN_MEMORY=(in_memory,) * len(hypers), DERIVED=family.derived, **_steps(family, group, in_memory))


def _steps(family, group: dict, in_memory: bool = False) -> dict:
    """The per-step derivation's constexprs for ``family`` (``MODES``, see common.step_hypers:
    all numbers, or all read from memory, a beta's log taken in the kernel)."""
    import torch

    from fusedopt.kernels import table

    if family.derive is None:
        return dict(DERIVE=None, STEP_HYPERS=None, MODES=())
    step = family.step_hypers(group, torch.device("cpu"))
    modes = tuple((2 if isinstance(v, table.LogOf) or f.startswith("log_") else 1) if in_memory else 0
                  for f, v in zip(step._fields, step))
    return dict(DERIVE=family.derive, STEP_HYPERS=type(step), MODES=modes)


def _bias_corrections(in_memory: bool = False) -> dict:
    """LAMB's per-step derivation (the two-pass kernels' ``DERIVE``)."""
    from fusedopt.kernels.common import BiasCorrections, bias_corrections_derive

    return dict(DERIVE=bias_corrections_derive, STEP_HYPERS=BiasCorrections, MODES=(2, 2) if in_memory else (0, 0))


#: LARS derives nothing per step.
NO_STEPS = dict(DERIVE=None, STEP_HYPERS=None, MODES=())


ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=True, maximize=False,
             decoupled_weight_decay=True)
ADAM_L2 = dict(ADAMW, amsgrad=False, maximize=True, decoupled_weight_decay=False)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
SGD = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
ADAGRAD = dict(lr=1e-2, lr_decay=1e-3, weight_decay=1e-2, initial_accumulator_value=0.0, eps=1e-10, maximize=False)
RMSPROP = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=1e-2, momentum=0.9, centered=True, maximize=False)


def _cases():
    """``(name, kernel, constexprs, num_warps, loads, stores)``: ``loads`` / ``stores`` list the
    bytes per element of each stream the main path reads / writes with vector accesses."""
    import triton.language as tl

    from fusedopt.kernels import adagrad, adam, elementwise, lamb, lars, lion, norm, quant, rmsprop, sgd, table, twopass

    chunk = dict(CHUNK=table.CHUNK, ALIGNED=True)
    lamb_chunk = dict(chunk, HYPER_IN_MEMORY=False)
    kernel, kernel8 = elementwise.elementwise_kernel, elementwise.elementwise8bit_kernel
    out = []
    for p_name, p_dtype, p_bytes, g_dtype, g_bytes in (
        ("fp32", tl.float32, 4, tl.float32, 4),
        ("bf16", tl.bfloat16, 2, tl.bfloat16, 2),  # with stochastic rounding
        ("fp32-bf16grad", tl.float32, 4, tl.bfloat16, 2),
    ):
        dt = dict(P_DTYPE=p_dtype, G_DTYPE=g_dtype)
        sr = p_dtype == tl.bfloat16
        out.append((f"adam-amsgrad-{p_name}", kernel,
                    dict(**dt, **_family(adam.ADAM, ADAMW), STATES=3, STOCHASTIC=sr,
                         BLOCK=elementwise.BLOCK, **chunk), elementwise.NUM_WARPS, [p_bytes, g_bytes, 4, 4, 4],
                    [p_bytes, 4, 4, 4]))
        out.append((f"norm-2-{p_name}", norm.norm_partial_kernel,
                    dict(G_DTYPE=g_dtype, ORD=2, ALIGNED=True, CHUNK=table.CHUNK, BLOCK=norm.BLOCK),
                    norm.NUM_WARPS, [g_bytes], []))
        if p_name == "fp32-bf16grad":
            continue  # the other kernels read grads the same way
        out.append((f"lion-{p_name}", kernel,
                    dict(**dt, **_family(lion.LION, LION), STATES=1, STOCHASTIC=sr, BLOCK=elementwise.BLOCK,
                         **chunk), elementwise.NUM_WARPS, [p_bytes, g_bytes, 4], [p_bytes, 4]))
        for name, family, group, states in (("sgd-nesterov", sgd.SGD, SGD, 1), ("adagrad", adagrad.ADAGRAD, ADAGRAD, 1),
                                            ("rmsprop-centered-momentum", rmsprop.RMSPROP, RMSPROP, 3)):
            out.append((f"{name}-{p_name}", kernel,
                        dict(**dt, **_family(family, group), STATES=states, STOCHASTIC=sr,
                             BLOCK=elementwise.BLOCK, **chunk), elementwise.NUM_WARPS,
                        [p_bytes, g_bytes] + [4] * states, [p_bytes] + [4] * states))
        two = dict(BLOCK=twopass.BLOCK, **lamb_chunk)
        out.append((f"lamb-norms-{p_name}", twopass.norms_kernel,
                    dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(True,), STATES=2, **dt, **two, **_bias_corrections(),
                         FINISH_BLOCK=twopass.FINISH_BLOCK),
                    twopass.NUM_WARPS, [p_bytes, g_bytes, 4, 4], [4, 4]))
        out.append((f"lamb-apply-{p_name}", twopass.apply_kernel,
                    dict(hypers=7, DIRECTION=lamb.lamb_stored_direction, FINISH=lamb.lamb_trust_ratio, FLAGS=(True,),
                         STATES=2, READS_GRAD=False, **dt, STOCHASTIC=sr, **two, **_bias_corrections()), twopass.NUM_WARPS, [p_bytes, 4, 4], [p_bytes]))
        out.append((f"lars-norms-{p_name}", twopass.norms_kernel,
                    dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(True, True), STATES=1, **dt, **two, **NO_STEPS,
                         FINISH_BLOCK=twopass.FINISH_BLOCK),
                    twopass.NUM_WARPS, [p_bytes, g_bytes, 4], [4]))
        out.append((f"lars-apply-nesterov-{p_name}", twopass.apply_kernel,
                    dict(hypers=5, DIRECTION=lars.lars_stored_direction, FINISH=lars.lars_clip, FLAGS=(True, True), STATES=1,
                         READS_GRAD=True, **dt, STOCHASTIC=sr, **two, **NO_STEPS), twopass.NUM_WARPS,
                    [p_bytes, g_bytes, 4], [p_bytes]))
        for block_size in (256, 2048) if sr else (256,):
            eight = dict(ALIGNED=True, **quant.layout(block_size))
            out.append((f"adam8bit-amsgrad-{block_size}-{p_name}", kernel8,
                        dict(**dt, **_family(adam.ADAM, ADAMW), SIGNED=(True, False, False), STOCHASTIC=sr,
                             **eight), quant.NUM_WARPS, [p_bytes, g_bytes, 1, 1, 1], [p_bytes, 1, 1, 1]))
            out.append((f"lion8bit-{block_size}-{p_name}", kernel8,
                        dict(**dt, **_family(lion.LION, LION), SIGNED=(True,), STOCHASTIC=sr, **eight),
                        quant.NUM_WARPS, [p_bytes, g_bytes, 1], [p_bytes, 1]))
            two8 = dict(HYPER_IN_MEMORY=False, **eight)
            out.append((f"lamb8bit-norms-{block_size}-{p_name}", twopass.norms8bit_kernel,
                        dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(True,), STATES=2, CODEBOOKS=(1, 0),
                             **dt, **two8, **_bias_corrections(), FINISH_BLOCK=twopass.FINISH_BLOCK), quant.NUM_WARPS, [p_bytes, g_bytes, 1, 1], []))
            out.append((f"lamb8bit-apply-{block_size}-{p_name}", twopass.apply8bit_kernel,
                        dict(hypers=7, UPDATE=lamb.lamb_update, FINISH=lamb.lamb_trust_ratio, FLAGS=(True,), STATES=2,
                             CODEBOOKS=(1, 0), **dt, STOCHASTIC=sr, **two8, **_bias_corrections()), quant.NUM_WARPS,
                        [p_bytes, g_bytes, 1, 1], [p_bytes, 1, 1]))
            if block_size != 256:
                continue  # LARS8bit (one state) runs the LAMB8bit kernels' code with less to hold
            out.append((f"lars8bit-norms-{block_size}-{p_name}", twopass.norms8bit_kernel,
                        dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(True, True), STATES=1, CODEBOOKS=(1,),
                             **dt, **two8, **NO_STEPS, FINISH_BLOCK=twopass.FINISH_BLOCK), quant.NUM_WARPS, [p_bytes, g_bytes, 1], []))
            out.append((f"lars8bit-apply-{block_size}-{p_name}", twopass.apply8bit_kernel,
                        dict(hypers=5, UPDATE=lars.lars_update, FINISH=lars.lars_clip, FLAGS=(True, True), STATES=1,
                             CODEBOOKS=(1,), **dt, STOCHASTIC=sr, **two8, **NO_STEPS), quant.NUM_WARPS,
                        [p_bytes, g_bytes, 1], [p_bytes, 1]))
            for name, family, group, signed in (("sgd8bit", sgd.SGD, SGD, (True,)),
                                                ("adagrad8bit", adagrad.ADAGRAD, ADAGRAD, (False,)),
                                                ("rmsprop8bit-centered-momentum", rmsprop.RMSPROP, RMSPROP,
                                                 (False, True, True))):
                out.append((f"{name}-{block_size}-{p_name}", kernel8,
                            dict(**dt, **_family(family, group), SIGNED=signed,
                                 STOCHASTIC=sr, **eight), quant.NUM_WARPS,
                            [p_bytes, g_bytes] + [1] * len(signed), [p_bytes] + [1] * len(signed)))
    # the other switches compile too: fp16, tensor hyper-parameters, unaligned tables, Adam's L2
    # decay and maximize, LAMB without bias correction, a block size that is not a power of two
    other = dict(CHUNK=table.CHUNK, ALIGNED=False)
    fp16 = dict(P_DTYPE=tl.float16, G_DTYPE=tl.float16)
    out.append(("adam-variants-fp16", kernel,
                dict(**fp16, **_family(adam.ADAM, ADAM_L2, True), STATES=2, STOCHASTIC=False,
                     BLOCK=elementwise.BLOCK, **other), elementwise.NUM_WARPS, [], []))
    out.append(("lion-variants-fp16", kernel,
                dict(**fp16, **_family(lion.LION, LION, True), STATES=1, STOCHASTIC=False,
                     BLOCK=elementwise.BLOCK, **other), elementwise.NUM_WARPS, [], []))
    # SGD without momentum (no state), RMSprop with neither momentum nor centering, Adagrad maximizing
    plain = dict(ALIGNED=True, CHUNK=table.CHUNK, BLOCK=elementwise.BLOCK, STOCHASTIC=False, P_DTYPE=tl.float32,
                 G_DTYPE=tl.float32)
    out.append(("sgd-plain-variants-fp32", kernel,
                dict(**_family(sgd.SGD, dict(SGD, momentum=0.0, nesterov=False), True), STATES=0, **plain),
                elementwise.NUM_WARPS, [4, 4], [4]))
    out.append(("rmsprop-plain-variants-fp32", kernel,
                dict(**_family(rmsprop.RMSPROP, dict(RMSPROP, momentum=0.0, centered=False, maximize=True),
                                        True), STATES=1, **plain), elementwise.NUM_WARPS, [4, 4, 4], [4, 4]))
    out.append(("adagrad-variants-fp16", kernel,
                dict(**fp16, **_family(adagrad.ADAGRAD, dict(ADAGRAD, maximize=True), True), STATES=1,
                     STOCHASTIC=False, BLOCK=elementwise.BLOCK, **other), elementwise.NUM_WARPS, [], []))
    two = dict(BLOCK=twopass.BLOCK, HYPER_IN_MEMORY=True, **other)
    out.append(("lamb-norms-variants-fp16", twopass.norms_kernel,
                dict(hypers=7, UPDATE=lamb.lamb_update, FLAGS=(False,), STATES=2, **fp16, **two,
                     **_bias_corrections(True), FINISH_BLOCK=twopass.FINISH_BLOCK), twopass.NUM_WARPS, [], []))
    out.append(("lamb-apply-variants-fp16", twopass.apply_kernel,
                dict(hypers=7, DIRECTION=lamb.lamb_stored_direction, FINISH=lamb.lamb_trust_ratio, FLAGS=(False,),
                     STATES=2, READS_GRAD=False, **fp16, STOCHASTIC=False, **two, **_bias_corrections(True)),
                twopass.NUM_WARPS, [], []))
    # LARS: momentum without nesterov (pass 2 reads no grad), no momentum (no state)
    for flags, states in (((False, True), 1), ((False, False), 0)):
        name = "momentum" if states else "no-momentum"
        out.append((f"lars-norms-{name}-fp32", twopass.norms_kernel,
                    dict(hypers=5, UPDATE=lars.lars_update, FLAGS=flags, STATES=states, P_DTYPE=tl.float32,
                         G_DTYPE=tl.float32, BLOCK=twopass.BLOCK, **lamb_chunk, **NO_STEPS,
                         FINISH_BLOCK=twopass.FINISH_BLOCK),
                    twopass.NUM_WARPS, [4, 4] + [4] * states, [4] * states))
        out.append((f"lars-apply-{name}-fp32", twopass.apply_kernel,
                    dict(hypers=5, DIRECTION=lars.lars_stored_direction, FINISH=lars.lars_clip, FLAGS=flags,
                         STATES=states, READS_GRAD=not states, P_DTYPE=tl.float32, G_DTYPE=tl.float32,
                         STOCHASTIC=False, BLOCK=twopass.BLOCK, **lamb_chunk, **NO_STEPS), twopass.NUM_WARPS,
                    [4] + [4] * (1 - states) + [4] * states, [4]))
    out.append(("lars-norms-variants-fp16", twopass.norms_kernel,
                dict(hypers=5, UPDATE=lars.lars_update, FLAGS=(False, True), STATES=1, **fp16, **two, **NO_STEPS,
                     FINISH_BLOCK=twopass.FINISH_BLOCK), twopass.NUM_WARPS, [], []))
    eight96 = dict(ALIGNED=True, **quant.layout(96))
    out.append(("adam8bit-96-variants-fp16", kernel8,
                dict(**fp16, **_family(adam.ADAM, ADAM_L2, True), SIGNED=(True, False), STOCHASTIC=False,
                     **eight96), quant.NUM_WARPS, [2, 2, 1, 1], [2, 1, 1]))
    out.append(("lion8bit-96-fp16", kernel8,
                dict(**fp16, **_family(lion.LION, LION, True), SIGNED=(True,), STOCHASTIC=False, **eight96),
                quant.NUM_WARPS, [2, 2, 1], [2, 1]))
    out.append(("lamb8bit-apply-96-variants-fp16", twopass.apply8bit_kernel,
                dict(hypers=7, UPDATE=lamb.lamb_update, FINISH=lamb.lamb_trust_ratio, FLAGS=(False,), STATES=2,
                     CODEBOOKS=(1, 0), **fp16, STOCHASTIC=False, HYPER_IN_MEMORY=True, **eight96,
                     **_bias_corrections(True)), quant.NUM_WARPS,
                [2, 2, 1, 1], [2, 1, 1]))
    out.append(("lars8bit-apply-96-variants-fp16", twopass.apply8bit_kernel,
                dict(hypers=5, UPDATE=lars.lars_update, FINISH=lars.lars_clip, FLAGS=(False, True), STATES=1,
                     CODEBOOKS=(1,), **fp16, STOCHASTIC=False, HYPER_IN_MEMORY=True, **eight96, **NO_STEPS),
                quant.NUM_WARPS, [2, 2, 1], [2, 1]))
    out.append(("norm-inf", norm.norm_partial_kernel,
                dict(G_DTYPE=tl.float32, ORD=0, ALIGNED=True, CHUNK=table.CHUNK, BLOCK=norm.BLOCK),
                norm.NUM_WARPS, [4], []))
    out.append(("norm-finish", norm.norm_finish_kernel, dict(ORD=2, BLOCK=norm.FINISH_BLOCK), 4, [], []))
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

    import triton.language as tl

    from fusedopt.kernels import elementwise, quant, twopass

    ptxas = _ptxas()
    report = {}
    for name, kernel, constexprs, num_warps, loads, stores in _cases():
        signature, attrs = {}, {}
        constexprs = dict(constexprs)
        # the register limit the launchers ask of ptxas (quant.register_limit)
        if kernel is elementwise.elementwise8bit_kernel:
            limit = quant.register_limit(constexprs["STOCHASTIC"])
        elif kernel is twopass.apply8bit_kernel:
            limit = quant.register_limit(constexprs["P_DTYPE"] in (tl.bfloat16, tl.float16))
        else:
            limit = {}
        tuples = {arg: constexprs.pop(arg) for arg in _FP32_TUPLES if arg in constexprs}
        for i, arg in enumerate(kernel.arg_names):
            if arg in tuples:
                signature[arg] = ("fp32",) * tuples[arg]
            elif arg in constexprs:
                signature[arg] = "constexpr"
            elif arg == "hyper_values" and "HYPERS" in constexprs:  # a family's struct (elementwise)
                fields = ["*fp32" if m else "fp32" for m in constexprs["IN_MEMORY"]]
                signature[arg] = constexprs["HYPERS"](*fields)
                attrs.update({(i, j): [["tt.divisibility", 16]] for j, f in enumerate(fields) if f == "*fp32"})
            elif arg == "step_pointers":  # the per-step derivation's hyper-parameters in memory
                signature[arg] = ("*fp32",) * max(1, len(constexprs["MODES"]))
                attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(len(signature[arg]))})
            elif arg in _POINTERS:
                signature[arg] = _POINTERS[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in _INTS:
                signature[arg] = "i32"
            elif kernel.params[i].annotation == "fp64":  # annotated tl.float64 (the per-step derivation's)
                signature[arg] = "fp64"
            else:
                signature[arg] = "fp32"
        for cc in CCS if "variants" not in name else CCS[:1]:  # the switches compile alike on both
            source = triton.compiler.ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": num_warps, "enable_fp_fusion": False, **limit})
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


def _launch_all() -> list[str]:
    """Runs in the subprocess (``--launch``): families' host steps on CPU tensors, every launch
    intercepted and taken through what ``JITFunction.run`` does before the driver (the
    binder's specialization of every argument, ``_pack_args``, ``triton.compile`` for sm_90):
    the hyper-parameter structs (numbers and tensors), the constexpr math functions, flag
    structs and struct classes, which neither the interpreter nor ``_compile_all`` specializes.
    Uses those two Triton internals (checked with Triton 3.6 and 3.8). Returns the kernels
    compiled, in launch order."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fusedopt.kernels import adam, elementwise, sgd
    from fusedopt.step import Batch

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    compiled = []

    def launch(self, grid):
        def compile_only(*args, **kwargs):
            binder = create_function_from_signature(self.signature, self.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
            triton.compile(triton.compiler.ASTSource(self, signature, constexprs, attrs), target=backend.target,
                           options=options.__dict__)
            compiled.append(self.__name__)
        return compile_only

    JITFunction.__getitem__ = launch
    for family, group, quantized in ((adam.ADAM, dict(ADAMW, lr=torch.tensor(1e-3)), False),
                                     (adam.ADAM, ADAMW, True),
                                     (sgd.SGD, dict(SGD, momentum=0.0, nesterov=False), False)):
        params = [torch.randn(n) for n in (257, 4096)]
        names = family.states(group)
        state = {n: [torch.zeros(p.shape, dtype=torch.uint8 if quantized else torch.float32) for p in params]
                 for n in names}
        state.update({n + "_absmax": [torch.zeros(-(-p.numel() // 256)) for p in params] for n in names})
        elementwise.step(Batch(params=params, grads=[torch.randn_like(p) for p in params], state=state,
                               steps=[torch.zeros(()) for _ in params], group=group,
                               scalars=torch.tensor([1.0, 0.0, 0.0]), quantized=quantized, block_size=256,
                               positions=[0, 1]), family)
    return compiled


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


@pytest.mark.full  # every kernel for sm_80 and sm_90, 94 compiles: 142 s on a shared 2-core machine
def test_kernels_compile_vectorized_without_spills(report):
    problems = []
    for name, r in sorted(report.items()):
        registers = re.findall(r"Used (\d+) registers", r["ptxas"])
        print(f"{name}: {registers[0] if registers else '?'} registers, {r['ld_v4']} ld.v4, {r['st_v4']} st.v4")  # -s

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


@pytest.mark.full  # three families' launches specialized and compiled for sm_90: 14 s here
def test_launch_path_specializes_every_argument(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, __file__, "--launch"], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, \
        f"specializing the launches failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    update, update8 = "elementwise_kernel", "elementwise8bit_kernel"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [update, update8, update]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_launch_all() if "--launch" in sys.argv else _compile_all()))
