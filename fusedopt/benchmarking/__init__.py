"""``python -m fusedopt bench``: time every fusedopt backend and every peer on the same
optimizer steps, and report bandwidth against the copy ceiling measured in the same run.

An optimizer step moves bytes and does almost no arithmetic, so each case declares the bytes
per parameter its step must move at least (the roofline, computed from the family) and every result is reported
as GB/s and as a percentage of a device-to-device copy timed in the same run.

The registry here is the one the pytest-benchmark suites (``bench/bench_*.py``) use too:

- :data:`OPTIMIZERS`: what a case steps (AdamW, AdamW + clipping, LAMB, Lion, SGD with
  momentum and Nesterov, Adagrad, RMSprop plain and centered with momentum, LARS, and the 8-bit
  forms) with its hyper-parameters; the states it keeps, its passes and so the bytes it must
  move (the roofline, ``--roofline``) are read from its family in ``fusedopt.families``;
- :data:`MODELS`: parameter shapes (GPT-2 124M, a Llama-like 1B, 20,000 tensors of 4,096
  elements), full size and a scaled-down ``--quick`` size;
- :data:`PROVIDERS`: who runs the step (torch's for-loop, foreach, fused and compiled steps,
  bitsandbytes, lion-pytorch, fusedopt's backends). One that cannot run here is listed with
  the reason, never dropped.

The modules, in the order they depend on each other:

- :mod:`.cases`: the models, the optimizers, the bytes a step must move, the cases;
- :mod:`.providers`: the providers and the correctness check;
- :mod:`.timing`: how a step is timed (and the same step under pytest-benchmark);
- :mod:`.report`: the terminal table, the goal ratios, the JSON schema, the plot;
- :mod:`.run`: the run as a JSON document, and the command line.

For each case and provider: the provider is first checked against fusedopt's reference on small
random data (a provider that computes something else is marked ``wrong`` and not timed); then
several input sets are built and rotated, the step is warmed up, and each timed repeat runs
after the L2 cache is flushed, timed with CUDA events on a GPU (wall clock on a CPU, where the
step is synchronous). The median and the 20% / 80% quantiles are reported, with the host time
per step, the kernel launches per step (torch profiler, GPU only) and the state memory.

Example::

    python -m fusedopt bench --quick                      # 1m10s on 2 CPU cores (load 3)
    python -m fusedopt bench --cases adamw/gpt2-124m --providers 'torch-*' 'fusedopt-*' \\
        --json bench/results/h100.json --plot bench/results/h100.png
"""

from .cases import (DTYPES, MODELS, OPTIMIZERS, Case, Model, OptSpec, all_cases, bytes_per_param, bytes_per_step,
                    optimizers_of, select_cases, tensor_bytes)
from .providers import PROVIDERS, Provider, Runner, Skip, check, check_tolerance, select_providers
from .report import JSON_SCHEMA, SCHEMA_ID, format_table, headlines, plot, provider_label, roofline_table
from .run import NO_GPU_NOTE, environment, main, run
from .timing import Config, copy_bandwidth, default_config, measure, pytest_benchmark, pytest_params, time_fn

__all__ = [
    "DTYPES", "MODELS", "OPTIMIZERS", "Case", "Model", "OptSpec", "all_cases", "bytes_per_param", "bytes_per_step",
    "optimizers_of", "select_cases", "tensor_bytes",
    "PROVIDERS", "Provider", "Runner", "Skip", "check", "check_tolerance", "select_providers",
    "JSON_SCHEMA", "SCHEMA_ID", "format_table", "headlines", "plot", "provider_label", "roofline_table",
    "NO_GPU_NOTE", "environment", "main", "run",
    "Config", "copy_bandwidth", "default_config", "measure", "pytest_benchmark", "pytest_params", "time_fn",
]
