"""``python -m fusedopt static``: the roofline of every kernel, read from its compiled code.

No GPU is needed. Each kernel is compiled as its launcher runs it, for sm_80 and sm_90 (the CUDA
extension by nvcc, every instantiation the launchers dispatch to; the Triton kernels by
``triton.compile`` in the launchers' configurations), and from the SASS (``cuobjdump``) and the
assembler's report this reads, per kernel and architecture:

* **registers** per thread and **spill** bytes (stores + loads), and the **warps per SM** the
  registers allow (a block's warps fit while the SM's 64K registers last, at most 64 warps);
* the **main loop** (:mod:`fusedopt.sass`): its executed path for one full, aligned iteration,
  its **128-bit loads and stores**, its **instructions per element** (path instructions over
  the elements a thread handles per iteration) and its **bytes per element** from its 128-bit
  accesses (the streams; absmaxes and codebook gathers are the scalar loads, counted apart),
  against the family's **roofline row** for that kernel (:func:`expected`);
* the **bandwidth that instruction count allows** on the card the architecture names (one warp
  instruction per scheduler per clock, four schedulers per SM, at the boost clock): above the
  card's memory bandwidth the kernel is *memory-bound*, below it *issue-bound at N TB/s*.

``--check`` (what CI runs) exits 1 on a spill or on a kernel whose bytes per element exceed
its roofline row. Instruction counts are a model of the issue rate, not a measurement: latency,
occupancy and the memory system decide the rest, and a GPU run is the only proof.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import sass

#: The card each architecture is read against: (name, SMs, boost clock GHz, memory TB/s).
CARDS = {
    "sm_80": ("A100 SXM4 80GB", 108, 1.41, 2.039),
    "sm_90": ("H100 SXM5 80GB", 132, 1.98, 3.35),
}
SCHEDULERS = 4  # warp schedulers per SM, one instruction each per clock
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256

_DTYPE_BYTES = {"float": 4, "__nv_bfloat16": 2, "__half": 2}


@dataclass
class Row:
    backend: str
    kernel: str  # the kernel's readable name
    arch: str
    registers: int | None
    spill_bytes: int | None
    warps_per_sm: int | None
    threads: int
    elements_per_iteration: int | None  # per thread
    vector_loads: int | None  # 128-bit, per thread and iteration
    vector_stores: int | None
    scalar_loads: int | None  # narrower global loads per iteration
    shared_loads: int | None
    instructions: int | None  # on the executed path of one iteration
    instructions_per_element: float | None
    bytes_per_element: float | None  # from the 128-bit accesses
    roofline_bytes: float | None  # the family's row for this kernel
    issue_tb_s: float | None  # the bandwidth the instruction count allows
    memory_tb_s: float
    verdict: str
    matched: bool | None = None  # a full iteration moves exactly its roofline row with 128-bit accesses
    inner_loops: int = 0  # loops inside the main loop, each counted once in ``instructions``

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of spills")
        if self.bytes_per_element is not None and self.roofline_bytes is not None \
                and self.bytes_per_element > self.roofline_bytes + 1e-9:
            out.append(f"{self.bytes_per_element:g} bytes per element, above its roofline row "
                       f"{self.roofline_bytes:g}")
        elif self.matched is False:
            out.append(f"its full iteration moves {self.bytes_per_element:g} bytes per element with 128-bit "
                       f"accesses, not its roofline row's {self.roofline_bytes:g} (a stream moved by narrower "
                       "accesses, or read twice)")
        return out


def warps_per_sm(registers: int, threads: int) -> int:
    """The warps of ``threads``-thread blocks an SM holds at ``registers`` per thread (register
    limit only; shared memory is not what limits these kernels)."""
    per_warp = -(-registers * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    warps_per_block = threads // 32
    blocks = min(REGISTERS_PER_SM // (per_warp * warps_per_block), MAX_WARPS_PER_SM // warps_per_block)
    return blocks * warps_per_block


def issue_bandwidth(arch: str, instructions_per_element: float, bytes_per_element: float) -> float:
    """TB/s the issue rate allows: elements per second times bytes per element."""
    _, sms, ghz, _ = CARDS[arch]
    elements_per_s = sms * SCHEDULERS * ghz * 1e9 * 32 / instructions_per_element
    return elements_per_s * bytes_per_element / 1e12


def verdict(arch: str, issue_tb_s: float | None) -> str:
    memory = CARDS[arch][3]
    if issue_tb_s is None:
        return "no main loop"
    if issue_tb_s >= memory:
        return "memory-bound"
    return f"issue-bound at {issue_tb_s:.2f} TB/s"


def row(backend: str, kernel: str, arch: str, text: str, registers: int | None, spill_bytes: int | None,
        threads: int, elements: int | None, want: tuple[float, float] | None, chunk: int | None = None) -> Row:
    """A kernel's row from its SASS ``text``: ``elements`` per thread per main-loop iteration,
    ``want`` the (load, store) bytes per element of its roofline row (None: not a streaming
    kernel). ``chunk``: elements per thread of a whole work item, for a kernel whose main loop
    has constant bounds (the compiler may unroll it completely: the whole work item is then
    read as one iteration, its set-up included)."""

    def per_thread(n):
        return None if want is None or n is None else (round(want[0] * n), round(want[1] * n))

    loop = sass.main_loop(text, per_thread(elements))
    if loop is None and chunk is not None:
        loop = sass.straight_path(text, per_thread(chunk))
        elements = chunk if loop is not None else elements
    warps = warps_per_sm(registers, threads) if registers else None
    memory = CARDS[arch][3]
    if loop is None or elements is None:
        return Row(backend, kernel, arch, registers, spill_bytes, warps, threads, elements, None, None, None, None,
                   None, None, None, None if want is None else sum(want), None, memory, "no main loop")
    p = loop.path
    vector_bytes = 16 * (p.vector_loads + p.vector_stores)
    per_element = p.instructions / elements
    bytes_per_element = vector_bytes / elements
    roofline = None if want is None else sum(want)
    issue = issue_bandwidth(arch, per_element, roofline if roofline else bytes_per_element)
    matched = None if want is None else (16 * p.vector_loads, 16 * p.vector_stores) == (
        round(want[0] * elements), round(want[1] * elements))
    return Row(backend, kernel, arch, registers, spill_bytes, warps, threads, elements, p.vector_loads,
               p.vector_stores, p.scalar_loads, p.shared_loads, p.instructions, round(per_element, 1),
               round(bytes_per_element, 3), roofline, round(issue, 2), memory,
               verdict(arch, issue) + (f" ({loop.inner_loops} inner loop(s) in its body, each counted once)" if loop.inner_loops else ""),
               matched, loop.inner_loops)


# ---------------------------------------------------------------------------------------------
# CUDA: every instantiation in the extension
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source_constant(name: str) -> int:
    """An integer ``constexpr`` of csrc/ (``kVec``, ``kQuantVec``, ``kThreads``), read from the
    sources the extension is built from."""
    from . import build

    for path in sorted(p for p in build.source_dir().iterdir() if p.suffix in (".h", ".cuh")):
        m = re.search(rf"constexpr\s+int(?:64_t)?\s+{name}\s*=\s*(\d+)\s*;", path.read_text())
        if m:
            return int(m.group(1))
    raise RuntimeError(f"constexpr {name} not found in {build.source_dir()}")


def _family_states(family: str) -> tuple[str, int] | None:
    """``(family, fp32 or 8-bit state streams)`` of a CUDA family type (``Adam<true>`` -> adam, 3)."""
    m = re.fullmatch(r"fusedopt::(\w+)(?:<(.*)>)?", family.strip())
    if not m:
        return None
    name, args = m.group(1).lower(), [a.strip() == "true" for a in (m.group(2) or "").split(",") if a.strip()]
    states = {"adam": 2 + sum(args), "lion": 1, "sgd": sum(args), "adagrad": 1, "rmsprop": 1 + sum(args),
              "lamb": 2, "lars": sum(args)}
    return (name, states[name]) if name in states else None


def cuda_expected(demangled: str) -> tuple[int | None, tuple[float, float] | None]:
    """``(elements per thread per iteration, (load, store) bytes per element)`` of a CUDA kernel
    from its template arguments, by the roofline of bench's ``tensor_bytes`` split per pass (the
    grad in the param's dtype; 8-bit states one byte each, their absmaxes not counted here)."""
    m = re.match(r"void fusedopt::(\w+)<(.*)>\(", demangled)
    if not m:
        return None, None
    kernel, args = m.group(1), m.group(2)
    parts = re.split(r",\s*(?![^<]*>)", args)
    vec, qvec = _source_constant("kVec"), _source_constant("kQuantVec")
    if kernel == "norm_partials_kernel":
        return vec, (4.0, 0.0)  # fp32 grads (the dtype is a runtime column)
    family = parts[0]
    applied = family.startswith("fusedopt::Applied<")
    if applied:
        family = family[len("fusedopt::Applied<"):-1]
    fs = _family_states(family)
    if fs is None or len(parts) < 2:
        return None, None
    _, k = fs
    p = _DTYPE_BYTES.get(parts[1].strip())
    if p is None:
        return None, None
    if kernel in ("quant8_kernel", "quant8_wide_kernel"):
        return qvec, (2 * p + k, p + k)
    if kernel == "elementwise_kernel":
        return vec, (2 * p + 4 * k, p + 4 * k)
    if kernel == "two_pass_norms_kernel":
        return vec, (2 * p + 4 * k, 4 * k)
    if kernel == "two_pass_norms_only_kernel":
        eight = parts[2].strip() == "true"
        return (qvec, (2 * p + k, 0.0)) if eight else (vec, (2 * p + 4 * k, 0.0))
    if kernel == "two_pass_apply_kernel":
        grad = parts[3].strip() == "true"
        return vec, (p + 4 * k + (p if grad else 0), p)
    return None, None


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _ptxas_spills(log: str) -> dict[tuple[str, str], int]:
    """(mangled kernel, arch) -> spill bytes (stores + loads) from ``ptxas -v`` in a build log."""
    out = {}
    pattern = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'\s*\n(?:.*\n){0,2}?.*?"
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads")
    for name, arch, stores, loads in pattern.findall(log):
        out[(name, arch)] = int(stores) + int(loads)
    return out


