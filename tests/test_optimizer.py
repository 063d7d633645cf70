"""The base class every family shares: bad input, param groups, the step protocol, backend
selection and state dicts, over every optimizer class (the registry: tests/cases.py)."""

from __future__ import annotations

import inspect
import warnings
import re

import pytest
import torch

import fusedopt
from cases import CLASSES, EIGHT_BIT, assert_unchanged, checkpoint, having, kwargs_of, snapshot
from fusedopt import backends, families
from fusedopt.testing import assert_close, assert_identical


def name(cls):
    return cls.__name__


def _extra(cls, **kw):
    """8-bit classes quantize the test's small tensors too; every family keeps its states."""
    return kwargs_of(cls, **kw)


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(300, generator=gen).to(dtype), torch.randn(17, generator=gen).to(dtype)],
            [torch.randn(100, generator=gen).to(dtype), torch.randn(5, 40, generator=gen).to(dtype)]]


def _grads(params, seed, only=None):
    gen = torch.Generator().manual_seed(1000 + seed)
    for gi, group in enumerate(params):
        for p in group:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if only in (None, gi) else None


def _make(cls, params, **kw):
    return cls([{"params": params[0]}, {"params": params[1], "lr": 5e-3}], **_extra(cls, **kw))


# ---------------------------------------------------------------------------------------------
# Bad input at construction: the exception type, and a message naming the argument and value.
# ---------------------------------------------------------------------------------------------

# (argument, bad value, exception, message pattern, classes it applies to)
BAD_HYPER = [
    ("lr", -1e-3, ValueError, "Invalid learning rate: -0.001", CLASSES),
    ("lr", "0.1", TypeError, "Invalid lr: '0.1'", CLASSES),
    ("lr", torch.tensor([1e-3, 1e-3]), ValueError, "Tensor lr must be a 1-element", CLASSES),
    ("eps", -1e-8, ValueError, "Invalid epsilon value: -1e-08", having("eps")),
    ("betas", (1.0, 0.999), ValueError, "Invalid beta parameter at index 0: 1.0", having("betas")),
    ("betas", (-0.1, 0.999), ValueError, "Invalid beta parameter at index 0: -0.1", having("betas")),
    ("betas", (0.9, 1.0), ValueError, "Invalid beta parameter at index 1: 1.0", having("betas")),
    ("betas", (0.9, -0.5), ValueError, "Invalid beta parameter at index 1: -0.5", having("betas")),
    ("betas", (0.9,), TypeError, "Invalid betas: (0.9,)", having("betas")),
    ("weight_decay", -0.1, ValueError, "Invalid weight_decay value: -0.1", CLASSES),
    ("momentum", -0.5, ValueError, "Invalid momentum value: -0.5", having("momentum")),
    ("dampening", "0", TypeError, "Invalid dampening: '0'", having("dampening")),
    ("lr_decay", -1.0, ValueError, "Invalid lr_decay value: -1.0", having("lr_decay")),
    ("initial_accumulator_value", -1.0, ValueError, "Invalid initial_accumulator_value value: -1.0",
     having("initial_accumulator_value")),
    ("alpha", -0.5, ValueError, "Invalid alpha value: -0.5", having("alpha")),
    ("max_unorm", -0.01, ValueError, "Invalid max_unorm value: -0.01", having("max_unorm")),
    ("amsgrad", "yes", TypeError, "Invalid amsgrad: 'yes'", having("amsgrad")),
    ("maximize", 1, TypeError, "Invalid maximize: 1", having("maximize")),
    ("nesterov", 1, TypeError, "Invalid nesterov: 1", having("nesterov")),
    ("centered", "no", TypeError, "Invalid centered: 'no'", having("centered")),
    ("bias_correction", None, TypeError, "Invalid bias_correction: None", having("bias_correction")),
    ("block_size", 48, ValueError, "Invalid block_size: 48", EIGHT_BIT),
    ("block_size", 0, ValueError, "Invalid block_size: 0", EIGHT_BIT),
    ("block_size", -256, ValueError, "Invalid block_size: -256", EIGHT_BIT),
    ("block_size", 16, ValueError, "Invalid block_size: 16", EIGHT_BIT),
    ("block_size", 256.0, TypeError, "Invalid block_size: 256.0", EIGHT_BIT),
    ("min_8bit_size", -1, ValueError, "Invalid min_8bit_size: -1", EIGHT_BIT),
    ("min_8bit_size", 4096.5, TypeError, "Invalid min_8bit_size: 4096.5", EIGHT_BIT),
]
# Arguments of the optimizer, not of a group.
BAD_OPTIMIZER = [
    ("max_grad_norm", 0.0, ValueError, "Invalid max_grad_norm: 0.0", CLASSES),
    ("max_grad_norm", -1.0, ValueError, "Invalid max_grad_norm: -1.0", CLASSES),
    ("max_grad_norm", float("inf"), ValueError, "Invalid max_grad_norm: inf", CLASSES),
    ("max_grad_norm", float("nan"), ValueError, "Invalid max_grad_norm: nan", CLASSES),
    ("max_grad_norm", "1", TypeError, "Invalid max_grad_norm: '1'", CLASSES),
    ("backend", "gpu", ValueError, "Invalid backend: 'gpu'", CLASSES),
    ("backend", None, ValueError, "Invalid backend: None", CLASSES),
]


