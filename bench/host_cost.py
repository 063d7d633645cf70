"""The eager host cost of ``opt.step()`` at many small tensors, in instructions (callgrind) and
wall time.

An optimizer step over 20,000 small tensors is bound by the host: planning, the checks
torch.optim's semantics need, table lookups, scalars. This script measures that work alone.

* **Stubbed** (backend ``triton``): every Triton kernel object in ``fusedopt.kernels.*`` (each
  module attribute that is a ``triton.runtime.jit.KernelInterface``: ``@triton.jit`` functions,
  interpreted or compiled) is replaced for the run by a stub whose ``kernel[grid](*args,
  **kwargs)`` only counts the call. The arguments are still built by fusedopt (tables, scalar
  tensors, constexpr keywords); Triton's own launcher (argument binding, specialization key,
  driver call) and the kernel itself are not run, so not counted. The kernels resolve their
  launches through module globals at call time (``elementwise_kernel[...]``, ``norms_kernel[...]``),
  which is why patching the module attributes intercepts every launch; the
  launch count per step is reported, and a triton run with no launch is an error.
  Backends ``reference`` and ``cuda`` are not stubbed: ``reference`` runs its torch ops on
  the tiny tensors (host work plus compute), ``cuda`` needs a GPU and its extension.
* **Counted**: ``opt.step()`` only. "same grads": the grads are zeroed in place
  (``zero_grad(set_to_none=False)``) between steps, outside the count. "new grads":
  ``zero_grad(set_to_none=True)``, then a fresh random grad tensor is assigned to every param,
  outside the count (the allocator may reuse the freed addresses, as in training).
* **Instructions**: the script re-runs itself under ``valgrind --tool=callgrind
  --collect-atstart=no`` and brackets each measured step with ``CALLGRIND_TOGGLE_COLLECT``
  client requests from a tiny C shim (compiled with ``cc`` against ``valgrind/callgrind.h``,
  called through ctypes), then ``CALLGRIND_DUMP_STATS_AT`` after each step: one dump per step,
  nothing outside the brackets counted. The same brackets around an empty function measure
  what the bracketing itself costs (ctypes calls, a Python frame); that is subtracted and
  reported. Callgrind's counts do not depend on the machine's load; wall time does.
* **Wall time**: the same procedure in-process without valgrind, ``time.perf_counter`` around
  each step, median over ``--wall-steps``: a second, noisy number.

    python bench/host_cost.py                          # 20,000 x 16 fp32, AdamW, triton
    python bench/host_cost.py --backend reference --optimizer Lion --json /tmp/hc.json
    python bench/host_cost.py --no-callgrind           # wall time only (seconds, no valgrind)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

SCHEMA = "fusedopt-host-cost/1"
MODES = ("same", "new")
REPO = Path(__file__).resolve().parents[1]

STUBBED = (
    "backend triton: every triton KernelInterface attribute of the fusedopt.kernels modules is "
    "replaced by a stub whose kernel[grid](...) only counts the call (fusedopt builds all the "
    "arguments; Triton's launcher and the kernel are not run). Other backends: nothing stubbed."
)
COUNTED = (
    "opt.step() only. same: grads zeroed in place (zero_grad(set_to_none=False)) between steps, "
    "not counted. new: zero_grad(set_to_none=True) and fresh random grads assigned, not counted."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=20_000, help="number of params (default 20000)")
    parser.add_argument("--numel", type=int, default=16, help="elements per param (default 16)")
    parser.add_argument("--optimizer", default="AdamW", help="a fusedopt class name (default AdamW)")
    parser.add_argument("--backend", default="triton", choices=["triton", "reference", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="counted steps per mode under callgrind (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted steps before each mode (default 2)")
    parser.add_argument("--wall-steps", type=int, default=20, help="timed steps per mode without valgrind (default 20)")
    parser.add_argument("--no-callgrind", action="store_true", help="wall time only")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    parser.add_argument("--_child", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("tensors", "numel", "steps", "wall_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be non-negative, got {args.warmup}")
    return args


def _prepare_environment(backend: str) -> None:
    # The Triton kernels reach CPU tensors only in the interpreter, which must be chosen before
    # fusedopt.kernels is imported; the launches are stubbed, so nothing is interpreted.
    if backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@contextmanager
def stubbed_launches(backend: str):
    """Replace every Triton kernel of ``fusedopt.kernels`` by a launch counter (backend
    triton; other backends: nothing replaced). Yields the Counter of launches by kernel name."""
    launches: Counter = Counter()
    if backend != "triton":
        yield launches
        return
    import importlib
    import pkgutil

    import fusedopt.kernels
    from triton.runtime.jit import KernelInterface

    class StubKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches[self.name] += 1

            return launch

    saved = []
    for info in pkgutil.iter_modules(fusedopt.kernels.__path__):
        module = importlib.import_module(f"fusedopt.kernels.{info.name}")
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                saved.append((module, name, value))
                setattr(module, name, StubKernel(name))
    if not saved:
        raise RuntimeError("no Triton kernel found in fusedopt.kernels to stub")
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class _WallClock:
    """Times each region with perf_counter (the in-process run)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def region(self, label: str, fn) -> None:
        start = time.perf_counter()
        fn()
        self.times.setdefault(label, []).append(time.perf_counter() - start)


