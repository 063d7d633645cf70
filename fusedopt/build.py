"""Building the CUDA extension (``csrc/``): ``python -m fusedopt build``.

The extension is one shared library of torch ops (``torch.ops.fusedopt.*``, no Python module),
compiled with ``torch.utils.cpp_extension`` and ninja. It is found, in this order:

1. ahead of time: ``FUSEDOPT_BUILD_CUDA=1 pip install .`` puts ``_C*.so`` in the package, next
   to a ``_C.build`` file naming the torch it was built against (used only if it matches);
2. in the cache: ``$FUSEDOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedopt``, else
   ``~/.cache/fusedopt``, one folder per (sources, torch, CUDA, architectures, flags);
3. built there on first use (a few minutes), or by ``python -m fusedopt build``.

Architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else sm_80 and sm_90 plus those of the
visible GPUs. Every build passes ``-Xptxas -v``; its log (``build.log``, next to the library)
holds ptxas' register and spill report for each kernel, which the CI test checks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY = "fusedopt_C"
DEFAULT_ARCHS = ("8.0", "9.0")
# -fmad=false: no multiply-add contraction, so each fp32 operation rounds as the reference's
# torch ops round it, in the same order; given the same inputs the fp32 states are then
# bit-identical to the reference's on the same device, and so are the 8-bit codes made from
# them. (The kernels are memory-bound: the separate multiply and add cost no time.)
CUDA_CFLAGS = ("-O3", "-lineinfo", "-fmad=false", "-Xptxas=-v")
CFLAGS = ("-O3",)


class BuildError(RuntimeError):
    """The extension could not be built (the message ends with the compiler's output)."""


def source_dir() -> Path:
    """The folder of the CUDA sources (``csrc/``, shipped as ``fusedopt.csrc``)."""
    try:
        import fusedopt.csrc

        return Path(fusedopt.csrc.__file__).parent
    except ImportError:  # a source checkout that is not installed
        return Path(__file__).resolve().parent.parent / "csrc"


def sources(src: Path | None = None) -> list[Path]:
    """The files compiled: every ``.cu`` of ``src`` (default :func:`source_dir`) and ``ops.cpp``."""
    src = src or source_dir()
    return sorted(src.glob("*.cu")) + [src / "ops.cpp"]


def headers(src: Path | None = None) -> list[Path]:
    src = src or source_dir()
    return sorted(src.glob("*.cuh")) + sorted(src.glob("*.h"))


def find_cuda_home() -> Path | None:
    """The CUDA toolkit: the first of ``$CUDA_HOME``, ``$CUDA_PATH``, the toolkit of the
    ``nvcc`` on ``PATH`` and ``/usr/local/cuda`` that has both ``bin/nvcc`` and
    ``include/cuda_runtime.h`` (a wrapper script on ``PATH`` is looked through); None if none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def find_nvcc() -> str | None:
    """nvcc of :func:`find_cuda_home`; None if there is no CUDA toolkit."""
    home = find_cuda_home()
    return str(home / "bin" / "nvcc") if home else None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    candidate = Path(sys.executable).parent / "ninja"
    return str(candidate) if candidate.is_file() else None


def arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else 8.0;9.0 plus the visible GPUs' capabilities."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    import torch

    archs = list(DEFAULT_ARCHS)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if f"{major}.{minor}" not in archs:
                archs.append(f"{major}.{minor}")
    return ";".join(archs)


def cache_root() -> Path:
    if os.environ.get("FUSEDOPT_CACHE_DIR"):
        return Path(os.environ["FUSEDOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fusedopt"


def build_key(archs: str) -> str:
    """What a build depends on: sources, torch, CUDA, architectures and flags."""
    import torch

    h = hashlib.sha256()
    for path in sources() + headers():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(json.dumps([torch.__version__, torch.version.cuda, archs, CUDA_CFLAGS, CFLAGS]).encode())
    return h.hexdigest()[:16]


def build_dir(archs: str | None = None) -> Path:
    import torch

    archs = archs or arch_list()
    cuda = (torch.version.cuda or "none").replace(".", "")
    return cache_root() / f"cuda-torch{torch.__version__.split('+')[0]}-cu{cuda}-{build_key(archs)}"


def library_path(directory: Path) -> Path:
    return directory / f"{LIBRARY}.so"


def package_dir() -> Path:
    """The installed package's folder: where ``FUSEDOPT_BUILD_CUDA=1 pip install .`` puts the
    extension (``_C*.so``) and its ``_C.build`` stamp."""
    return Path(__file__).parent


def prebuilt() -> Path | None:
    """The ahead-of-time build shipped in the package, if it was built against this torch."""
    import importlib.machinery

    import torch

    here = package_dir()
    stamp = here / "_C.build"
    if not stamp.is_file():
        return None
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return None
    if info.get("torch") != torch.__version__ or info.get("cuda") != torch.version.cuda:
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_C{suffix}").is_file():
            return here / f"_C{suffix}"
    return None


def status() -> str:
    """Where the cuda backend finds the extension, in words (``python -m fusedopt info``)."""
    import torch

    if torch.version.cuda is None:
        return f"none (torch {torch.__version__} is a CPU build)"
    found = prebuilt()
    if found:
        return f"built ahead of time (FUSEDOPT_BUILD_CUDA=1 pip install): {found}"
    stamp = package_dir() / "_C.build"
    ignored = ""
    if stamp.is_file():
        ignored = f"; the ahead-of-time build ({stamp.read_text().strip()}) is for another torch and is not used"
    found = cached()
    if found:
        return f"built in the cache: {found}{ignored}"
    reason = cannot_build()
    if reason:
        return f"not built, and cannot be built here: {reason}{ignored}"
    return f"not built yet: compiled on first use, or by `python -m fusedopt build`{ignored}"


def cached(archs: str | None = None) -> Path | None:
    """The cached build for this torch and these sources, if it exists."""
    path = library_path(build_dir(archs))
    return path if path.is_file() else None


def cannot_build() -> str | None:
    """None when this machine can compile the extension, else why not."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if find_nvcc() is None:
        return "nvcc not found (install the CUDA toolkit, or set CUDA_HOME to it)"
    if find_ninja() is None:
        return "ninja not found (pip install ninja)"
    return None


_BUILD_SCRIPT = r"""
import json, sys
from torch.utils.cpp_extension import load
args = json.loads(sys.argv[1])
load(name=args["name"], sources=args["sources"], extra_cflags=args["cflags"],
     extra_cuda_cflags=args["cuda_cflags"], build_directory=args["directory"],
     verbose=True, is_python_module=False)
"""


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)")


