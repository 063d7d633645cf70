"""LAMB and LAMB8bit (see bench/README.md)."""

import pytest

from fusedopt import benchmarking as fb


@pytest.mark.parametrize("case,provider", fb.pytest_params(fb.optimizers_of("lamb")))
def test_lamb(benchmark, case, provider, quick):
    fb.pytest_benchmark(benchmark, case, provider, quick)