def _cases(table):
    return [
        pytest.param(cls, arg, value, exc, msg, id=f"{cls.__name__}-{arg}={value!r}")
        for arg, value, exc, msg, classes in table
        for cls in classes
    ]


@pytest.mark.parametrize("cls,arg,value,exc,msg", _cases(BAD_HYPER + BAD_OPTIMIZER))
def test_bad_argument(cls, arg, value, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        cls([torch.randn(10)], **{**_extra(cls), arg: value})


@pytest.mark.parametrize("cls,arg,value,exc,msg", _cases(BAD_HYPER))
def test_bad_group_hyper_parameter(cls, arg, value, exc, msg):
    """The same checks for a value given in a param group, at construction and in
    add_param_group (which then adds nothing)."""
    with pytest.raises(exc, match=re.escape(msg)):
        cls([{"params": [torch.randn(10)]}, {"params": [torch.randn(10)], arg: value}], **_extra(cls))
    opt = cls([torch.randn(10)], **_extra(cls))
    with pytest.raises(exc, match=re.escape(msg)):
        opt.add_param_group({"params": [torch.randn(10)], arg: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls,arg,value,exc,msg", _cases(BAD_HYPER))
def test_bad_group_hyper_parameter_set_between_steps(cls, arg, value, exc, msg):
    """A bad value set in a group between steps raises at the next step, before any group
    steps: no param, state or step count changes (group 0 is fine and comes first)."""
    params = _params()
    opt = _make(cls, params)
    _grads(params, 0)
    opt.step()
    opt.param_groups[1][arg] = value
    _grads(params, 1)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=re.escape(msg)):
        opt.step()
    assert_unchanged(opt, params, before, f"{arg}={value!r} set in group 1")


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_bad_params(cls):
    p = torch.randn(10)
    cases = [
        ([], ValueError, "empty parameter list"),
        ({p}, TypeError, "not a set"),
        ([1.0], TypeError, "can only optimize Tensors, but one of the params is float"),
        ([p, "weight"], TypeError, "can only optimize Tensors, but one of the params is str"),
        ([torch.zeros(3, dtype=torch.int64)], TypeError, "dtype torch.int64"),
        ([torch.zeros(3, dtype=torch.complex64)], TypeError, "dtype torch.complex64"),
        ([p.to_sparse()], TypeError, "layout torch.sparse_coo"),
        ([p, p], ValueError, "the same tensor more than once"),
        ([{"params": [p]}, {"params": [torch.randn(3), p]}], ValueError, "more than one parameter group"),
        ([{"params": {p}}], TypeError, "sets"),
        ([{"lr": 1e-3}], ValueError, "'params'"),
    ]
    for params, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)):
            cls(params, **_extra(cls))


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_add_param_group(cls):
    """add_param_group validates, rejects a tensor already optimized, fills in the defaults and
    keeps per-group hyper-parameters."""
    p, q, r = torch.randn(10), torch.randn(20), torch.randn(30)
    opt = cls([p], **_extra(cls, lr=1e-3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group([q])
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": q, "lr": 7e-3})
    opt.add_param_group({"params": [r], "weight_decay": 0.25})
    groups = opt.param_groups
    assert [g["params"] for g in groups] == [[p], [q], [r]]
    assert [g["lr"] for g in groups] == [1e-3, 7e-3, 1e-3]
    assert [g["weight_decay"] for g in groups] == [opt.defaults["weight_decay"]] * 2 + [0.25]
    assert all(set(g) == set(groups[0]) for g in groups)
    for x in (p, q, r):
        x.grad = torch.randn_like(x)
    opt.step()
    assert all(float(opt.state[x]["step"]) == 1 for x in (p, q, r))


# ---------------------------------------------------------------------------------------------
# Bad input at step(): RuntimeError with the reason; nothing changes, no state is created.
# ---------------------------------------------------------------------------------------------


class ForcedGrad(torch.Tensor):
    """A param whose ``.grad`` is a plain attribute, so a test can hand the optimizer a
    gradient autograd's setter refuses (another shape, another device)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def grad(self):
        return self.__dict__.get("forced_grad")

    @grad.setter
    def grad(self, value):
        self.__dict__["forced_grad"] = value


def _bad_grad(kind, p):
    if kind == "sparse":
        p.grad = torch.randn(p.shape).to_sparse()
        return "does not support sparse gradients"
    if kind == "shape":
        p.grad = torch.randn(p.numel() + 1)
        return f"has shape ({p.numel() + 1},) but the param has shape {tuple(p.shape)}"
    if kind == "device":
        p.grad = torch.empty(p.shape, device="meta")
        return "is on meta but the param is on cpu"
    if kind == "dtype":
        p.grad = torch.ones(p.shape, dtype=torch.int32)
        return "has dtype torch.int32"
    raise AssertionError(kind)


@pytest.mark.parametrize("cls", CLASSES, ids=name)
@pytest.mark.parametrize("kind", ["sparse", "shape", "device", "dtype"])
def test_bad_grad_changes_nothing(cls, kind):
    """A bad grad in the last group raises RuntimeError naming the param and the problem, after
    a first step gave the first group state: no param, state or step count changes, and the
    second group gets no state."""
    params = _params()
    params[1][1] = torch.Tensor._make_subclass(ForcedGrad, params[1][1], False)
    opt = _make(cls, params, max_grad_norm=1.0)
    _grads(params, 0, only=0)
    opt.step()
    _grads(params, 1)
    reason = _bad_grad(kind, params[1][1])
    before = snapshot(opt, params)
    norm = opt.last_grad_norm.clone()
    with pytest.raises(RuntimeError, match=re.escape(reason)) as info:
        opt.step()
    assert "param 1 of group 1" in str(info.value)
    assert_unchanged(opt, params, before, f"after a {kind} grad")
    assert_identical(opt.last_grad_norm, norm, "last_grad_norm")


def _unavailable(backend):
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is None:
        pytest.skip(f"the {backend} backend runs on CPU tensors on this machine")
    return reason


@pytest.mark.parametrize("cls", CLASSES, ids=name)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_that_cannot_run_changes_nothing(cls, backend):
    """backend="cuda" (or "triton" outside the interpreter) on CPU tensors: RuntimeError naming
    the backend, the device and why; no state is created (beyond what a family makes at
    construction: torch's Adagrad does) and no param changes."""
    reason = _unavailable(backend)
    params = _params()
    opt = _make(cls, params, backend=backend)
    _grads(params, 0)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=re.escape(f"backend {backend!r} cannot run on cpu tensors: {reason}")):
        opt.step()
    assert_unchanged(opt, params, before, f"backend={backend}")
    assert bool(opt.state) == cls._spec.eager_state


def test_fusedopt_backend_overrides_auto(monkeypatch):
    params = _params()
    reason = _unavailable("cuda")
    monkeypatch.setenv("FUSEDOPT_BACKEND", "cuda")
    auto = _make(fusedopt.AdamW, params)
    _grads(params, 0)
    before = snapshot(auto, params)
    with pytest.raises(RuntimeError, match=re.escape(f"backend 'cuda' cannot run on cpu tensors: {reason}")):
        auto.step()
    assert_unchanged(auto, params, before, "FUSEDOPT_BACKEND=cuda")
    # An explicit backend is not overridden.
    explicit = _make(fusedopt.AdamW, params, backend="reference")
    explicit.step()
    assert float(explicit.state[params[0][0]]["step"]) == 1
    monkeypatch.setenv("FUSEDOPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=re.escape("Invalid FUSEDOPT_BACKEND: 'bogus'")):
        auto.step()
    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    auto.step()
    assert float(auto.state[params[0][0]]["step"]) == 1


# ---------------------------------------------------------------------------------------------
# The step protocol
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_amp_scaling_supported(cls):
    assert cls._step_supports_amp_scaling is True


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_frozen_and_intermittent_params(cls):
    """A param without a grad never gets state (but the one a family makes at construction, as
    torch's Adagrad: it stays at step 0); one with a grad every other step advances its step
    count only on those steps."""
    always, sometimes, frozen = torch.randn(100), torch.randn(100), torch.randn(100)
    opt = cls([always, sometimes, frozen], **_extra(cls))
    for step in range(8):
        always.grad = torch.randn(100)
        sometimes.grad = torch.randn(100) if step % 2 else None
        opt.step()
    assert float(opt.state[always]["step"]) == 8
    assert float(opt.state[sometimes]["step"]) == 4
    if cls._spec.eager_state:
        assert float(opt.state[frozen]["step"]) == 0
    else:
        assert frozen not in opt.state


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_zero_grad(cls):
    params = _params()
    opt = _make(cls, params)
    _grads(params, 0)
    opt.zero_grad(set_to_none=False)
    assert all(bool((p.grad == 0).all()) for group in params for p in group)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for group in params for p in group)
    _grads(params, 0)
    opt.zero_grad()
    assert all(p.grad is None for group in params for p in group)


def test_step_closure_returns_loss():
    """The closure runs with grad enabled and its loss is returned; the update equals torch's
    AdamW given the same closure."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
    models = [torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fusedopt.AdamW(models[0].parameters(), lr=1e-2, backend="reference"),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2, foreach=False)]
    for step in range(8):
        losses = []
        for model, opt in zip(models, opts):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        assert isinstance(losses[0], torch.Tensor) and losses[0].requires_grad
        assert_close(losses[0].detach(), losses[1].detach(), torch.float32, f"step {step} loss")
    for i, (a, b) in enumerate(zip(models[0].parameters(), models[1].parameters())):
        assert_close(a, b, torch.float32, f"param {i}")
    assert fusedopt.AdamW([torch.randn(3)], backend="reference").step() is None


def test_defaults_match_torch_and_lion_pytorch():
    """Positional arguments and defaults as torch.optim's (and lion-pytorch's for Lion)."""
    from lion_pytorch import Lion as LionPytorch

    def positional(fn):
        sig = inspect.signature(fn)
        return [(n, p.default) for n, p in sig.parameters.items()
                if p.kind == p.POSITIONAL_OR_KEYWORD and n != "self"]

    for ours, theirs in [(fusedopt.Adam, torch.optim.Adam), (fusedopt.AdamW, torch.optim.AdamW),
                         (fusedopt.Adam8bit, torch.optim.Adam), (fusedopt.AdamW8bit, torch.optim.AdamW)]:
        assert positional(ours.__init__) == positional(theirs.__init__), ours.__name__
    for ours in (fusedopt.Lion, fusedopt.Lion8bit):
        assert positional(ours.__init__) == positional(LionPytorch.__init__)[:4], ours.__name__


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_from_checkpoint_is_bit_identical(cls, dtype):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict, then 4 more
    steps: params and every state tensor bit-identical to the run that never stopped."""
    kw = dict(max_grad_norm=1.0, **({"amsgrad": True} if cls in having("amsgrad") else {}))
    params = _params(dtype=dtype)
    opt = _make(cls, params, **kw)
    for step in range(4):
        _grads(params, step, only=0 if step == 0 else None)
        opt.step()
    sd = checkpoint(opt.state_dict())

    resumed = [[p.clone() for p in group] for group in params]
    ropt = _make(cls, resumed, **kw)
    ropt.load_state_dict(sd)
    for step in range(4, 8):
        _grads(params, step)
        _grads(resumed, step)
        opt.step()
        ropt.step()
    for gi, (og, rg) in enumerate(zip(params, resumed)):
        for pi, (p, q) in enumerate(zip(og, rg)):
            where = f"group {gi} param {pi}"
            assert_identical(q, p, f"{where} param")
            assert set(ropt.state[q]) == set(opt.state[p])
            for k, v in opt.state[p].items():
                assert_identical(ropt.state[q][k], v, f"{where} {k}")
    assert [g["lr"] for g in ropt.param_groups] == [g["lr"] for g in opt.param_groups]
    if cls in EIGHT_BIT:
        assert opt.state[params[0][0]][cls._spec.states[0].name].dtype == torch.uint8


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_non_contiguous_param_updates_in_place(cls):
    """A transposed (non-contiguous) param is updated in place, exactly as its memory twin (the
    contiguous tensor of the same memory, ``base``, with the grad transposed alike) would be:
    its states lie in its layout, and 8-bit blocks run over its memory order (fusedopt.layout).
    LAMB and LARS within fp32's tolerance (their per-tensor norms may sum in another order)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, 30, generator=gen)
    view = base.t()  # the param: a view that is not contiguous
    dense = base.clone()  # its memory twin
    assert not view.is_contiguous()
    opt, dopt = cls([view], **_extra(cls)), cls([dense], **_extra(cls))
    for step in range(8):
        g = torch.randn(30, 40, generator=gen)
        view.grad, dense.grad = g.clone(), g.t().contiguous()
        opt.step()
        dopt.step()
    assert view.data_ptr() == base.data_ptr() and not view.is_contiguous()
    # the per-tensor-norm families within fp32's tolerance (their norms may sum in another order)
    same = (assert_identical if cls._spec.shape == families.ELEMENTWISE
            else (lambda a, e, what: assert_close(a, e, torch.float32, what)))
    same(view.t(), dense, "non-contiguous param")
    for k, v in dopt.state[dense].items():
        mine = opt.state[view][k]
        if mine.dim() == 2:
            assert mine.stride() == view.stride(), f"{k}: strides {mine.stride()}, param {view.stride()}"
            mine = mine.t()
        same(mine, v, k)


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_mixed_dtypes_in_one_group(cls):
    """float32, bfloat16, float16 and float64 params in one group step exactly as each would in
    an optimizer of its own; the clipping norm covers all of them."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    mixed = [torch.randn(100 + i, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    alone = [p.clone() for p in mixed]
    opt = cls(mixed, **_extra(cls))
    opts = [cls([p], **_extra(cls)) for p in alone]
    clipped = [p.clone() for p in mixed]
    copt = cls(clipped, max_grad_norm=1.0, **_extra(cls))
    for step in range(8):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in mixed]
        for params in (mixed, alone, clipped):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.step()
        for o in opts:
            o.step()
        copt.step()
        norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
        assert_close(copt.last_grad_norm, norm, torch.float32, f"step {step} last_grad_norm")
    for i, (p, q, o) in enumerate(zip(mixed, alone, opts)):
        assert p.dtype == dtypes[i]
        assert_identical(p, q, f"param {i} ({p.dtype})")
        for k, v in o.state[q].items():
            assert_identical(opt.state[p][k], v, f"param {i} {k}")
        expected_state = torch.float64 if p.dtype == torch.float64 else torch.float32
        if cls not in EIGHT_BIT:
            assert opt.state[p][cls._spec.states[0].name].dtype == expected_state


