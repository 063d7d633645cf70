"""Shared test set-up.

Triton kernels must see ``TRITON_INTERPRET=1`` before ``triton.jit`` decorates them; on a
machine without a CUDA device the test session sets it here, before any test imports
``fusedopt.kernels``, so every Triton kernel is checked on CPU tensors through the
interpreter. On a GPU machine the variable is left alone and the kernels compile for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite's tensors are small: on a loaded 2-core machine a thread pool only waits for
    # cores (one reference case took 2.9 s with two threads, 0.12 s with one).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
