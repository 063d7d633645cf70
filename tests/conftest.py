"""Shared test set-up.

Triton kernels must see ``TRITON_INTERPRET=1`` before ``triton.jit`` decorates them; on a
machine without a CUDA device the test session sets it here, before any test imports
``fusedopt.kernels``, so every Triton kernel is checked on CPU tensors through the
interpreter. On a GPU machine the variable is left alone and the kernels compile for real.

Two tiers: by default each big grid runs one case per family x backend x dtype (minutes on
two cores); ``--full`` (or ``FUSEDOPT_FULL_TESTS=1``) also runs the cases marked ``full``, as
.ci/run does.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite's tensors are small: on a loaded 2-core machine a thread pool only waits for
    # cores (one reference case took 2.9 s with two threads, 0.12 s with one).
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full tier: every case of the big grids (tests marked `full`); "
                          "FUSEDOPT_FULL_TESTS=1 does the same. Without it, each grid keeps one case per "
                          "family x backend x dtype.")


def full_tier(config) -> bool:
    return config.getoption("--full") or os.environ.get("FUSEDOPT_FULL_TESTS", "") not in ("", "0")


FULL_ONLY = "full tier only: run `python -m pytest --full` (or FUSEDOPT_FULL_TESTS=1) for every case"


def pytest_collection_modifyitems(config, items):
    if not full_tier(config):
        skip_full = pytest.mark.skip(reason=FULL_ONLY)
        for item in items:
            if "full" in item.keywords:
                item.add_marker(skip_full)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