class _Callgrind:
    """Brackets each region with CALLGRIND_TOGGLE_COLLECT and dumps after it (run under
    ``valgrind --tool=callgrind --collect-atstart=no``)."""

    SOURCE = r"""
#include <valgrind/callgrind.h>
void hc_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void hc_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
int hc_running(void) { return RUNNING_ON_VALGRIND; }
"""

    def __init__(self, workdir: Path):
        source = workdir / "hc_shim.c"
        library = workdir / "hc_shim.so"
        source.write_text(self.SOURCE)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        self.lib = ctypes.CDLL(str(library))
        self.lib.hc_dump.argtypes = [ctypes.c_char_p]
        if not self.lib.hc_running():
            raise RuntimeError("the callgrind child is not running under valgrind")
        self.labels: list[str] = []

    def region(self, label: str, fn) -> None:
        self.lib.hc_toggle()
        fn()
        self.lib.hc_toggle()
        dump = f"{label}#{len(self.labels)}"
        self.labels.append(dump)
        self.lib.hc_dump(dump.encode())


def _noop() -> None:
    pass


def measure(args: argparse.Namespace, meter, steps: int) -> dict:
    """Build the params and optimizer, warm up, and run ``steps`` counted steps per mode, each
    through ``meter.region(label, fn)``; then ``steps`` empty regions (label ``empty``), the
    bracketing's own cost. Returns the launches per step per mode."""
    _prepare_environment(args.backend)
    import torch

    import fusedopt

    cls = getattr(fusedopt, args.optimizer, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizer must name a fusedopt optimizer class, got {args.optimizer!r}")
    torch.manual_seed(0)
    params = [torch.randn(args.numel, requires_grad=True) for _ in range(args.tensors)]

    def new_grads():
        for p in params:
            p.grad = torch.randn_like(p)

    new_grads()
    opt = cls(params, backend=args.backend)
    launches = {}
    with stubbed_launches(args.backend) as counter:
        for mode in MODES:
            def prepare():
                if mode == "same":
                    opt.zero_grad(set_to_none=False)
                else:
                    opt.zero_grad(set_to_none=True)
                    new_grads()

            for _ in range(args.warmup):
                prepare()
                opt.step()
            counter.clear()
            for _ in range(steps):
                prepare()
                meter.region(mode, opt.step)
            launches[mode] = {name: count / steps for name, count in sorted(counter.items())}
            if args.backend == "triton" and not counter:
                raise RuntimeError("backend triton issued no launch: the stub did not intercept them")
    for _ in range(steps):
        meter.region("empty", _noop)
    return launches


def _environment() -> dict:
    import torch

    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    valgrind = shutil.which("valgrind")
    return {
        "torch": torch.__version__,
        "triton": version("triton"),
        "fusedopt": version("fusedopt"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "valgrind": subprocess.run([valgrind, "--version"], capture_output=True, text=True).stdout.strip()
        if valgrind else None,
    }


def _parse_dumps(workdir: Path) -> dict[str, int]:
    """``{label: instructions}`` from callgrind's dump files (``desc: Trigger: Client Request:
    LABEL`` and ``summary:`` / ``totals:``, whose first event is Ir)."""
    counts = {}
    for path in workdir.glob("callgrind.out*"):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (\S+)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if trigger and total:
            counts[trigger.group(1)] = int(total.group(1))
    return counts


def _run_callgrind(args: argparse.Namespace) -> dict:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed: run with --no-callgrind for wall time only")
    with tempfile.TemporaryDirectory(prefix="host_cost_") as tmp:
        workdir = Path(tmp)
        child_args = ["--tensors", str(args.tensors), "--numel", str(args.numel), "--optimizer", args.optimizer,
                      "--backend", args.backend, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
                   f"--callgrind-out-file={workdir}/callgrind.out",
                   sys.executable, str(Path(__file__).resolve()), *child_args, "--_child", str(workdir / "child.json")]
        env = dict(os.environ, PYTHONHASHSEED="0")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the callgrind run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        child = json.loads((workdir / "child.json").read_text())
        counts = _parse_dumps(workdir)
    missing = [label for label in child["labels"] if label not in counts]
    if missing:
        raise RuntimeError(f"callgrind wrote no dump for {missing}")
    per_label: dict[str, list[int]] = {}
    for label in child["labels"]:
        per_label.setdefault(label.split("#")[0], []).append(counts[label])
    overhead = round(statistics.median(per_label["empty"]))
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "command": command[:3] + ["python", "bench/host_cost.py", *child_args, "--_child", "PATH"],
        "bracket_overhead": overhead,
        "modes": {
            mode: {
                "raw_per_step": per_label[mode],
                "per_step": round(statistics.median(per_label[mode])) - overhead,
            }
            for mode in MODES
        },
        "launches_per_step": child["launches"],
    }


def run(args: argparse.Namespace) -> dict:
    """The whole measurement: wall time in-process, then (unless ``--no-callgrind``)
    instructions from a callgrind child. Returns the JSON object."""
    wall = _WallClock()
    launches = measure(args, wall, args.wall_steps)
    result = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": args.argv,
        "config": {
            "tensors": args.tensors, "numel": args.numel, "dtype": "float32", "device": "cpu",
            "optimizer": args.optimizer, "backend": args.backend, "steps": args.steps,
            "warmup": args.warmup, "wall_steps": args.wall_steps,
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        },
        "stubbed": STUBBED,
        "counted": COUNTED,
        "launches_per_step": launches,
        "wall_ms": {
            mode: {"median": statistics.median(wall.times[mode]) * 1e3,
                   "per_step": [t * 1e3 for t in wall.times[mode]]}
            for mode in MODES
        },
        "instructions": None,
        "environment": _environment(),
    }
    if not args.no_callgrind:
        result["instructions"] = _run_callgrind(args)
    return result


