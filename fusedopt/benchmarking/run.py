"""The run: every (case, provider) pair measured, with the environment and provenance, as one
JSON document (:func:`run`); and ``python -m fusedopt bench``'s command line (:func:`main`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..progress import Progress, Silent
from .cases import Case, select_cases
from .providers import Provider, select_providers
from .report import JSON_SCHEMA, SCHEMA_ID, _count, format_table, headlines, plot, roofline_table
from .timing import Config, copy_bandwidth, default_config, measure


# ---------------------------------------------------------------------------------------------
# Environment and provenance.
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if gpu:
        props = torch.cuda.get_device_properties(device)
        name = props.name
        memory = props.total_memory
    else:
        name = _cpu_name()
        memory = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        device=str(device), device_name=name, gpu=gpu, device_memory_bytes=memory,
        driver=_driver() if gpu else None, cuda=torch.version.cuda,
        cpu_count=os.cpu_count(), python=platform.python_version(), platform=platform.platform(),
        versions={k: _version(d) for k, d in (("torch", "torch"), ("triton", "triton"),
                                               ("bitsandbytes", "bitsandbytes"),
                                               ("lion_pytorch", "lion-pytorch"), ("fusedopt", "fusedopt"))},
        commit=_git("rev-parse", "HEAD"), dirty=None if status is None else bool(status),
    )


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

NO_GPU_NOTE = ("No CUDA device: only the CPU providers ran, timed by wall clock. GPU figures "
               "(CUDA-event timings, kernel launches, fusedopt's triton and cuda backends, "
               "lion-pytorch's Triton kernel) need a GPU.")


def run(cases: list[Case], providers: list[Provider], device: torch.device, config: Config,
        quick: bool, progress: Progress | None = None, argv: list[str] | None = None) -> dict:
    """Measure every applicable (case, provider) pair; returns the JSON document."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    copy = copy_bandwidth(device, config)
    pairs = [(c, p) for c in cases for p in providers if c.optimizer.name in p.optimizers]
    progress = progress or Silent(len(pairs))
    results: dict[str, list] = {c.name: [] for c in cases}
    for case, provider in pairs:
        progress.start(f"{case.name} {provider.name}")
        results[case.name].append(measure(provider, case, device, config, copy["gbps"], quick))
        progress.advance()
    progress.close()

    out_cases = []
    for case in cases:
        floor = case.bytes_per_step()
        out_cases.append(dict(
            name=case.name, optimizer=case.optimizer.name, model=case.model.name,
            dtype=case.dtype_name, tensors=len(case.shapes), params=case.numel,
            bytes_per_param=floor / case.numel, floor_ms=floor / copy["gbps"] / 1e6,
            results=results[case.name],
        ))
    notes = [] if device.type == "cuda" else [NO_GPU_NOTE]
    if quick:
        notes.append("--quick: scaled-down shapes and few repeats; a smoke test, not a measurement")
    return dict(
        schema=SCHEMA_ID, date=date, argv=list(argv or []), quick=quick,
        environment=environment(device),
        config=dict(warmup=config.warmup, min_repeat=config.min_repeat, max_repeat=config.max_repeat,
                    time_budget_s=config.time_budget_s, input_sets=config.input_sets,
                    check_steps=config.check_steps, flush_bytes=config.flush_bytes,
                    cpu_threads=torch.get_num_threads()),
        copy=copy,
        providers=[dict(name=p.name, description=p.description, optimizers=list(p.optimizers),
                        reason=p.reason(device, quick)) for p in providers],
        cases=out_cases,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fusedopt bench",
        description="Time fusedopt's backends and the peers on optimizer steps; report GB/s against the "
                    "device-to-device copy measured in the same run.")
    ap.add_argument("--quick", action="store_true",
                    help="scaled-down shapes and few repeats: a smoke test, not a measurement (1m10s on 2 "
                         "shared CPU cores at load 3, 2m11s at load 6)")
    ap.add_argument("--cases", nargs="+", metavar="PATTERN",
                    help="optimizer/model/dtype globs, e.g. 'adamw' '*/llama-1b/bf16' (default: all)")
    ap.add_argument("--providers", nargs="+", metavar="PATTERN",
                    help="provider name globs, e.g. 'torch-*' fusedopt-triton (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write the run as JSON (schema in bench/README.md)")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s per provider per case (needs matplotlib)")
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    ap.add_argument("--threads", type=int, default=1, metavar="N",
                    help="torch CPU threads (default 1: on a shared machine a thread pool stalls "
                         "whenever another process takes a core, which made CPU timings vary 100x)")
    ap.add_argument("--list", action="store_true", help="list cases and providers with availability, run nothing")
    ap.add_argument("--schema", action="store_true", help="print the JSON schema of --json's output, run nothing")
    ap.add_argument("--roofline", action="store_true",
                    help="print the bytes per param each optimizer's step must move (the README's table), run nothing")
    ap.add_argument("--headlines", nargs="+", metavar="JSON",
                    help="print the goal ratios of saved runs (--json files of one device), run nothing")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.schema:
        print(json.dumps(JSON_SCHEMA, indent=2))
        return 0
    if args.roofline:
        print(roofline_table())
        return 0
    if args.headlines:
        try:
            docs = [json.loads(Path(p).read_text()) for p in args.headlines]
        except (OSError, ValueError) as e:
            print(f"fusedopt bench: Invalid --headlines file: {e}", file=sys.stderr)
            return 2
        devices = {d["environment"]["device_name"] for d in docs}
        if len(devices) > 1:
            print(f"fusedopt bench: Invalid --headlines files: runs of different devices {sorted(devices)}",
                  file=sys.stderr)
            return 2
        print("\n".join(headlines(docs)))
        return 0
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"Invalid --device: {args.device!r}; expected cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid --device: {args.device!r}; this machine has no CUDA device")
        if args.threads < 1:
            raise ValueError(f"Invalid --threads: {args.threads}; expected an integer >= 1")
        cases = select_cases(args.cases, args.quick)
        providers = select_providers(args.providers)
    except (ValueError, RuntimeError) as e:
        print(f"fusedopt bench: {e}", file=sys.stderr)
        return 2

    if args.list:
        for c in cases:
            print(f"{c.name:<28} {_count(c.numel):>7} params {len(c.shapes):>6} tensors "
                  f"{c.bytes_per_step() / c.numel:6.2f} B/param")
        for p in providers:
            why = p.reason(device, args.quick)
            print(f"{p.name:<20} {'ok' if why is None else why}")
        return 0

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pairs = sum(1 for c in cases for p in providers if c.optimizer.name in p.optimizers)
    doc = run(cases, providers, device, default_config(args.quick, device), args.quick,
              progress=Progress(pairs, "bench", unit="pair"), argv=["bench", *argv])
    print(format_table(doc))
    print("\n".join(headlines([doc])))
    print(f"ran {pairs} case/provider pairs in {time.perf_counter() - started:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        why = plot(doc, args.plot)
        if why is None:
            print(f"wrote {args.plot}")
        else:
            print(f"fusedopt bench: {why}", file=sys.stderr)
    return 0