def ninja_step(line: str) -> tuple[int, int, str] | None:
    """``(n, total, what)`` of a ninja status line ``[n/total] command``, where ``what`` is the
    file the command compiles or links (its ``-o`` target's name); None for other lines."""
    m = _NINJA_STEP.match(line)
    if m is None:
        return None
    n, total, command = int(m.group(1)), int(m.group(2)), m.group(3)
    out = re.search(r"-o\s+(\S+)", command)
    what = Path(out.group(1)).name if out else command.split()[0] if command.split() else ""
    return n, total, what


def build(archs: str | None = None, directory: Path | None = None, force: bool = False,
          verbose: bool = False, progress=None) -> Path:
    """Compile the extension (unless a build exists) and return the library's path.

    Args:
        archs: a ``TORCH_CUDA_ARCH_LIST`` string (default: :func:`arch_list`).
        directory: where to build (default: :func:`build_dir` in the user's cache).
        force: rebuild even if the library exists.
        verbose: stream the compiler's output.
        progress: a :class:`fusedopt.progress.Progress`, told each ninja step (compile one
            file, link) as it starts.

    The compile runs in a subprocess (``torch.utils.cpp_extension.load`` with ninja) whose output
    goes to ``build.log``; the library is moved into place only once it is complete, so a
    concurrent reader never loads half a file.
    """
    archs = archs or arch_list()
    directory = Path(directory) if directory else build_dir(archs)
    target = library_path(directory)
    if target.is_file() and not force:
        return target
    reason = cannot_build()
    if reason:
        raise BuildError(f"cannot build the fusedopt CUDA extension: {reason}")
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
    home = find_cuda_home()
    nvcc = home / "bin" / "nvcc"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=archs, CUDA_HOME=str(home))
    env["PATH"] = os.pathsep.join([str(home / "bin"), str(Path(find_ninja()).parent), env.get("PATH", "")])
    args = {
        "name": LIBRARY,
        "sources": [str(p) for p in sources()],
        "cflags": list(CFLAGS),
        "cuda_cflags": list(CUDA_CFLAGS),
        "directory": str(work),
    }
    log_path = directory / "build.log"
    with open(log_path, "w") as log:
        log.write(f"# TORCH_CUDA_ARCH_LIST={archs}\n# nvcc: {nvcc}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if verbose:
                sys.stdout.write(line)
            step = ninja_step(line) if progress is not None else None
            if step is not None:
                n, total, what = step
                if total != progress.total:
                    progress.set_total(total)
                progress.advance(max(0, n - 1 - progress.done))
                progress.start(f"{what} (a few minutes in all)" if n == 1 else what)
        code = proc.wait()
        if progress is not None and code == 0:
            progress.advance(max(0, progress.total - progress.done))
    built = work / f"{LIBRARY}.so"
    if code != 0 or not built.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise BuildError(f"building the fusedopt CUDA extension failed (full log: {log_path}):\n{tail}")
    os.replace(built, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m fusedopt build``: compile the CUDA extension into the cache and say where."""
    from .progress import Progress

    parser = argparse.ArgumentParser(
        prog="python -m fusedopt build",
        description="Compile the CUDA extension (csrc/) into the cache and say where; a few minutes with "
                    "nvcc. Progress (one line per file compiled) goes to stderr; -v shows the compiler's output "
                    "instead.")
    parser.add_argument("--arch", default=None,
                        help="architectures, as TORCH_CUDA_ARCH_LIST (default here: %s; that is "
                             "TORCH_CUDA_ARCH_LIST when set, else 8.0 and 9.0 plus the visible GPUs)" % arch_list())
    parser.add_argument("--dir", type=Path, default=None, help="build folder (default: the user's cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    archs = args.arch or arch_list()
    try:
        with Progress(0, "build", unit="step") if not args.verbose else _nothing() as progress:
            path = build(archs, directory=args.dir, force=args.force, verbose=args.verbose, progress=progress)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"fusedopt CUDA extension for TORCH_CUDA_ARCH_LIST={archs}: {path}")
    print(f"build log (ptxas registers and spills): {path.parent / 'build.log'}")
    return 0


@contextlib.contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