def _registers(dump: str, arch: str | None = None) -> dict[tuple[str, str], int]:
    """(mangled kernel, arch) -> registers, from ``cuobjdump -res-usage`` (of a library, which
    names each arch; of a cubin, ``arch``)."""
    out = {}
    lines = dump.splitlines()
    for k, line in enumerate(lines):
        a = re.search(r"arch = (sm_\d+)", line)
        if a:
            arch = a.group(1)
        f = re.search(r"Function (\w+):", line)
        if f and arch and k + 1 < len(lines):
            r = re.search(r"REG:(\d+)", lines[k + 1])
            if r:
                out[(f.group(1), arch)] = int(r.group(1))
    return out


def _local_bytes(text: str) -> int:
    """Bytes moved by local-memory instructions (``STL``/``LDL``: register spills) in a
    function's SASS, each counted once where it appears."""
    return sum(i.width for i in sass.parse(text) if i.base in ("STL", "LDL"))


def find_cuobjdump() -> str | None:
    import shutil

    from . import build

    home = build.find_cuda_home()
    candidates = [home / "bin" / "cuobjdump"] if home else []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    candidates += [Path(found)] if found else []
    return next((str(c) for c in candidates if c.is_file()), None)


def cuda_rows(archs: tuple[str, ...], library: Path | None = None) -> list[Row]:
    """Every kernel of the CUDA extension built for ``archs`` (``("80", "90")``)."""
    from . import build

    if library is None:
        library = build.build(";".join(f"{a[0]}.{a[1:]}" for a in archs))
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (the CUDA toolkit's, or the one Triton ships)")
    dump = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "-res-usage", str(library)], capture_output=True, text=True, check=True).stdout
    log_path = Path(library).parent / "build.log"
    spills = _ptxas_spills(log_path.read_text(errors="replace")) if log_path.is_file() else {}
    registers = _registers(usage)
    functions = sass.functions(dump)
    names = _demangle(sorted({n for n, _ in functions}))
    threads = _source_constant("kThreads")
    rows = []
    for (name, arch), text in sorted(functions.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        if arch not in CARDS or arch[3:] not in archs:
            continue
        readable = names[name]
        elements, want = cuda_expected(readable)
        short = re.sub(r"^void fusedopt::|\(.*$|fusedopt::", "", readable)
        rows.append(row("cuda", short, arch, text, registers.get((name, arch)), spills.get((name, arch)), threads,
                        elements, want))
    return rows


# ---------------------------------------------------------------------------------------------
# Triton: the launches the backend makes, compiled as it would compile them
# ---------------------------------------------------------------------------------------------

#: Constructor arguments that give each family every state it can keep (the configuration the
#: rows are read in; 8-bit classes quantize every tensor).
FULL_STATES = {
    "sgd": dict(momentum=0.9, nesterov=True),
    "lars": dict(lr=1e-2, momentum=0.9),
    "rmsprop": dict(momentum=0.9, centered=True),
}
_TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def triton_expected(kernel: str, spec, group: dict, quantized: bool, p: int) -> tuple[float, float] | None:
    """``(load, store)`` bytes per element of a Triton launch of ``kernel`` for a group of
    family ``spec`` (the same roofline as :func:`cuda_expected`); None for kernels that do not
    stream tensors (the step prologue, the two-pass finish)."""
    k = len(spec.state_names(group))
    s = 1 if quantized else 4
    if "norms" in kernel:  # pass 1: reads p, g, states; writes the fp32 states
        return 2 * p + k * s, 0.0 if quantized else 4.0 * k
    if "apply" in kernel:  # pass 2
        if quantized:  # recomputes the states from the old codes and the grad, writes them
            return 2 * p + k, p + k
        reads_grad = k == 0 or bool(group.get("nesterov", False))
        return p + 4 * k + (p if reads_grad else 0), p
    if kernel.startswith("elementwise"):
        return 2 * p + k * s, p + k * s
    return None


def _triton_compile_all(archs: tuple[str, ...], classes: tuple[str, ...] | None = None) -> list[dict]:
    """Runs in a subprocess without ``TRITON_INTERPRET``: every family class's step on CPU
    tensors with the Triton backend, each launch specialized by Triton's own binder and compiled
    for each of ``archs`` instead of run; the SASS of each, read by :func:`row`."""
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from . import optimizer
    from .kernels import backend as triton_backend

    cuobjdump = find_cuobjdump()
    targets = {a: CUDABackend(GPUTarget("cuda", int(a), 32)) for a in archs}
    out: list[dict] = []
    current: dict = {}
    seen: set = set()

    def launch(self, grid):
        def compile_only(*args, **kwargs):
            for arch, backend in targets.items():
                binder = create_function_from_signature(self.signature, self.params, backend)
                bound, specialization, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization,
                                                                        options)
                compiled = triton.compile(triton.compiler.ASTSource(self, signature, constexprs, attrs),
                                          target=backend.target, options=options.__dict__)
                names = {self.arg_names[key[0]]: value for key, value in constexprs.items() if len(key) == 1}
                key = (self.__name__, current["name"], arch)
                if key in seen:
                    continue
                seen.add(key)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    text = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                                          check=True).stdout
                    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                           check=True).stdout
                registers = next(iter(_registers(usage, f"sm_{arch}").values()), None)
                if "ROWS" in names and "BLOCK_SIZE" in names:
                    block = names["ROWS"] * names["BLOCK_SIZE"]
                    chunk = block * names["TILES"] if "TILES" in names else None
                else:
                    block = names.get("BLOCK")
                    chunk = names.get("CHUNK")
                threads = 32 * options.num_warps
                out.append(dict(kernel=self.__name__, case=current["name"], arch=f"sm_{arch}", sass=text,
                                registers=registers, spills=_local_bytes(text), threads=threads,
                                elements=None if block is None else block // threads,
                                chunk=None if chunk is None else chunk // threads,
                                want=triton_expected(self.__name__, current["spec"], current["group"],
                                                     current["quantized"], current["p"])))
        return compile_only

    JITFunction.__getitem__ = launch
    triton_backend.available = lambda device: None  # CPU tensors: nothing runs, launches compile
    for cls in optimizer.CLASSES.values():
        if classes is not None and cls.__name__ not in classes:
            continue
        spec = cls._spec
        for dtype in (torch.float32, torch.bfloat16):
            kw = dict(FULL_STATES.get(spec.name, {}))
            if cls._quantized:
                kw.update(min_8bit_size=0)
            params = [torch.nn.Parameter(torch.randn(4096, dtype=dtype)) for _ in range(2)]
            opt = cls(params, backend="triton", **kw)
            for p in params:
                p.grad = torch.randn_like(p)
            name = f"{cls.__name__} {str(dtype).removeprefix('torch.')}"
            current.update(name=name, spec=spec, group=opt.param_groups[0], quantized=cls._quantized,
                           p=_TORCH_BYTES[str(dtype).removeprefix("torch.")])
            opt.step()
    return out