def _report(result: dict) -> str:
    cfg = result["config"]
    lines = [f"{cfg['optimizer']} backend={cfg['backend']}: {cfg['tensors']} tensors x {cfg['numel']} {cfg['dtype']}",
             f"stubbed: {result['stubbed']}"]
    for mode in MODES:
        label = {"same": "same grads", "new": "new grads"}[mode]
        line = f"  {label:10s}  wall {result['wall_ms'][mode]['median']:9.2f} ms/step (median of {cfg['wall_steps']})"
        ins = result["instructions"]
        if ins is not None:
            line += f"   {ins['modes'][mode]['per_step'] / 1e6:8.1f} M instructions/step (median of {cfg['steps']})"
        lines.append(line)
    ins = result["instructions"]
    if ins is not None:
        lines.append(f"  bracket overhead subtracted: {ins['bracket_overhead']} instructions; "
                     f"callgrind run {ins['wall_s']} s")
    lines.append(f"  launches/step: {result['launches_per_step']}")
    env = result["environment"]
    lines.append(f"  torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
                 + (" (dirty)" if env["dirty"] else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._child:
        workdir = Path(args._child).parent
        meter = _Callgrind(workdir)
        launches = measure(args, meter, args.steps)
        Path(args._child).write_text(json.dumps({"labels": meter.labels, "launches": launches}))
        return
    result = run(args)
    print(_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
