"""The Dockerfile's promises (it cannot be built here: CI pulls no base images): a CUDA devel
base pinned by tag, torch pinned, the CUDA extension built ahead of time and checked to be in
the installed package, and a default command that checks and benchmarks."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_is_a_pinned_cuda_devel_image():
    (base,) = [rest for word, rest in _instructions() if word == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d+\.\d+", base), base


def test_torch_is_pinned_and_the_extension_is_built_ahead_of_time():
    args = dict(rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), args
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    assert "FUSEDOPT_BUILD_CUDA=1" in runs and "pip install --no-build-isolation" in runs
    assert "build.prebuilt()" in runs  # the image fails to build without the extension


def test_default_command_checks_and_benchmarks():
    (cmd,) = [rest for word, rest in _instructions() if word == "CMD"]
    argv = json.loads(cmd)  # the exec (JSON) form: a list of strings
    assert argv[:2] == ["sh", "-c"]
    commands = [shlex.split(c) for c in argv[2].split("&&")]
    assert ["python", "-m", "fusedopt", "check"] in commands
    assert ["python", "-m", "fusedopt", "bench", "--quick"] in commands
    # run from outside the source tree, so the installed package (with its extension) is used
    workdir = [rest for word, rest in _instructions() if word == "WORKDIR"][-1]
    assert workdir != "/tmp/fusedopt"