def triton_rows(archs: tuple[str, ...], classes: tuple[str, ...] | None = None) -> list[Row]:
    """Every Triton kernel as the backend launches it for each family class (fp32 and bf16
    params, every state the family keeps; ``classes``: only these), compiled for ``archs`` in
    a subprocess."""
    import os
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = tmp
        path = Path(tmp) / "out.json"
        code = (f"import json, sys; from fusedopt import static; "
                f"json.dump(static._triton_compile_all({tuple(archs)!r}, {classes!r}), open({str(path)!r}, 'w'))")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the Triton kernels failed:\n{result.stderr[-6000:]}")
        launches = json.loads(path.read_text())
    rows = []
    for launch in launches:
        functions = sass.functions(launch["sass"])
        text = next(iter(functions.values()), "")
        rows.append(row("triton", f"{launch['kernel']}[{launch['case']}]", launch["arch"], text, launch["registers"],
                        launch["spills"], launch["threads"], launch["elements"],
                        None if launch["want"] is None else tuple(launch["want"]), launch["chunk"]))
    return rows


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = ("backend", "kernel", "arch", "regs", "spill", "warps/SM", "ld128", "st128", "scalar ld", "instr/elt",
            "B/elt", "roofline", "verdict")
    lines = [head]
    for r in rows:
        lines.append((r.backend, r.kernel, r.arch, str(r.registers), str(r.spill_bytes or 0), str(r.warps_per_sm),
                      str(r.vector_loads), str(r.vector_stores), str(r.scalar_loads), str(r.instructions_per_element),
                      str(r.bytes_per_element), str(r.roofline_bytes), r.verdict))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines)


