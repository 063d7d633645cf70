"""``opt.step()`` inside ``torch.compile(fullgraph=True)`` (the custom op ``fusedopt::optimizer_step``).

The pattern torch recommends for compiled optimizers: the backward runs eagerly, the step is
compiled (``torch.compile(lambda: opt.step(), fullgraph=True)``). Every case steps a compiled
optimizer and an eager one of the same class and backend side by side on the same grads and
asserts them bit-identical after every step (params, every state tensor, step counts, the
clipped norm); a compiled Triton run is also compared with the eager reference backend within
:mod:`fusedopt.testing`'s tolerances. ``aot_eager`` for the grid, ``inductor`` (C++ on the
CPU) for a few cases; the Triton kernels run in the interpreter on CPU (``tests/conftest.py``).

Also: a tensor ``lr`` changed in place never recompiles (``fail_on_recompile``) and takes
effect; a float ``lr`` recompiles and takes effect; GradScaler (its attributes, and the real
scaler around a compiled ``opt.step``), ``zero_grad`` in the same graph, master weights,
stochastic rounding, a grad that disappears, errors before any state changes, DTensor params.
GPU variants (CUDA tensors, Triton and CUDA backends) are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedopt
from fusedopt import backends, compiled
from fusedopt.testing import assert_close, assert_identical

import cases
from cases import assert_unchanged, snapshot

CLASSES = [cls.__name__ for cls in cases.CLASSES]
STEPS = 7
SKIPPED = 4  # the step GradScaler's found_inf skips, in the scaler cases
CLIP = 20.0  # below the grads' global norm (about 95): clipping is active
SCALE = 1024.0

# (device, backend) pairs; the cuda ones need a GPU.
RUNS = [
    ("cpu", "reference"),
    ("cpu", "triton"),
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and counts its own compilations)."""
    torch._dynamo.reset()
    compiled._batch_caches.clear()
    yield
    torch._dynamo.reset()


def _available(device: str, backend: str) -> None:
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")


