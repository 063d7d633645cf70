"""The command line: ``python -m fusedopt {info,check,build,bench}``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


INTERPRETER_NOTE = ("the triton backend runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, "
                    "set by this command for itself: correct results, not a timing)")


def _interpret_without_gpu() -> bool:
    """``check`` and ``bench`` only: without a CUDA device, switch Triton's interpreter on for
    this process (before any kernel is decorated) so the Triton backend can still be checked on
    CPU tensors. Returns True when this call set it (``info`` then reports what a user's own
    script sees, which is the environment as given)."""
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # a broken optional package should not break `info`
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def cmd_info(args) -> int:
    # No interpreter switch here: what is available below is what the user's own script sees
    # in this environment.
    import torch

    import fusedopt
    from fusedopt import backends

    print(f"fusedopt      {fusedopt.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for name in ("triton", "bitsandbytes", "lion_pytorch"):
        print(f"{name:<13} {_version(name)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    else:
        print("devices       cpu only (no CUDA device)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("              TRITON_INTERPRET=1 (set in your environment): Triton kernels run on CPU tensors "
              "in the interpreter")
    env = os.environ.get("FUSEDOPT_BACKEND")
    if env:
        print(f"FUSEDOPT_BACKEND={env} (overrides 'auto')")
    print("\nbackends:")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in backends.NAMES[1:]:
        for dev in devices:
            reason = backends.unavailable_reason(name, dev)
            status = "available" if reason is None else f"unavailable: {reason}"
            print(f"  {name:<10} {dev.type:<5} {status}")
    for dev in devices:
        chosen = {}
        for kind in backends.KINDS:
            try:
                chosen[kind] = backends.resolve("auto", dev, kind=kind).NAME
            except RuntimeError as e:
                chosen[kind] = f"none ({e})"
        if len(set(chosen.values())) == 1:
            print(f"  auto on {dev.type}: {chosen[backends.KINDS[0]]}")
        else:
            print(f"  auto on {dev.type}: " + ", ".join(f"{k} -> {v}" for k, v in chosen.items()))
    from fusedopt import build

    print(f"\ncuda extension: {build.status()}")
    print("\nThese are the backends a script of yours sees in this environment.")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("`python -m fusedopt check` and `bench` differ on this machine: without a CUDA device they set\n"
              "TRITON_INTERPRET=1 for themselves, so they also run the triton backend on CPU tensors, in\n"
              "Triton's interpreter (correctness, not speed). A script gets the same by setting\n"
              "TRITON_INTERPRET=1 in the environment before it imports fusedopt.")
    return 0


def cmd_check(args) -> int:
    interpreted = _interpret_without_gpu()
    import torch

    from fusedopt import check
    from fusedopt.progress import Progress

    device = torch.device(args.device) if args.device else _device()
    print(f"checking on {device} ({'GPU' if device.type == 'cuda' else 'CPU; GPU kernels need a GPU'})...", flush=True)
    if interpreted:
        print(f"note: {INTERPRETER_NOTE}", flush=True)
    with Progress(0, "check", unit="check") as progress:
        rows = check.run(device, progress)
    print(check.format_rows(rows))
    failed = [r for r in rows if r.ok is False]
    passed = sum(r.ok is True for r in rows)
    print(f"\n{passed} passed, {len(failed)} failed, {sum(r.ok is None for r in rows)} not run")
    return 1 if failed else 0


# Subcommands whose own parser lives in their module: ``main`` hands them the rest of argv.
_DELEGATED = {
    "build": ("fusedopt.build", "compile the CUDA extension (see `build --help`)"),
    "bench": ("fusedopt.benchmarking", "time every backend and peer (see `bench --help`)"),
    "static": ("fusedopt.static", "the roofline of every kernel read from its compiled code, no GPU "
                                  "(see `static --help`)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt", description="fused optimizer kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backends are available (and why not)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every available backend against the reference on this machine",
                       description="Check fusedopt on this machine, on fresh random data: first the reference "
                                   "backend against the peers that have the optimizer (torch.optim, lion-pytorch, "
                                   "bitsandbytes, torch's clip_grad_norm_), then every other available backend "
                                   "against the reference, step by step for 7 steps, comparing params and every "
                                   "state. Prints one row per check and exits 1 if any fails. Without a CUDA device "
                                   "the triton backend runs in Triton's interpreter (this command sets "
                                   "TRITON_INTERPRET=1 for itself). Progress goes to stderr; 14 s on 2 shared CPU "
                                   "cores at load 3.")
    p.add_argument("--device", help="device to check on (default: cuda if present, else cpu)")
    p.set_defaults(func=cmd_check)
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        if argv[0] == "bench":
            _interpret_without_gpu()  # its providers list then says why triton is not timed on a CPU
        return importlib.import_module(_DELEGATED[argv[0]][0]).main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