def provenance(archs, args) -> dict:
    """What the rows were read from: the command, the commit, torch, Triton and nvcc."""
    import datetime
    import platform

    def run(*command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    from . import build

    versions = {}
    for name in ("torch", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    nvcc = build.find_nvcc()
    argv = getattr(args, "_argv", None)
    return {"command": "python -m fusedopt static " + " ".join(sys.argv[2:] if argv is None else argv),
            "archs": list(archs), "commit": run("git", "rev-parse", "HEAD"),
            "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), **versions,
            "nvcc": (run(nvcc, "--version") or "").splitlines()[-1] if nvcc else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt static",
        description="The roofline of every kernel, read from its compiled code without a GPU: registers, spills, "
                    "warps per SM, the main loop's 128-bit accesses, instructions and bytes per element against "
                    "the family's roofline row, and whether the instruction count allows the card's memory "
                    "bandwidth (memory-bound) or not (issue-bound at N TB/s).")
    parser.add_argument("--arch", nargs="+", default=["80", "90"], choices=["80", "90"],
                        help="architectures to compile for (default: 80 90)")
    parser.add_argument("--backend", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"],
                        help="which kernels (default: both)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="Triton: only these optimizer classes (default: every one)")
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a spill, or on a streaming kernel whose full iteration does not move "
                             "exactly its roofline row with 128-bit accesses")
    args = parser.parse_args(argv)
    args._argv = argv
    archs = tuple(args.arch)
    rows: list[Row] = []
    if "triton" in args.backend:
        rows += triton_rows(archs, tuple(args.classes) if args.classes else None)
    if "cuda" in args.backend:
        rows += cuda_rows(archs)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"schema": "fusedopt-static/1", "provenance": provenance(archs, args),
                                               "cards": CARDS, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    problems = [f"{r.backend} {r.kernel} ({r.arch}): {p}" for r in rows for p in r.problems]
    for p in problems:
        print("PROBLEM", p, file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
