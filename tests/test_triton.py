"""What is particular to the Triton backend: its launch tables and launch counts, its
contract (available / unsupported), and, on a GPU, no host sync, CUDA-graph capture, no
recompilation for a new learning rate, and tensors of more than 2**31 elements.

The comparisons against the reference over the whole grid are in test_backends.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import backends
from fusedopt.testing import assert_close

triton_backend = pytest.importorskip("fusedopt.kernels.backend")
from fusedopt.kernels import common  # noqa: E402
from fusedopt.kernels import elementwise  # noqa: E402

CPU_OK = backends.unavailable_reason("triton", torch.device("cpu")) is None
needs_interpreter = pytest.mark.skipif(not CPU_OK, reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")


def _device():
    return "cpu" if CPU_OK else "cuda"


def _kernels() -> list:
    """Every Triton kernel of the backend: each ``triton.jit`` function named ``*_kernel`` in
    the modules of fusedopt.kernels (found, not listed: a new kernel is counted too), compiled
    (``JITFunction``) or interpreted."""
    import importlib
    import pkgutil

    import fusedopt.kernels
    from triton.runtime.jit import KernelInterface  # JITFunction's and the interpreter's base

    found = {}
    for info in pkgutil.iter_modules(fusedopt.kernels.__path__):
        module = importlib.import_module(f"fusedopt.kernels.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, KernelInterface):
                found[id(value)] = value
    return list(found.values())


class _Launches:
    """Counts the launches of every Triton kernel while active (by wrapping ``JITFunction.run``,
    what ``kernel[grid](...)`` calls, interpreted or compiled)."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.names = []
        kernels = _kernels()
        assert {"elementwise_kernel", "elementwise8bit_kernel", "norms_kernel", "apply_kernel"} <= {
            k.__name__ for k in kernels}
        for k in kernels:
            run = k.run

            def counted(*args, _run=run, _name=k.__name__, **kwargs):
                self.count += 1
                self.names.append(_name)
                return _run(*args, **kwargs)

            monkeypatch.setattr(k, "run", counted)