def _compile(fn, backend: str = "aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def _kwargs(name: str) -> dict:
    # No L2 decay for Adam: it feeds the params into the moments, so 16-bit params that two
    # backends round differently would move the states (tests/test_backends.py covers that).
    cls = getattr(fusedopt, name)
    decay = cls._spec.name in ("adam", "lion", "lamb") and name not in ("Adam", "Adam8bit")
    return cases.kwargs_of(cls, lr=1e-2 if "Lion" not in name else 1e-3, weight_decay=0.1 if decay else 0.0,
                           **({"min_8bit_size": 256} if cls._quantized else {}))


def _params(device: str, seed: int = 0) -> list[list[torch.Tensor]]:
    """Two groups of mixed dtypes and odd sizes (8-bit states for the ones over 256 elements)."""
    gen = torch.Generator().manual_seed(seed)
    layout = [[(257, torch.float32), (4097, torch.bfloat16), (5, torch.float32)],
              [(33, torch.float16), ((16, 17), torch.float32)]]
    return [[torch.randn(shape, generator=gen).to(device, dtype) for shape, dtype in group] for group in layout]


def _grads(params, step: int, scale: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [[(torch.randn(p.shape, generator=gen) * 3 * scale).to(p.device, p.dtype) for p in group]
            for group in params]


def _clone(params):
    return [[p.clone() for p in group] for group in params]


def _make(name: str, params, backend: str, lr_b, group_b=None, **kwargs):
    """An optimizer of class ``name`` over ``params``: group 0 with the class's defaults (a float
    lr), group 1 with the learning rate ``lr_b`` (a tensor, mostly) and its own betas."""
    kw = {**_kwargs(name), **kwargs}
    cls = getattr(fusedopt, name)
    cases.skip_unless_backend_has(cls, backend, params[0][0].device.type)
    group_b = dict(lr=lr_b, **({"betas": (0.8, 0.95)} if cases.having("betas").count(cls) else {}), **(group_b or {}))
    return cls([{"params": params[0]}, {"params": params[1], **group_b}], backend=backend, **kw)


def _set_grads(params, grads) -> None:
    for group, gs in zip(params, grads):
        for p, g in zip(group, gs):
            p.grad = None if g is None else g.clone()


def assert_same(opt, params, ref, ref_params, what: str) -> None:
    """Params, every state tensor (step counts included) and the clipped norm bit-identical."""
    for gi, (group, ref_group) in enumerate(zip(params, ref_params)):
        for pi, (p, q) in enumerate(zip(group, ref_group)):
            where = f"{what}: group {gi} param {pi}"
            assert_identical(p, q, where)
            state, ref_state = opt.state.get(p, {}), ref.state.get(q, {})
            assert sorted(state) == sorted(ref_state), f"{where}: state keys {sorted(state)} vs {sorted(ref_state)}"
            for key, value in ref_state.items():
                assert_identical(state[key], value, f"{where} {key}")
    if ref.last_grad_norm is None:
        assert opt.last_grad_norm is None, f"{what}: last_grad_norm set without clipping"
    else:
        assert_identical(opt.last_grad_norm, ref.last_grad_norm, f"{what}: last_grad_norm")


def assert_near_reference(opt, params, ref, ref_params, what: str) -> None:
    """Params (in their dtype's tolerance), 32-bit states (fp32's) and step counts against the
    eager reference backend. 8-bit codes are compared bit for bit with an eager run of the same
    backend (:func:`assert_same`); against the reference they are the backend grid's subject
    (``tests/test_backends.py``: a code may move by one step when the norms differ in the last
    bit)."""
    for gi, (group, ref_group) in enumerate(zip(params, ref_params)):
        for pi, (p, q) in enumerate(zip(group, ref_group)):
            where = f"{what}: group {gi} param {pi}"
            assert_close(p, q, p.dtype, where)
            state, ref_state = opt.state.get(p, {}), ref.state.get(q, {})
            assert sorted(state) == sorted(ref_state), f"{where}: state keys"
            for key, value in ref_state.items():
                if key == "step":
                    assert float(state[key]) == float(value), f"{where} step"
                elif value.dtype == torch.float32 and not key.endswith("_absmax"):
                    assert_close(state[key], value, torch.float32, f"{where} {key}")
    if ref.last_grad_norm is not None:
        assert_close(opt.last_grad_norm, ref.last_grad_norm, torch.float32, f"{what}: last_grad_norm")


# ---------------------------------------------------------------------------------------------
# The grid: every family, clipping and GradScaler on and off, two groups, mixed dtypes
# ---------------------------------------------------------------------------------------------


# Default tier: each kind of step once per backend, with clipping and GradScaler; the full
# tier adds the plain steps and the other classes.
@pytest.mark.parametrize("mode", [pytest.param("plain", marks=pytest.mark.full), "clip+scaler"])
@pytest.mark.parametrize("name", [n if n in ("AdamW", "LAMB", "Lion", "AdamW8bit", "Lion8bit", "RMSprop", "LARS8bit")
                                  else pytest.param(n, marks=pytest.mark.full) for n in CLASSES])
@pytest.mark.parametrize("device, backend", RUNS)
def test_compiled_step_matches_eager(device, backend, name, mode):
    """Seven compiled steps against eager ones, a new tensor lr every step without a
    recompilation; with ``clip+scaler``, ``max_grad_norm`` clips, GradScaler's attributes
    unscale and one step is skipped by ``found_inf`` (nothing changes)."""
    _available(device, backend)
    clip = mode == "clip+scaler"
    kwargs = dict(max_grad_norm=CLIP) if clip else {}
    init = _params(device)
    runs = {}
    for role, b in [("compiled", backend), ("eager", backend), ("reference", "reference")]:
        if role == "reference" and backend == "reference":
            continue
        params = _clone(init)
        lr = torch.tensor(3e-3 if "Lion" not in name else 3e-4, device=device)
        runs[role] = (_make(name, params, b, lr, **kwargs), params, lr)
    opt, params, lr = runs["compiled"]
    step, counter = _compile(lambda: opt.step())
    for k in range(STEPS):
        grads = _grads(params, k, SCALE if clip else 1.0)
        before = snapshot(opt, params) if clip and k == SKIPPED else None
        for role, (o, ps, _) in runs.items():
            _set_grads(ps, grads)
            if clip:
                o.grad_scale = torch.tensor(SCALE, device=device)
                o.found_inf = torch.tensor(float(k == SKIPPED), device=device)
        if k == 0:
            step()
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                step()
        for role, (o, ps, _) in runs.items():
            if role != "compiled":
                o.step()
        if before is not None:
            assert_unchanged(opt, params, before, f"step {k} (found_inf)")
        assert_same(opt, params, *runs["eager"][:2], f"step {k}")
        if "reference" in runs:
            assert_near_reference(opt, params, *runs["reference"][:2], f"step {k} vs reference")
        for _, _, lr_k in runs.values():
            lr_k.mul_(0.7)  # in place, as torch's LR schedulers do with a tensor lr
    assert counter.frame_count == 1
    assert counter.op_count >= 1  # the custom op is in the graph
    assert float(opt.state[params[1][0]]["step"]) == STEPS - (1 if clip else 0)


# ---------------------------------------------------------------------------------------------
# Learning rates, recompilation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_float_lr_change_recompiles_and_takes_effect(backend):
    """A Python float lr is specialized by Dynamo (as for torch.optim): a new value recompiles,
    and the new graph uses it. (A tensor lr avoids the recompilations.)"""
    _available("cpu", backend)
    init = _params("cpu")
    params, ref_params = _clone(init), _clone(init)
    opt = _make("AdamW", params, backend, 2e-3, max_grad_norm=CLIP)
    ref = _make("AdamW", ref_params, backend, 2e-3, max_grad_norm=CLIP)
    step, counter = _compile(lambda: opt.step())
    for k in range(4):
        grads = _grads(params, k)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        step()
        ref.step()
        assert_same(opt, params, ref, ref_params, f"step {k}")
        for o in (opt, ref):
            o.param_groups[0]["lr"] = 1e-2 / (k + 2)
            o.param_groups[1]["lr"] = 1e-3 * (k + 1)
    assert counter.frame_count > 1


def test_a_new_flag_or_max_grad_norm_recompiles():
    """What the op's config holds (flags, ``max_grad_norm``) is guarded: a change recompiles."""
    init = _params("cpu")
    params, ref_params = _clone(init), _clone(init)
    opt = _make("Adam", params, "reference", 1e-3, max_grad_norm=CLIP)
    ref = _make("Adam", ref_params, "reference", 1e-3, max_grad_norm=CLIP)
    step, counter = _compile(lambda: opt.step())
    changes = [
        lambda o: o.param_groups[0].update(maximize=True),
        lambda o: o.param_groups[1].update(amsgrad=True),
        lambda o: setattr(o, "max_grad_norm", 1.0),
        lambda o: setattr(o, "max_grad_norm", None),
    ]
    for k in range(len(changes) + 1):
        grads = _grads(params, k)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        step()
        ref.step()
        assert_same(opt, params, ref, ref_params, f"step {k}")
        if k < len(changes):
            changes[k](opt)
            changes[k](ref)
    assert counter.frame_count > len(changes)


def test_a_grad_that_disappears_recompiles_and_leaves_its_param():
    init = _params("cpu")
    params, ref_params = _clone(init), _clone(init)
    opt = _make("AdamW8bit", params, "reference", torch.tensor(1e-3))
    ref = _make("AdamW8bit", ref_params, "reference", torch.tensor(1e-3))
    step, _ = _compile(lambda: opt.step())
    for k in range(4):
        grads = _grads(params, k)
        if k in (1, 2):
            grads[0][1] = None  # no grad: its param, state and step stay
        if k == 0:
            grads[1][0] = None  # no grad on the first step: no state yet
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        step()
        ref.step()
        assert_same(opt, params, ref, ref_params, f"step {k}")
    assert float(opt.state[params[0][1]]["step"]) == 2
    assert float(opt.state[params[1][0]]["step"]) == 3


# ---------------------------------------------------------------------------------------------
# GradScaler, zero_grad, inductor
# ---------------------------------------------------------------------------------------------


def test_grad_scaler_around_a_compiled_step():
    """The real ``torch.amp.GradScaler`` (CPU) calling a compiled ``opt.step``: unscaled in the
    step, an inf-producing batch skipped, the scale updated; one graph for every step."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fusedopt.AdamW(m.parameters(), lr=torch.tensor(1e-2), max_grad_norm=1.0) for m in models]
    counter = CompileCounterWithBackend("aot_eager")
    opts[0].step = torch.compile(opts[0].step, fullgraph=True, backend=counter)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in models]
    for k in range(6):
        x = torch.randn(16, 8)
        if k == 3:
            x[0, 0] = float("inf")
        for m, o, s in zip(models, opts, scalers):
            s.scale(m(x).square().mean()).backward()
            s.step(o)
            s.update()
            o.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for i, (p, q) in enumerate(zip(models[0].parameters(), models[1].parameters())):
            assert_identical(p, q, f"step {k} param {i}")
            for key, value in opts[1].state[q].items():
                assert_identical(opts[0].state[p][key], value, f"step {k} param {i} {key}")
        assert_identical(opts[0].last_grad_norm, opts[1].last_grad_norm, f"step {k} norm")
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == 5  # step 3 skipped
    assert counter.frame_count == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_step_and_zero_grad_in_one_graph(set_to_none):
    init = _params("cpu")
    params, ref_params = _clone(init), _clone(init)
    opt = _make("Lion", params, "reference", torch.tensor(1e-3), max_grad_norm=CLIP)
    ref = _make("Lion", ref_params, "reference", torch.tensor(1e-3), max_grad_norm=CLIP)

    def train_step():
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)

    step, counter = _compile(train_step)
    for k in range(3):
        grads = _grads(params, k)
        for ps, o in ((params, opt), (ref_params, ref)):
            if set_to_none or k == 0:
                _set_grads(ps, grads)
            else:  # zeroed in place by the last step: accumulate into them
                for group, gs in zip(ps, grads):
                    for p, g in zip(group, gs):
                        p.grad.add_(g)
        step()
        ref.step()
        ref.zero_grad(set_to_none=set_to_none)
        assert_same(opt, params, ref, ref_params, f"step {k}")
        for p in (p for group in params for p in group):
            assert (p.grad is None) if set_to_none else bool((p.grad == 0).all())
    assert counter.frame_count == 1


@pytest.mark.parametrize("name, device, backend", [
    ("AdamW", "cpu", "triton"),
    ("AdamW8bit", "cpu", "reference"),
    pytest.param("AdamW", "cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("AdamW8bit", "cuda", "cuda", marks=pytest.mark.gpu),
])
def test_inductor(name, device, backend):
    """The same through inductor (C++ on the CPU), tensor lr changes included. Inductor
    re-inplaces the op's mutations: the launch tables are built once, not at every step."""
    _available(device, backend)
    init = _params(device)
    params, ref_params = _clone(init), _clone(init)
    opt = _make(name, params, backend, torch.tensor(2e-3, device=device), max_grad_norm=CLIP)
    ref = _make(name, ref_params, backend, torch.tensor(2e-3, device=device), max_grad_norm=CLIP)
    step, counter = _compile(lambda: opt.step(), backend="inductor")
    for k in range(STEPS):
        grads = _grads(params, k)
        for ps in (params, ref_params):
            if k == 0:
                _set_grads(ps, grads)
            else:  # the same grad tensors (as with zero_grad(set_to_none=False)): the same tables
                for group, gs in zip(ps, grads):
                    for p, g in zip(group, gs):
                        p.grad.copy_(g)
        if k == 0:
            step()
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                step()
        ref.step()
        assert_same(opt, params, ref, ref_params, f"step {k}")
        kept = {id(v) for _, cache in compiled._batch_caches.values() for v in cache.values()}
        if k == 0:
            tables = kept
        assert kept == tables, f"step {k}: the launch tables were rebuilt"
        for o in (opt, ref):
            o.param_groups[1]["lr"].mul_(0.5)
    assert counter.frame_count == 1
    assert tables or backend == "reference"


# ---------------------------------------------------------------------------------------------
# Group flags that change the batches: master weights, stochastic rounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name, flags", [
    ("AdamW", dict(master_weights=True)),
    ("Lion8bit", dict(master_weights=True)),
    ("LAMB", dict(stochastic_rounding=True)),
])
def test_master_weights_and_stochastic_rounding(backend, name, flags):
    """Batches of 16-bit params with fp32 masters (then rewritten from them), and bf16 params
    rounded stochastically (noise salted by each param's position in its group)."""
    _available("cpu", backend)
    init = _params("cpu")
    params, ref_params = _clone(init), _clone(init)
    group_b = dict(stochastic_rounding=False) if "stochastic_rounding" in flags else {}  # fp16 there
    opt = _make(name, params, backend, torch.tensor(1e-3), group_b, **flags)
    ref = _make(name, ref_params, backend, torch.tensor(1e-3), group_b, **flags)
    step, counter = _compile(lambda: opt.step())
    for k in range(3):
        grads = _grads(params, k)
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        step()
        ref.step()
        assert_same(opt, params, ref, ref_params, f"step {k}")
    assert counter.frame_count == 1
    if "master_weights" in flags:
        assert "master_param" in opt.state[params[0][1]]  # the bf16 param


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_a_backend_that_cannot_run_raises_before_any_change():
    """Checks run (eagerly, at trace time) before any state is created."""
    _available("cpu", "triton")
    params = [[torch.randn(5)], [torch.randn(7, dtype=torch.float64)]]
    opt = _make("AdamW", params, "triton", torch.tensor(1e-3))
    _set_grads(params, _grads(params, 0))
    before = snapshot(opt, params)
    step, _ = _compile(lambda: opt.step())
    with pytest.raises(RuntimeError, match="float64"):
        step()
    assert_unchanged(opt, params, before, "after the error")


def test_sharded_params_ask_for_an_eager_step():
    import torch.distributed as dist

    from fusedopt import distributed

    if distributed.DTensor is None or not dist.is_available():
        pytest.skip("this torch has no DTensor")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn(8), mesh, [Shard(0)])
        opt = fusedopt.AdamW([p])
        step, _ = _compile(lambda: opt.step())
        with pytest.raises(RuntimeError, match="sharded.*call opt.step\\(\\) outside the compiled function"):
            step()
        assert not opt.state
        opt.step()  # eagerly it works
        assert float(opt.state[p]["step"]) == 1
    finally:
        dist.destroy_process_group()