def test_auto_resolves_per_kind_of_step(monkeypatch):
    """``auto`` looks up its preference per kind of step (family, 8-bit or not, the norm), and
    the optimizer asks with the kind of each batch."""
    from fusedopt import backends

    assert set(backends.AUTO_ORDER) == set(backends.KINDS)
    with pytest.raises(ValueError, match="Invalid kind: 'adafactor'"):
        backends.resolve("auto", torch.device("cpu"), kind="adafactor")
    asked = []
    real = backends.resolve

    def spy(backend, device, tensors=(), kind="adam", **requirements):
        asked.append(kind)
        return real(backend, device, tensors, kind, **requirements)

    monkeypatch.setattr(backends, "resolve", spy)
    big, small = torch.randn(4096), torch.randn(10)
    opt = fusedopt.AdamW8bit([big, small], max_grad_norm=1.0)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert sorted(asked) == ["adam", "adam8bit"]
    asked.clear()
    fusedopt.clip_grad_norm_([big], 1.0)
    assert asked == ["norm"]


def _replace_state(opt, p, change: str) -> None:
    """Replace part of ``opt.state`` as user code does between steps (the same on any optimizer)."""
    if change == "tensor":  # e.g. states moved to the host and back: new tensors
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"] * 0.5
    elif change == "dict":
        opt.state[p] = {k: v.clone() * (0.5 if k == "exp_avg_sq" else 1.0) for k, v in opt.state[p].items()}
    elif change == "del":  # the param starts over (its state is created again)
        del opt.state[p]
    elif change == "all":
        from collections import defaultdict

        opt.state = defaultdict(dict)


