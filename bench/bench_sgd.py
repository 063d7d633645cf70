"""SGD with momentum and Nesterov momentum, SGD8bit (see bench/README.md)."""

import pytest

from fusedopt import benchmarking as fb


@pytest.mark.parametrize("case,provider", fb.pytest_params(fb.optimizers_of("sgd")))
def test_sgd(benchmark, case, provider, quick):
    fb.pytest_benchmark(benchmark, case, provider, quick)