def _step_launches(monkeypatch, cls, sizes, device, **kwargs):
    params = [torch.randn(n, device=device) for n in sizes]
    opt = cls(params, backend="triton", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: state and tables
    launches = _Launches(monkeypatch)
    opt.step()
    monkeypatch.undo()
    return launches.count


#: 8-bit states for every tensor of the launch tests.
_Q = dict(min_8bit_size=1)


@pytest.mark.parametrize("cls, kwargs, expected", [
    (fusedopt.AdamW, {}, 1),  # the update; each program derives its step's scalars, the last advances the step
    (fusedopt.AdamW, dict(max_grad_norm=1.0), 3),  # + norm partials + norm finish
    (fusedopt.Lion, {}, 1),
    (fusedopt.SGD, dict(lr=0.1, momentum=0.9), 1),
    (fusedopt.Adagrad, {}, 1),
    (fusedopt.RMSprop, dict(momentum=0.9, centered=True), 1),
    (fusedopt.LAMB, {}, 2),  # moments and norms (the last program of a tensor sums them), apply
    (fusedopt.LARS, dict(lr=0.1, momentum=0.9, nesterov=True), 2),  # momentum and norms, apply
    (fusedopt.AdamW8bit, _Q, 1),
    (fusedopt.LAMB8bit, _Q, 2),  # the same two passes with 8-bit states
    pytest.param(fusedopt.Lion8bit, _Q, 1, marks=pytest.mark.full),
    pytest.param(fusedopt.SGD8bit, dict(_Q, lr=0.1, momentum=0.9), 1, marks=pytest.mark.full),
    pytest.param(fusedopt.Adagrad8bit, _Q, 1, marks=pytest.mark.full),
    pytest.param(fusedopt.RMSprop8bit, dict(_Q, momentum=0.9, centered=True), 1, marks=pytest.mark.full),
    pytest.param(fusedopt.LARS, dict(lr=0.1), 2, marks=pytest.mark.full),  # no momentum: no state
    pytest.param(fusedopt.LARS8bit, dict(_Q, lr=0.1, momentum=0.9), 2, marks=pytest.mark.full),
])
def test_launches_do_not_grow_with_tensor_count(monkeypatch, cls, kwargs, expected):
    """One launch per elementwise step, two per two-pass step (issue 14's Performance
    requirement), whatever the tensor count: no step prologue, no separate finish."""
    device = _device()
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    many = 20_000 if device == "cuda" else 64  # the interpreter runs one program at a time
    assert _step_launches(monkeypatch, cls, [33] * 3, device, **kwargs) == expected
    assert _step_launches(monkeypatch, cls, [33] * many, device, **kwargs) == expected


@needs_interpreter
def test_tables_rebuilt_only_when_an_address_changes():
    params = [torch.randn(n) for n in (5, 300, 4097)]
    opt = fusedopt.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    cache = next(iter(opt._caches.values()))
    first = cache["adam"][1]
    for p in params:
        p.grad.mul_(0.5)  # same tensors, new values
    opt.step()
    assert cache["adam"][1] is first
    params[1].data = params[1].data.clone()
    opt.step()
    assert cache["adam"][1] is not first
    second = cache["adam"][1]
    params[2].grad = params[2].grad.clone()
    opt.step()
    assert cache["adam"][1] is not second


@needs_interpreter
def test_unaligned_views():
    """Params that are views at odd offsets into one buffer are updated correctly (their table
    is marked unaligned: no 16-byte accesses promised to the compiler)."""
    results = []
    for backend in ("reference", "triton"):
        flat = torch.randn(20000, generator=torch.Generator().manual_seed(3))
        params = [flat[1:300], flat[301:17000], flat[17001:]]
        opt = fusedopt.AdamW(params, backend=backend)
        for k in range(3):
            gen = torch.Generator().manual_seed(k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        if backend == "triton":
            assert not next(iter(opt._caches.values()))["adam"][1].aligned
        results.append(flat)
    assert_close(results[1], results[0], torch.float32, "params")


def test_contract():
    assert triton_backend.NAME == "triton" and triton_backend.DESCRIPTION
    assert "float64" in triton_backend.unsupported(torch.zeros(2, dtype=torch.float64))
    # any layout runs (tests/test_layouts.py): dense as flat memory, others through copies
    assert triton_backend.unsupported(torch.zeros(4, 4).t()) is None
    assert triton_backend.unsupported(torch.zeros(1, 4).expand(3, 4)) is None
    assert triton_backend.unsupported(torch.zeros(3, dtype=torch.bfloat16)) is None
    if common.INTERPRET:
        assert triton_backend.available(torch.device("cpu")) is None
        assert "TRITON_INTERPRET" in triton_backend.available(torch.device("cuda", 0))
    else:
        assert "TRITON_INTERPRET=1" in triton_backend.available(torch.device("cpu"))


@needs_interpreter
def test_explicit_backend_raises_with_the_reason():
    p = torch.zeros(4, dtype=torch.float64)
    p.grad = torch.ones_like(p)
    opt = fusedopt.AdamW([p], backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert float(p[0]) == 0.0


@needs_interpreter
def test_hyper_parameters_as_device_tensors_follow_in_place_changes():
    """A tensor lr changed in place (as a scheduler under CUDA graphs does) takes effect."""
    results = []
    for backend in ("reference", "triton"):
        lr = torch.tensor(1e-2)
        p = torch.ones(100)
        opt = fusedopt.AdamW([p], lr=lr, backend=backend)
        for k in range(3):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
            lr.mul_(0.5)
        results.append(p)
    assert_close(results[1], results[0], torch.float32, "param")


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


def _cuda_params(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, device="cuda", generator=gen).to(dtype) for n in sizes]


def _set_grads(params, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in params:
        values = torch.randn(p.shape, device="cuda", generator=gen).to(p.dtype)
        if p.grad is None:
            p.grad = values
        else:
            p.grad.copy_(values)


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_and_falls_back_per_batch():
    assert backends.resolve("auto", torch.device("cuda")) is triton_backend
    tensors = [torch.zeros(3, device="cuda", dtype=torch.float64)]
    assert backends.resolve("auto", torch.device("cuda"), tensors).NAME == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("cls, kwargs", [
    (fusedopt.AdamW, dict(max_grad_norm=1.0)),
    (fusedopt.Adam, dict(amsgrad=True, weight_decay=0.1)),
    (fusedopt.LAMB, dict(max_grad_norm=1.0)),
    (fusedopt.Lion, {}),
    (fusedopt.AdamW8bit, dict(min_8bit_size=1, max_grad_norm=1.0)),
    (fusedopt.Lion8bit, dict(min_8bit_size=1)),
])
def test_no_host_sync(cls, kwargs):
    params = _cuda_params([1, 300, 4097, 70000], torch.bfloat16)
    opt = cls(params, backend="triton", **kwargs)
    scales = [torch.tensor(2.0**k, device="cuda") for k in range(4)]  # made before: a copy from the host syncs
    found = [torch.tensor(float(k == 1), device="cuda") for k in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(4):  # from the first step: state creation, tables, compilation
            _set_grads(params, step)
            if step == 2:
                params[2].data = params[2].data.clone()  # a table rebuild
            opt.grad_scale = scales[step]
            opt.found_inf = found[step]
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _compiled(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in fn.cache.values())


@pytest.mark.gpu
def test_new_learning_rate_does_not_recompile():
    params = _cuda_params([4097, 300])
    opt = fusedopt.AdamW(params, backend="triton")
    _set_grads(params, 0)
    opt.step()
    before = _compiled(elementwise.elementwise_kernel)
    for k, lr in enumerate((3e-4, 1e-5, 0.1, 0.0)):
        for g in opt.param_groups:
            g["lr"] = lr
            g["weight_decay"] = 0.05 * k
        _set_grads(params, k + 1)
        opt.step()
    torch.cuda.synchronize()
    assert _compiled(elementwise.elementwise_kernel) == before


@pytest.mark.gpu
@pytest.mark.parametrize("cls, kwargs", [
    (fusedopt.AdamW, dict(max_grad_norm=1.0)),
    (fusedopt.LAMB, {}),
    (fusedopt.Lion8bit, dict(min_8bit_size=1)),
])
def test_cuda_graph_capture_and_replay(cls, kwargs):
    sizes = [1, 300, 4097, 70000]
    eager_params = _cuda_params(sizes, seed=1)
    graph_params = [p.clone() for p in eager_params]
    eager = cls(eager_params, backend="triton", **kwargs)
    graphed = cls(graph_params, backend="triton", **kwargs)
    for p in graph_params:
        p.grad = torch.zeros_like(p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: states, tables, compiled kernels
        for k in range(3):
            _set_grads(graph_params, k)
            graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    for k in range(3):
        _set_grads(eager_params, k)
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for k in range(3, 7):
        _set_grads(graph_params, k)  # in place: the captured addresses
        graph.replay()
        _set_grads(eager_params, k)
        eager.step()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(graph_params, eager_params)):
        assert torch.equal(a, b), f"param {i}"
        for key, value in eager.state[b].items():
            assert torch.equal(graphed.state[a][key], value), f"param {i} {key}"


@pytest.mark.gpu
@pytest.mark.large
@pytest.mark.parametrize("cls, kwargs, need_gib", [
    (fusedopt.AdamW, {}, 28),  # bf16 p, g and fp32 m, v: 12 bytes an element
    (fusedopt.AdamW8bit, {}, 16),  # bf16 p, g and two uint8 codes: 6 bytes an element
])
def test_more_than_2_31_elements(cls, kwargs, need_gib):
    free, _ = torch.cuda.mem_get_info()
    if free < need_gib * 2**30:
        pytest.skip(f"needs {need_gib} GiB of free device memory, {free / 2**30:.1f} available")
    n = 2**31 + 4099
    p = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    p.normal_(generator=torch.Generator(device="cuda").manual_seed(0))
    p.grad = torch.empty_like(p).normal_(generator=torch.Generator(device="cuda").manual_seed(1))
    # slices at the start, across 2**31 and at the very end (starting on quantization-block
    # boundaries, so that 8-bit blocks match), with their own reference runs
    spans = [(0, 8192), (2**31 - 4096, 2**31 + 4096), ((n - 8192) // 256 * 256, n)]
    refs = []
    for a, b in spans:
        q = p[a:b].clone()
        q.grad = p.grad[a:b].clone()
        refs.append((q, cls([q], backend="reference", **kwargs)))
    opt = cls([p], backend="triton", **kwargs)
    norm = triton_backend.global_norm([p.grad], 2.0)
    exact = sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in p.grad.split(2**28)) ** 0.5
    assert_close(norm, torch.tensor(exact), torch.float32, "norm")
    for _ in range(2):
        opt.step()
        for q, ref in refs:
            ref.step()
    torch.cuda.synchronize()
    assert float(opt.state[p]["step"]) == 2.0
    state = opt.state[p]
    for (a, b), (q, ref) in zip(spans, refs):
        assert_close(p[a:b], q, torch.bfloat16, f"param [{a}:{b}]")
        for key in ("exp_avg", "exp_avg_sq"):
            if cls is fusedopt.AdamW:
                assert_close(state[key][a:b], ref.state[q][key], torch.float32, f"{key} [{a}:{b}]")
            else:  # the same fp32 states quantized: the same codes
                assert torch.equal(state[key][a:b], ref.state[q][key]), f"{key} codes [{a}:{b}]"
                blocks = slice(a // 256, math.ceil(b / 256))
                assert_close(state[key + "_absmax"][blocks], ref.state[q][key + "_absmax"], torch.float32,
                             f"{key}_absmax [{a}:{b}]")