@pytest.mark.parametrize("change", ["tensor", "dict", "del", "all"])
@pytest.mark.parametrize("grads", ["same", "new"])  # zeroed in place (the plan is reused) or set_to_none
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_replaced_state_is_what_the_next_step_uses(backend, grads, change):
    """A state tensor or dict replaced (or removed) between steps is what the next step reads and
    updates, as in torch.optim, even though fusedopt reuses the last step's batches and launch
    tables when nothing else changed."""
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in (7, 300, 4097)]
    ours, theirs = [p.clone() for p in init], [p.clone() for p in init]
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend)
    topt = torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(5):
        values = [torch.randn(p.shape, generator=gen) for p in init]
        for p, q, v in zip(ours, theirs, values):
            if grads == "same" and p.grad is not None:
                p.grad.copy_(v)
                q.grad.copy_(v)
            else:
                p.grad, q.grad = v.clone(), v.clone()
        if step == 3:
            _replace_state(opt, ours[1], change)
            _replace_state(topt, theirs[1], change)
        opt.step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            assert_close(p, q, torch.float32, f"step {step} param {i}")
            for key, value in topt.state[q].items():
                assert_close(opt.state[p][key], value, torch.float32, f"step {step} param {i} {key}")


def _train(opt, params, steps):
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("cls", EIGHT_BIT, ids=name)
def test_8bit_warns_once_when_every_state_stays_fp32(cls):
    # A model whose tensors are all under min_8bit_size gets no 8-bit state: say so, once (when
    # the states are made), naming the knob; the states really are fp32.
    params = [torch.randn(300, requires_grad=True), torch.randn(17, requires_grad=True)]
    opt = cls(params, backend="reference", **{**kwargs_of(cls), "min_8bit_size": 4096})
    with pytest.warns(UserWarning, match=r"min_8bit_size=4096.*fp32.*smaller min_8bit_size") as caught:
        _train(opt, params, 3)
    assert len([w for w in caught if "min_8bit_size" in str(w.message)]) == 1
    assert caught[0].filename == __file__  # points at the caller's opt.step()
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, params, 2)  # later steps: silent


@pytest.mark.parametrize("cls", EIGHT_BIT, ids=name)
@pytest.mark.parametrize("extra", [dict(), dict(min_8bit_size=64)], ids=["one-large-tensor", "lowered"])
def test_8bit_does_not_warn_when_some_state_is_8bit(cls, extra):
    big = 5000 if not extra else 300
    params = [torch.randn(big, requires_grad=True), torch.randn(17, requires_grad=True)]
    opt = cls(params, backend="reference", **{**kwargs_of(cls), "min_8bit_size": 4096, **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, params, 3)
    assert opt.state[params[0]][cls._spec.states[0].name].dtype == torch.uint8
