"""How a benchmark step is timed: several input sets rotated, a warm-up, the L2 cache flushed
before each repeat, CUDA events on a GPU (wall clock on a CPU); the median and the 20% / 80%
quantiles, the host time, the kernel launches (torch profiler, GPU only) and the state memory
(:func:`measure`). The copy ceiling every result is compared with is timed the same way
(:func:`copy_bandwidth`). :func:`pytest_benchmark` times the same step with pytest-benchmark
(the suites in ``bench/bench_*.py``).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cases import Case, all_cases
from .providers import PROVIDERS, Provider, Runner, Skip, check


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How much to measure. ``time_budget_s`` sets the repeats between the two bounds from the
    warm-up's step time; ``input_sets`` is the most input sets rotated (fewer when memory is
    short); ``flush_bytes`` is the buffer written before every repeat to evict the cache."""

    warmup: int
    min_repeat: int
    max_repeat: int
    time_budget_s: float
    input_sets: int
    check_steps: int
    flush_bytes: int
    copy_bytes: int


def default_config(quick: bool, device: torch.device) -> Config:
    gpu = device.type == "cuda"
    if quick:
        return Config(warmup=1, min_repeat=5, max_repeat=20, time_budget_s=0.05, input_sets=2,
                      check_steps=3, flush_bytes=(256 if gpu else 8) << 20,
                      copy_bytes=(256 if gpu else 32) << 20)
    return Config(warmup=5, min_repeat=10, max_repeat=100, time_budget_s=1.0, input_sets=3,
                  check_steps=3, flush_bytes=(256 if gpu else 64) << 20,
                  copy_bytes=(1024 if gpu else 256) << 20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_fn(fns: list[Callable[[], Any]], device: torch.device, repeats: int, flush: torch.Tensor):
    """Time ``repeats`` calls, rotating through ``fns``, each after ``flush`` is rewritten.

    Returns ``(device_ms, host_ms)`` lists: on a GPU the device time between CUDA events
    recorded around the call, and the host time the call took to return (what the launches
    cost the CPU); on a CPU both are the wall time of the (synchronous) call.
    """
    device_ms, host_ms = [], []
    cuda = device.type == "cuda"
    if cuda:
        start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        fn = fns[i % len(fns)]
        flush.zero_()
        _sync(device)
        if cuda:
            start[i].record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if cuda:
            end[i].record()
            end[i].synchronize()
            device_ms.append(start[i].elapsed_time(end[i]))
        else:
            device_ms.append((t1 - t0) * 1e3)
        host_ms.append((t1 - t0) * 1e3)
    return device_ms, host_ms


def copy_bandwidth(device: torch.device, config: Config) -> dict:
    """Median device-to-device copy (read + write bytes over time) of ``config.copy_bytes``."""
    n = config.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times, _ = time_fn([lambda: dst.copy_(src)], device, 20, flush)
    q20, median, q80 = _quantiles(times)
    moved = 2 * n * 4
    return dict(bytes=moved, median_ms=median, q20_ms=q20, q80_ms=q80, gbps=moved / median / 1e6)


def count_launches(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Device operations (kernels, memcpy, memset) one call of ``fn`` issues, counted with the
    torch profiler; None off a GPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    # Device-side events are kernels, memcpy and memset, plus the GPU-timeline copies of
    # record_function ranges (torch's Optimizer.step is one): those are not launches.
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "annotation" not in (getattr(e, "activity_type", None) or ""))


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, each storage counted once (bitsandbytes
    shares one codebook among all params)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = (value.device, storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _set_bytes(case: Case) -> int:
    """Memory of one input set: params, grads and the states the case keeps, in 32 bits (an
    upper bound for 8-bit)."""
    p = torch.empty((), dtype=case.dtype).element_size()
    return case.numel * (2 * p + 4 * len(case.optimizer.states))


def _make_set(case: Case, device: torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        params.append(p)
    return params


def warm_up(runners: list[Runner], device: torch.device, config: Config) -> int:
    """Step each runner ``config.warmup`` times (state allocation, compilation, autotuning stay
    out of the timings); return how many timed repeats fit the time budget."""
    for r in runners:
        for _ in range(config.warmup):
            r.step()
    _sync(device)
    t0 = time.perf_counter()
    runners[0].step()
    _sync(device)
    estimate = time.perf_counter() - t0
    return max(config.min_repeat, min(config.max_repeat, math.ceil(config.time_budget_s / max(estimate, 1e-6))))


def _result(provider: Provider, status: str, reason: str | None = None, **fields) -> dict:
    out = dict(provider=provider.name, status=status, reason=reason, check_error=None,
               check_tolerance=None, bytes_per_param=None, median_ms=None, q20_ms=None,
               q80_ms=None, gbps=None, pct_copy=None, x_floor=None, host_ms=None,
               launches=None, state_bytes_per_param=None, repeats=None, input_sets=None,
               notes=[])
    out.update(fields)
    return out


def measure(provider: Provider, case: Case, device: torch.device, config: Config,
            copy_gbps: float, quick: bool) -> dict:
    """Check, then time, one provider on one case; returns a result (see bench/README.md)."""
    reason = provider.reason(device, quick)
    if reason is not None:
        status = "skipped" if isinstance(reason, Skip) else "unavailable"
        return _result(provider, status, reason)
    reason = provider.unsupported(case.optimizer, device)
    if reason is not None:
        return _result(provider, "unavailable", reason)

    notes = []
    if provider.state_in_param_dtype and case.dtype != torch.float32:
        notes.append(f"states in {case.dtype_name} (the param's dtype)")
    try:
        err, tol = check(provider, case, device, config.check_steps)
    except Exception as e:  # a peer that raises on this case is reported, not fatal
        return _result(provider, "error", f"check raised {type(e).__name__}: {e}", notes=notes)
    checked = dict(check_error=err if math.isfinite(err) else None, check_tolerance=tol, notes=notes)
    if not err <= tol:
        known = provider.known_differences.get(case.optimizer.name)
        what = f"relative error {err:.3g} > {tol:.3g}" if math.isfinite(err) else "non-finite params"
        return _result(provider, "wrong", f"update differs from fusedopt's reference: {what}; not timed"
                       + (f" (known: {known})" if known else ""), **checked)

    need = _set_bytes(case)
    free = _free_bytes(device)
    sets = min(config.input_sets, int(0.4 * free // max(need, 1)))
    if sets < 1:
        if need > 0.7 * free:
            return _result(provider, "skipped",
                           f"needs about {need / 2**30:.1f} GiB for one input set, {free / 2**30:.1f} GiB free",
                           **checked)
        sets = 1

    runners = []
    try:
        for s in range(sets):
            runners.append(provider.make(_make_set(case, device, seed=s), case.optimizer, case.optimizer.hp))
        repeats = warm_up(runners, device, config)
        flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
        times, host = time_fn([r.step for r in runners], device, repeats, flush)
        del flush
        launches = count_launches(runners[0].step, device)
        state = state_bytes(runners[0].optimizer)
    except torch.OutOfMemoryError as e:
        return _result(provider, "skipped", f"out of memory: {str(e).splitlines()[0]}", **checked)
    except Exception as e:
        return _result(provider, "error", f"{type(e).__name__}: {e}", **checked)
    finally:
        del runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    q20, median, q80 = _quantiles(times)
    moved = case.bytes_per_step(state_bytes=provider.state_bytes(case.dtype),
                                separate_clip=provider.separate_clip and case.optimizer.max_grad_norm is not None)
    gbps = moved / median / 1e6
    floor_ms = case.bytes_per_step() / copy_gbps / 1e6
    return _result(
        provider, "ok", None, **checked,
        bytes_per_param=moved / case.numel, median_ms=median, q20_ms=q20, q80_ms=q80,
        gbps=gbps, pct_copy=100 * gbps / copy_gbps, x_floor=median / floor_ms,
        host_ms=_quantiles(host)[1], launches=launches,
        state_bytes_per_param=state / case.numel, repeats=repeats, input_sets=sets,
    )


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (bench/bench_*.py use this).
# ---------------------------------------------------------------------------------------------


def pytest_params(optimizers) -> list:
    """``pytest.param(case name, provider name)`` for a suite over ``optimizers``; names, so
    that the same ids collect in quick and full mode."""
    import pytest
    return [pytest.param(c.name, p.name, id=f"{c.name}:{p.name}")
            for c in all_cases(quick=True) if c.optimizer.name in optimizers
            for p in PROVIDERS.values() if c.optimizer.name in p.optimizers]


def pytest_benchmark(benchmark, case_name: str, provider_name: str, quick: bool) -> None:
    """Check a provider on a case, then time its step with pytest-benchmark's ``pedantic``
    (input sets rotated, the cache flushed and the device synchronized before each round, the
    device synchronized inside it), and record bandwidth and memory in ``extra_info``. Skips a
    provider that cannot run here; fails one that computes the wrong thing, untimed."""
    import pytest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = default_config(quick, device)
    (case,) = (c for c in all_cases(quick) if c.name == case_name)
    provider = PROVIDERS[provider_name]
    reason = provider.reason(device, quick)
    if reason is None:
        reason = provider.unsupported(case.optimizer, device)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason}")
    err, tol = check(provider, case, device, config.check_steps)
    if not err <= tol:
        known = provider.known_differences.get(case.optimizer.name)
        if known:
            pytest.xfail(f"{provider.name} on {case.name}: relative error {err:.3g} > {tol:.3g}; {known}")
        pytest.fail(f"{provider.name} on {case.name}: update differs from fusedopt's reference "
                    f"(relative error {err:.3g} > {tol:.3g}); not timed")
    sets = max(1, min(config.input_sets, int(0.4 * _free_bytes(device) // max(_set_bytes(case), 1))))
    runners = [provider.make(_make_set(case, device, seed=s), case.optimizer, case.optimizer.hp)
               for s in range(sets)]
    rounds = warm_up(runners, device, config)
    flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
    turn = iter(range(1 << 62))

    def setup():
        flush.zero_()
        _sync(device)
        return (runners[next(turn) % len(runners)],), {}

    def step(runner):
        runner.step()
        _sync(device)

    benchmark.group = case.name
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    moved = case.bytes_per_step(state_bytes=provider.state_bytes(case.dtype),
                                separate_clip=provider.separate_clip and case.optimizer.max_grad_norm is not None)
    benchmark.extra_info.update(
        case=case.name, provider=provider.name, device=str(device), params=case.numel,
        bytes_per_param=moved / case.numel, check_error=err, input_sets=sets,
        state_bytes_per_param=state_bytes(runners[0].optimizer) / case.numel)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9
