"""pytest-benchmark suites over the registry of :mod:`fusedopt.benchmarking`.

    pytest bench/                     # scaled-down (--quick) shapes
    pytest bench/ --bench-full        # full-size shapes (a GPU with 80 GB for llama-1b)
    pytest bench/bench_lion.py -k "fusedopt or lion-pytorch" --benchmark-columns=median,iqr,rounds

Files here are named ``bench_<family>.py`` (the family's stem in every layer) and collected by
the hook below, so ``pytest`` from the repository root (``testpaths = ["tests"]``) never runs
them by accident.
"""

import pytest
import torch

if not torch.cuda.is_available():
    # Same reason as `fusedopt bench --threads`: on a shared machine a thread pool stalls
    # whenever another process takes a core.
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="full-size shapes instead of the scaled-down --quick ones")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def quick(request) -> bool:
    return not request.config.getoption("--bench-full")
