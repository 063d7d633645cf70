"""LARS and LARS8bit (see bench/README.md)."""

import pytest

from fusedopt import benchmarking as fb


@pytest.mark.parametrize("case,provider", fb.pytest_params(fb.optimizers_of("lars")))
def test_lars(benchmark, case, provider, quick):
    fb.pytest_benchmark(benchmark, case, provider, quick)
