"""Adam family: AdamW, AdamW with global-norm clipping, AdamW8bit (see bench/README.md)."""

import pytest

from fusedopt import benchmarking as fb


@pytest.mark.parametrize("case,provider", fb.pytest_params(fb.optimizers_of("adam")))
def test_adamw(benchmark, case, provider, quick):
    fb.pytest_benchmark(benchmark, case, provider, quick)
