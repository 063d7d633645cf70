"""The base class against torch.optim's ``Optimizer`` semantics, as a user of torch.optim relies
on them: param lists edited between steps, copies (deepcopy, pickle, torch.save), the hooks,
named params, torch's implementation keywords, param groups added later, zero_grad, closures,
state dict round trips and LR schedulers.

Every class runs on the ``reference`` and ``triton`` backends (8-bit classes with a small
``min_8bit_size``, so the 8-bit path runs on the test's small tensors). The oracle is
torch.optim where torch has the family (Adam, AdamW, SGD, Adagrad, RMSprop); for the others, a fresh fusedopt
optimizer of the same backend set up to the state the edit should leave (bit-identical), or the
original optimizer stepping on the same gradients.
"""

from __future__ import annotations

import copy
import gc
import inspect
import io
import pickle
import re
import weakref

import pytest
import torch
import torch.optim.optimizer as torch_optimizer

import fusedopt
import cases
from cases import CLASSES, EIGHT_BIT, checkpoint
from fusedopt import backends
from fusedopt.testing import assert_close, assert_identical

TORCH = {cls: cases.TORCH[cls.__name__] for cls in CLASSES if cls.__name__ in cases.TORCH}
MIN_8BIT = 64  # tensors of 64 elements and more get 8-bit states


def name(cls):
    return cls.__name__


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    reason = backends.unavailable_reason(request.param, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {request.param!r}: {reason}")
    cls = request.node.callspec.params.get("cls")
    if cls is not None:
        cases.skip_unless_backend_has(cls, request.param)
    return request.param


def _kw(cls, backend="reference", **kw):
    """The family's stateful arguments (cases.kwargs_of: 8-bit states from MIN_8BIT elements)."""
    return {"backend": backend, **cases.kwargs_of(cls, **({"min_8bit_size": MIN_8BIT} if cls in EIGHT_BIT else {})),
            **kw}


def _torch_kw(kw):
    """The arguments of a fusedopt optimizer that torch.optim takes too."""
    return {k: v for k, v in kw.items() if k not in ("backend", "min_8bit_size", "max_grad_norm")}


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _set_grads(gen, worlds):
    """The same random grad (never zero) on the tensor of each name in every world."""
    names = sorted(worlds[0])
    for n in names:
        g = _randn(gen, *worlds[0][n].shape)
        for w in worlds:
            w[n].grad = g.clone()


def _compare_worlds(ours, opt, theirs, topt, exact: bool, where: str) -> None:
    """Every named tensor, and every state tensor of the oracle's state, the same in both."""
    same = (lambda a, e, what: assert_identical(a, e, what)) if exact else \
        (lambda a, e, what: assert_close(a, e, torch.float32, what))
    for n in sorted(ours):
        p, q = ours[n], theirs[n]
        same(p.detach(), q.detach(), f"{where}: param {n}")
        state, tstate = opt.state.get(p, {}), topt.state.get(q, {})
        stepless = getattr(getattr(opt, "_spec", None), "stepless", False)
        keys = set(state) - ({"step"} if stepless and "step" not in tstate else set())
        # fusedopt keeps a step for every family; torch's SGD keeps none
        assert keys == set(tstate), f"{where}: param {n} state keys {set(state)} != {set(tstate)}"
        for key, value in tstate.items():
            same(state[key], value, f"{where}: param {n} {key}")


# ---------------------------------------------------------------------------------------------
# 1. param_groups edited between steps
# ---------------------------------------------------------------------------------------------

# name -> shape. Group 0 starts as a, b, c, f (b and f the same size), group 1 as d; e, g, h
# join later. 300, 200, 150 and 64 elements get 8-bit states; 17 and 40 stay fp32.
SHAPES = dict(a=(300,), b=(17,), c=(20, 10), f=(17,), d=(64,), e=(300,), g=(150,), h=(40,))


def _index(params, x):
    """The position of tensor ``x`` (by identity: ``list.index`` compares tensors' values)."""
    return next(i for i, p in enumerate(params) if p is x)


def _swap(params, x, y):
    i, j = _index(params, x), _index(params, y)
    params[i], params[j] = params[j], params[i]


def _reassign(opt, t):
    opt.param_groups = [{**g, "params": list(g["params"])} for g in reversed(opt.param_groups)]


def _hyper(opt, t):
    g0, g1 = opt.param_groups
    g0["lr"] = 0.05
    g1["weight_decay"] = 0.3
    if "betas" in g1:
        g1["betas"] = (0.8, 0.95)


# (what is done, how) on an optimizer and its world (name -> tensor); the same on torch.optim.
EDITS = [
    ("replace a param", lambda opt, t: opt.param_groups[0]["params"].__setitem__(0, t["e"])),
    ("reorder params of the same size", lambda opt, t: _swap(opt.param_groups[0]["params"], t["b"], t["f"])),
    ("reorder params of different sizes", lambda opt, t: _swap(opt.param_groups[0]["params"], t["e"], t["c"])),
    ("append a param", lambda opt, t: opt.param_groups[0]["params"].append(t["g"])),
    ("remove a param", lambda opt, t: opt.param_groups[0]["params"].pop(_index(opt.param_groups[0]["params"], t["b"]))),
    ("move a param to another group", lambda opt, t: opt.param_groups[1]["params"].append(
        opt.param_groups[0]["params"].pop(_index(opt.param_groups[0]["params"], t["c"])))),
    ("replace the params list", lambda opt, t: opt.param_groups[0].__setitem__(
        "params", [t["h"], *reversed(opt.param_groups[0]["params"])])),
    ("change hyper-parameters", _hyper),
    ("reassign opt.param_groups", _reassign),
]
# The edits that keep every group's length, where a stale plan could be reused: what the
# (interpreted, slower) Triton backend runs.
SAME_LENGTH = ("replace a param", "reorder params of the same size", "reorder params of different sizes",
               "change hyper-parameters", "reassign opt.param_groups")


def _rebuilt(cls, opt, kw):
    """A fresh optimizer over ``opt``'s current groups, holding ``opt``'s state: what ``opt``
    must step like after an edit."""
    fresh = cls([{**g, "params": list(g["params"])} for g in opt.param_groups], **kw)
    for p, s in opt.state.items():
        fresh.state[p] = dict(s)
    return fresh


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_param_groups_edited_between_steps(cls, backend):
    """Params replaced, reordered (same and different sizes), appended, removed, moved across
    groups, the whole list replaced, hyper-parameters changed and ``opt.param_groups``
    reassigned, one after the other with a step after each: every step updates exactly the
    params the groups hold now (a new param starts from fresh state, a removed one stays as it
    is with its grad ignored), as torch.optim does (Adam, AdamW) or as a fresh optimizer set up
    to the same groups and state does (the others). Triton runs the edits that keep the
    groups' lengths (the others rebuild the batches in any case)."""
    gen = torch.Generator().manual_seed(0)
    init = {n: _randn(gen, *s) for n, s in SHAPES.items()}
    ours = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
    theirs = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
    kw = _kw(cls, backend)

    def groups(t):
        return [{"params": [t[n] for n in "abcf"]}, {"params": [t["d"]], "lr": 5e-3}]

    opt = cls(groups(ours), **kw)
    torch_cls = TORCH.get(cls)
    topt = torch_cls(groups(theirs), **_torch_kw(kw)) if torch_cls else cls(groups(theirs), **kw)
    _set_grads(gen, [ours, theirs])
    opt.step()
    topt.step()
    for what, edit in EDITS:
        if backend == "triton" and what not in SAME_LENGTH:
            continue
        edit(opt, ours)
        edit(topt, theirs)
        if torch_cls is None:
            topt = _rebuilt(cls, topt, kw)
        _set_grads(gen, [ours, theirs])
        opt.step()
        topt.step()
        _compare_worlds(ours, opt, theirs, topt, exact=torch_cls is None, where=f"after '{what}'")


def test_param_list_check_is_an_identity_check():
    """The plan of the last step is reused only while the group holds the same param objects:
    a copy of the list reuses it, a replaced param (with a new grad of the same layout) makes
    new batches."""
    ps = [torch.randn(5) for _ in range(3)]
    opt = fusedopt.AdamW(ps, backend="reference")
    for p in ps:
        p.grad = torch.randn(5)
    opt.step()
    plan = opt._plans[0]
    opt.param_groups[0]["params"] = list(ps)
    assert opt._plan_group(0, opt.param_groups[0]) is plan
    opt.param_groups[0]["params"][1] = q = torch.randn(5)
    q.grad = torch.randn(5)
    assert opt._plan_group(0, opt.param_groups[0]).batches is None  # batched anew


# ---------------------------------------------------------------------------------------------
# 2. deepcopy, pickle, torch.save of the whole optimizer
# ---------------------------------------------------------------------------------------------


def _saved(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "torch.save": _saved}


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_copied_optimizer_steps_like_the_original(cls, backend):
    """``copy.deepcopy``, a pickle round trip and ``torch.save``/``torch.load`` of an optimizer
    that has stepped give one that keeps its backend and ``max_grad_norm`` and steps exactly as
    the original from then on (its own copies of the params, the same grads)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(_randn(gen, n)) for n in (200, 17, 100)]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}], **_kw(cls, backend, max_grad_norm=1.0))
    for p in params:
        p.grad = _randn(gen, *p.shape) * 3
    opt.step()
    copies = {how: make(opt) for how, make in COPIES.items()}
    for how, c in copies.items():
        assert type(c) is cls and c.backend == backend and c.max_grad_norm == 1.0, how
    for step in range(2):
        grads = [_randn(gen, *p.shape) * 3 for p in params]
        for o in (opt, *copies.values()):
            for p, g in zip((p for group in o.param_groups for p in group["params"]), grads):
                p.grad = g.clone()
            o.step()
        for how, c in copies.items():
            assert_identical(c.last_grad_norm, opt.last_grad_norm, f"{how} step {step} last_grad_norm")
            theirs = [p for group in c.param_groups for p in group["params"]]
            for i, (p, q) in enumerate(zip(params, theirs)):
                assert_identical(q.detach(), p.detach(), f"{how} step {step} param {i}")
                assert set(c.state[q]) == set(opt.state[p])
                for key, value in opt.state[p].items():
                    assert_identical(c.state[q][key], value, f"{how} step {step} param {i} {key}")


# ---------------------------------------------------------------------------------------------
# 3. Hooks
# ---------------------------------------------------------------------------------------------


def _register_hooks(opt, log):
    """The same hooks on any optimizer; what they see goes to ``log``."""
    lr = lambda o: float(o.param_groups[0]["lr"])  # noqa: E731
    opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load pre", lr(o))))

    def load_pre_replacing(o, sd):
        log.append(("load pre, returns a dict", sorted(sd)))
        new = {**sd, "param_groups": [{**g, "lr": 0.125} for g in sd["param_groups"]]}
        return new

    opt.register_load_state_dict_pre_hook(load_pre_replacing)
    opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load pre, prepended",)), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load post", lr(o))))
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load post, prepended",)), prepend=True)
    opt.register_state_dict_pre_hook(lambda o: log.append(("state_dict pre",)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("step pre", float(o.state_dict()["extra"]))))

    def step_pre_replacing(o, args, kwargs):
        return (args[0], lambda: log.append(("closure", torch.is_grad_enabled())) or 7.0), kwargs

    opt.register_step_pre_hook(step_pre_replacing)
    opt.register_step_post_hook(lambda o, args, kwargs: log.append(("step post", args[1]())))


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_hooks_run_as_in_torch(cls, backend):
    """load_state_dict pre- and post-hooks (a pre-hook's returned dict is what loads,
    ``prepend`` orders them), state_dict pre- and post-hooks, step pre- and post-hooks (a
    pre-hook's new args reach fusedopt's step) and the global step hooks run as they do on
    torch.optim.AdamW with the same hooks: the same calls, in the same order, seeing the same."""
    logs = []
    for make in (lambda ps: cls(ps, **_kw(cls, backend, lr=1e-3)), lambda ps: torch.optim.AdamW(ps, lr=1e-3)):
        params = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(7))]
        opt, log = make(params), []
        _register_hooks(opt, log)
        handles = [torch_optimizer.register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global pre",))),
                   torch_optimizer.register_optimizer_step_post_hook(lambda o, a, k: log.append(("global post",)))]
        try:
            for p in params:
                p.grad = torch.randn(p.shape)
            loss = opt.step()
            log.append(("step returned", loss))
            sd = opt.state_dict()
            log.append(("state_dict extra", sd.get("extra")))
            opt.load_state_dict(sd)
            log.append(("loaded lr", [g["lr"] for g in opt.param_groups]))
        finally:
            for h in handles:
                h.remove()
        logs.append(log)
    ours, theirs = logs
    assert ours == theirs
    assert ("loaded lr", [0.125]) in ours and ("closure", True) in ours


def test_hooks_removed_and_not_copied():
    """A removed hook no longer runs; as in torch, a deepcopy carries no hooks."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = fusedopt.AdamW([p], backend="reference")
    log = []
    h = opt.register_load_state_dict_post_hook(lambda o: log.append("post"))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    h.remove()
    opt.load_state_dict(sd)
    opt.register_load_state_dict_post_hook(lambda o: log.append("post"))
    copy.deepcopy(opt).load_state_dict(sd)
    assert log == ["post"]


# ---------------------------------------------------------------------------------------------
# 5. Named params
# ---------------------------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 70))


def _bookkeeping(sd):
    """What torch's base class records of the params: the ids and the names of every group."""
    return [(g["params"], g.get("param_names")) for g in sd["param_groups"]], sorted(sd["state"])


def _as_named(m):
    return m.named_parameters()


def _as_named_groups(m, named=True):
    pairs = list(m.named_parameters())
    take = (lambda ps: ps) if named else (lambda ps: [p for _, p in ps])
    return [{"params": take(pairs[:2])}, {"params": take(pairs[2:]), "lr": 0.1}]


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_named_parameters(cls, backend):
    """``(name, param)`` pairs, as ``model.named_parameters()`` or in group dicts, are accepted
    as torch.optim accepts them: ``param_names`` in the groups and in ``state_dict()`` as
    torch.optim.AdamW records them; the step is the one of the same optimizer unnamed."""
    for named, unnamed in ((_as_named, lambda m: m.parameters()),
                           (_as_named_groups, lambda m: _as_named_groups(m, named=False))):
        models = [_model() for _ in range(3)]
        opt = cls(named(models[0]), **_kw(cls, backend))
        plain = cls(unnamed(models[1]), **_kw(cls, backend))
        topt = torch.optim.AdamW(named(models[2]))
        assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in topt.param_groups]
        assert all("param_names" not in g for g in plain.param_groups)
        x = torch.randn(4, 16)
        for m in models:
            m(x).square().mean().backward()
        opt.step()
        plain.step()
        topt.step()
        assert _bookkeeping(opt.state_dict()) == _bookkeeping(topt.state_dict())
        for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            assert_identical(p.detach(), q.detach(), n)
            for key, value in plain.state[q].items():
                assert_identical(opt.state[p][key], value, f"{n} {key}")
    names = [n for n, _ in _model().named_parameters()]
    assert opt.param_groups[0]["param_names"] + opt.param_groups[1]["param_names"] == names


NAMES_MIXED = [
    (lambda m: [*list(m.named_parameters())[:1], *list(m.parameters())[1:]],
     "all optimizer params should be with/without names. Some param names are missing"),
    (lambda m: [{"params": list(m.named_parameters())[:2]}, {"params": list(m.parameters())[2:]}],
     "all optimizer param groups should be with/without names. cannot add param group without names"),
    (lambda m: [{"params": list(m.parameters())[:2]}, {"params": list(m.named_parameters())[2:]}],
     "all optimizer param groups should be with/without names. cannot add param group with names"),
]


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_named_and_unnamed_mixed_raise_as_torch(cls):
    for make, msg in NAMES_MIXED:
        for c, kw in ((torch.optim.AdamW, {}), (cls, _kw(cls))):
            with pytest.raises(ValueError, match=re.escape(msg)):
                c(make(_model()), **kw)


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.Lion8bit], ids=name)
def test_named_and_unnamed_state_dicts_load_as_torch(cls):
    """A named optimizer loads an unnamed state dict (keeping its names) and an unnamed one a
    named dict (taking its names), as torch.optim does; the states load either way."""
    def stepped(c, named, **kw):
        m = _model()
        o = c(m.named_parameters() if named else m.parameters(), **kw)
        m(torch.randn(4, 16)).square().mean().backward()
        o.step()
        return o

    for saved_named in (True, False):
        for loading_named in (True, False):
            sd = stepped(torch.optim.AdamW, saved_named).state_dict()
            expect = stepped(torch.optim.AdamW, loading_named)
            expect.load_state_dict(sd)
            ours = stepped(cls, loading_named, **_kw(cls))
            ours.load_state_dict(sd)
            assert [g.get("param_names") for g in ours.param_groups] == \
                [g.get("param_names") for g in expect.param_groups], (saved_named, loading_named)
            assert _bookkeeping(ours.state_dict()) == _bookkeeping(expect.state_dict())


# ---------------------------------------------------------------------------------------------
# 6. torch's implementation keywords
# ---------------------------------------------------------------------------------------------

# Every honoured value, in three optimizers.
HONOURED = [dict(foreach=True, capturable=True), dict(fused=True, capturable=False),
            dict(foreach=None, fused=None, differentiable=False)]
REFUSED = [
    (dict(foreach=False), ValueError, "foreach=False asks for torch.optim's for-loop implementation"),
    (dict(fused=False), ValueError, "fused=False asks for torch.optim's non-fused implementation"),
    (dict(fused=True, foreach=True), ValueError, "`fused` and `foreach` cannot be `True` together."),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
    (dict(foreach="yes"), TypeError, "Invalid foreach: 'yes'"),
    (dict(fused=1), TypeError, "Invalid fused: 1"),
    (dict(capturable=None), TypeError, "Invalid capturable: None"),
    (dict(differentiable=0), TypeError, "Invalid differentiable: 0"),
]


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_torch_keywords_honoured(cls, backend):
    """Every value fusedopt honours is accepted, kept in ``defaults`` and the groups as torch
    keeps it, and steps exactly as the optimizer without it."""
    gen = torch.Generator().manual_seed(2)
    init = [_randn(gen, n) for n in (100, 9)]
    plain_params = [p.clone() for p in init]
    plain = cls(plain_params, **_kw(cls, backend))
    assert {k: plain.defaults[k] for k in ("foreach", "capturable", "differentiable", "fused")} == \
        dict(foreach=None, capturable=False, differentiable=False, fused=None)
    opts = []
    for flags in HONOURED:
        params = [p.clone() for p in init]
        opt = cls(params, **_kw(cls, backend, **flags))
        for k, v in flags.items():
            assert opt.defaults[k] is v and opt.param_groups[0][k] is v
        opts.append((opt, params))
    for _ in range(2):
        grads = [_randn(gen, *p.shape) for p in init]
        for o, ps in [(plain, plain_params), *opts]:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for flags, (_, ps) in zip(HONOURED, opts):
        for i, (p, q) in enumerate(zip(ps, plain_params)):
            assert_identical(p, q, f"{flags} param {i}")


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_torch_keywords_refused(cls):
    """A value fusedopt cannot honour raises, naming the keyword and why: as an argument, in a
    group at construction and in add_param_group (which adds nothing)."""
    for flags, exc, msg in REFUSED:
        with pytest.raises(exc, match=re.escape(msg)):
            cls([torch.randn(10)], **_kw(cls), **flags)
        with pytest.raises(exc, match=re.escape(msg)):
            cls([{"params": [torch.randn(10)]}, {"params": [torch.randn(10)], **flags}], **_kw(cls))
        opt = cls([torch.randn(10)], **_kw(cls))
        with pytest.raises(exc, match=re.escape(msg)):
            opt.add_param_group({"params": [torch.randn(10)], **flags})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_torch_keywords_in_the_signature(cls):
    """Keyword-only, in torch.optim.Adam's (AdamW's) order, after the torch keywords the class
    shares with torch and before fusedopt's own."""
    sig = inspect.signature(cls.__init__).parameters
    keyword_only = [n for n, p in sig.items() if p.kind == p.KEYWORD_ONLY]
    torch_cls = TORCH.get(cls, torch.optim.AdamW if "W" in cls.__name__ else torch.optim.Adam)
    theirs = [n for n, p in inspect.signature(torch_cls.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY]
    if cls in (fusedopt.Adam, fusedopt.AdamW, fusedopt.Adam8bit, fusedopt.AdamW8bit):
        assert keyword_only[:len(theirs)] == theirs
        assert {n: sig[n].default for n in theirs} == \
            {n: p.default for n, p in inspect.signature(torch_cls.__init__).parameters.items() if n in theirs}
    else:
        flags = [n for n in keyword_only if n in ("foreach", "capturable", "differentiable", "fused")]
        assert flags == ["foreach", "capturable", "differentiable", "fused"]
    for flag in ("foreach", "capturable", "differentiable", "fused"):
        assert flag in cls.__doc__


def test_torch_keywords_in_state_dicts_both_ways():
    """A torch.optim.AdamW state dict with ``foreach=False`` (how the saver ran, not the math)
    loads: fusedopt keeps its own implementation keywords; a fusedopt state dict carries torch's
    keys, so torch.optim.AdamW loads it with all of its group entries."""
    params = [torch.nn.Parameter(torch.randn(30))]
    topt = torch.optim.AdamW(params, foreach=False, fused=None)
    params[0].grad = torch.randn(30)
    topt.step()
    opt = fusedopt.AdamW([torch.nn.Parameter(params[0].detach().clone())], fused=True, backend="reference")
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["foreach"] is None and opt.param_groups[0]["fused"] is True
    back = torch.optim.AdamW([torch.nn.Parameter(params[0].detach().clone())])
    back.load_state_dict(opt.state_dict())
    assert set(back.param_groups[0]) >= set(topt.param_groups[0])
    assert back.param_groups[0]["fused"] is True


# ---------------------------------------------------------------------------------------------
# The rest of the protocol a torch.optim user relies on
# ---------------------------------------------------------------------------------------------


def _adamw_pair(backend, n=(50, 7), lr=1e-2, **kw):
    gen = torch.Generator().manual_seed(4)
    init = [_randn(gen, k) for k in n]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    lr_t = lr.clone() if isinstance(lr, torch.Tensor) else lr
    return ours, theirs, fusedopt.AdamW(ours, lr=lr, backend=backend, **kw), torch.optim.AdamW(theirs, lr=lr_t, **kw), gen


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_add_param_group_after_steps(cls, backend):
    """A group added after a step takes the defaults for what it does not set, starts from
    fresh state and is stepped from then on, as torch.optim's; a param already in a group is
    refused (as torch) and changes nothing."""
    gen = torch.Generator().manual_seed(5)
    init = {n: _randn(gen, *s) for n, s in dict(a=(100,), b=(9,), c=(80,), d=(5,)).items()}
    ours = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
    theirs = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
    kw = _kw(cls, backend, lr=2e-3)
    torch_cls = TORCH.get(cls)
    opt = cls([ours["a"], ours["b"]], **kw)
    topt = torch_cls([theirs["a"], theirs["b"]], **_torch_kw(kw)) if torch_cls else cls([theirs["a"], theirs["b"]], **kw)
    _set_grads(gen, [ours, theirs])
    opt.step()
    topt.step()
    for o, t in ((opt, ours), (topt, theirs)):
        with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
            o.add_param_group({"params": [t["c"], t["a"]]})
        o.add_param_group({"params": [t["c"], t["d"]], "lr": 1e-2})
    assert len(opt.param_groups) == 2
    assert {k: v for k, v in opt.param_groups[1].items() if k not in ("params", "lr")} == \
        {k: v for k, v in opt.defaults.items() if k != "lr"}
    for step in range(2):
        _set_grads(gen, [ours, theirs])
        opt.step()
        topt.step()
        _compare_worlds(ours, opt, theirs, topt, exact=torch_cls is None, where=f"step {step} after add_param_group")


def test_add_param_group_is_the_dict_given():
    """As in torch, the group added is the dict itself, completed with the defaults (a later
    change to it is a change to the group)."""
    for c in (torch.optim.AdamW, fusedopt.AdamW):
        group = {"params": (torch.randn(3),), "lr": 0.5}
        opt = c([torch.randn(2)])
        opt.add_param_group(group)
        assert opt.param_groups[1] is group and isinstance(group["params"], list)
        assert group["weight_decay"] == opt.defaults["weight_decay"]


@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_grad_then_step_as_torch(backend, set_to_none):
    """zero_grad(set_to_none=False) leaves zero grads that the next step uses (state advances, as
    in torch); set_to_none=True leaves None grads that the next step skips."""
    ours, theirs, opt, topt, gen = _adamw_pair(backend)
    for step in range(4):
        if step == 2:
            opt.zero_grad(set_to_none=set_to_none)
            topt.zero_grad(set_to_none=set_to_none)
        else:
            for p, q in zip(ours, theirs):
                g = _randn(gen, *p.shape)
                if p.grad is None:
                    p.grad, q.grad = g.clone(), g.clone()
                else:  # in place: the same grad tensors every step
                    p.grad.copy_(g)
                    q.grad.copy_(g)
        opt.step()
        topt.step()
        assert [p.grad is None for p in ours] == [q.grad is None for q in theirs]
        _compare_worlds(dict(enumerate(ours)), opt, dict(enumerate(theirs)), topt, False, f"step {step}")


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_step_closure(cls, backend):
    """The closure is called once, with grad enabled, and its loss is returned; the step uses
    the grads it computed."""
    gen = torch.Generator().manual_seed(6)
    x = _randn(gen, 8, 100)
    w, v = torch.nn.Parameter(_randn(gen, 100)), torch.nn.Parameter(_randn(gen, 100))
    v.data.copy_(w.data)
    opt, ref = cls([w], **_kw(cls, backend)), cls([v], **_kw(cls, backend))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()
        return loss

    for step in range(2):
        loss = opt.step(closure)
        v.grad = None
        expected = (x @ v).square().mean()
        expected.backward()
        ref.step()
        assert_close(loss.detach(), expected.detach(), torch.float32, f"step {step} loss")
        assert_identical(w.detach(), v.detach(), f"step {step} param")
    assert calls == [True, True]


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_no_references_kept_to_grads_or_removed_params(cls, backend):
    """As with torch.optim, ``opt.zero_grad()`` frees the gradients (before the next forward,
    not at the next step), and a param whose group was removed and whose state was deleted is
    freed at the next step; the steps stay those of an optimizer never zeroed."""
    gen = torch.Generator().manual_seed(7)
    init = [_randn(gen, n) for n in (100, 9)]
    ps = [torch.nn.Parameter(p.clone()) for p in init]
    twin_ps = [torch.nn.Parameter(p.clone()) for p in init]
    extra = torch.nn.Parameter(_randn(gen, 70))
    opt = cls([{"params": ps}, {"params": [extra]}], **_kw(cls, backend))
    twin = cls(twin_ps, **_kw(cls, backend))
    for step in range(3):
        grads = [_randn(gen, *p.shape) for p in init]
        for p, q, g in zip(ps, twin_ps, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 0:
            extra.grad = _randn(gen, 70)
        opt.step()
        twin.step()
        released = [weakref.ref(p.grad) for p in ps]
        opt.zero_grad()
        gc.collect()
        assert all(r() is None for r in released), f"step {step}: a zeroed grad is still referenced"
        if step == 0:
            removed = weakref.ref(extra)
            opt.param_groups.pop()
            del opt.state[extra], extra
    gc.collect()
    assert removed() is None, "a removed param is still referenced"
    for i, (p, q) in enumerate(zip(ps, twin_ps)):
        assert_identical(p.detach(), q.detach(), f"param {i}")
        for key, value in twin.state[q].items():
            assert_identical(opt.state[p][key], value, f"param {i} {key}")


SCHEDULERS = {
    "StepLR": (lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5), False),
    "LambdaLR": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (e + 1)), False),
    "OneCycleLR": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10, cycle_momentum=True), False),
    "ReduceLROnPlateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0), True),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_lr_schedulers_as_torch(backend, scheduler, tensor_lr):
    """StepLR, LambdaLR, OneCycleLR (cycling beta1 through ``betas``) and ReduceLROnPlateau
    drive fusedopt.AdamW as torch.optim.AdamW, with a float lr or a tensor lr changed in place;
    the scheduler's and the optimizer's state dicts resume both the same way."""
    make, metric = SCHEDULERS[scheduler]
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    ours, theirs, opt, topt, gen = _adamw_pair(backend, lr=lr)
    sched, tsched = make(opt), make(topt)
    for step in range(3):
        grads = [_randn(gen, *p.shape) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        for s in (sched, tsched):
            s.step(1.0) if metric else s.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups]
        assert [g["betas"] for g in opt.param_groups] == [g["betas"] for g in topt.param_groups]
        _compare_worlds(dict(enumerate(ours)), opt, dict(enumerate(theirs)), topt, False, f"step {step}")
    # Resume both from checkpoints, crossing over: torch's into fusedopt and ours into torch.
    params2 = [torch.nn.Parameter(q.detach().clone()) for q in theirs]
    tparams2 = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt2 = fusedopt.AdamW(params2, lr=torch.tensor(0.0) if tensor_lr else 0.0, backend=backend)
    topt2 = torch.optim.AdamW(tparams2, lr=torch.tensor(0.0) if tensor_lr else 0.0)
    sched2, tsched2 = make(opt2), make(topt2)
    sched2.load_state_dict(checkpoint(tsched.state_dict()))
    opt2.load_state_dict(checkpoint(topt.state_dict()))
    tsched2.load_state_dict(checkpoint(sched.state_dict()))
    topt2.load_state_dict(checkpoint(opt.state_dict()))
    for step in range(3, 5):
        grads = [_randn(gen, *p.shape) for p in ours]
        for ps in (ours, theirs, params2, tparams2):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        for o, s in ((opt, sched), (topt, tsched), (opt2, sched2), (topt2, tsched2)):
            o.step()
            s.step(1.0) if metric else s.step()
        for o, ps in ((opt2, params2), (topt2, tparams2)):
            assert [g["lr"] for g in o.param_groups] == [g["lr"] for g in topt.param_groups]
            _compare_worlds(dict(enumerate(ps)), o, dict(enumerate(theirs)), topt, False, f"resumed step {step}")


def _states(opt):
    return {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in opt.state.items()}


@pytest.mark.parametrize("cls", CLASSES, ids=name)
@pytest.mark.parametrize("resize", ["p.data", "p.data and grad"])
def test_param_resized_after_its_state_raises_before_any_change(cls, backend, resize):
    """``p.data = bigger`` after the param has state: torch.optim raises at the step (its state
    no longer fits); so does fusedopt, naming the param, before any param or state changes (on
    Triton it used to read and write past the old state tensors)."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.nn.Parameter(_randn(gen, 96)), torch.nn.Parameter(_randn(gen, 80))
    opt = cls([b, a], **_kw(cls, backend, lr=1e-2))
    for _ in range(2):
        a.grad, b.grad = _randn(gen, 96), _randn(gen, 80)
        opt.step()
    a.data = _randn(gen, 300)
    if resize == "p.data and grad":
        a.grad = _randn(gen, 300)
    b.grad = _randn(gen, 80)
    params, states = [a.detach().clone(), b.detach().clone()], _states(opt)
    with pytest.raises(RuntimeError, match=r"param 1 of group 0"):
        opt.step()
    assert_identical(a, params[0], "a")
    assert_identical(b, params[1], "b")
    for n, p in (("a", a), ("b", b)):
        for k, v in opt.state[p].items():
            assert_identical(v, states[id(p)][k], f"state {k!r} of {n}")


@pytest.mark.parametrize("cls", EIGHT_BIT, ids=name)
def test_block_size_changed_after_8bit_states_raises(cls, backend):
    """A group's ``block_size`` edited after its 8-bit states exist: their absmax no longer
    matches the blocks. A ValueError naming ``block_size``, before anything changes (it used to
    step with the old blocks on the reference and corrupt memory on Triton)."""
    gen = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(_randn(gen, 512))
    opt = cls([p], **_kw(cls, backend, lr=1e-2))
    p.grad = _randn(gen, 512)
    opt.step()
    opt.param_groups[0]["block_size"] = 64
    before, states = p.detach().clone(), _states(opt)
    with pytest.raises(ValueError, match=r"block_size"):
        opt.step()
    assert_identical(p, before, "param")
    for k, v in opt.state[p].items():
        assert_identical(v, states[id(p)][k], f"state {k!r}")
    opt.param_groups[0]["block_size"] = 256  # back to the blocks the states have: steps again
    opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=name)
def test_param_rebound_to_another_dtype_steps_in_it(cls, backend):
    """``b.data = b.data.to(torch.bfloat16)`` after steps, one of two fp32 params of a batch,
    grads zeroed in place (the same tensors): the plan is made anew for the new dtype (Triton
    used to keep both params in one fp32 batch and write 4 bytes per element into the 2-byte
    param, aborting the process), and the steps equal the reference's on the same edit."""
    gen = torch.Generator().manual_seed(9)
    inits = [_randn(gen, 96), _randn(gen, 96)]
    grads = [[_randn(gen, 96), _randn(gen, 96)] for _ in range(4)]
    worlds = []
    for bk in (backend, "reference"):
        a, b = (torch.nn.Parameter(x.clone()) for x in inits)
        opt = cls([a, b], **_kw(cls, bk, lr=1e-2))
        a.grad, b.grad = torch.zeros(96), torch.zeros(96)
        for i, (ga, gb) in enumerate(grads):
            if i == 2:
                b.data = b.data.to(torch.bfloat16)
            a.grad.copy_(ga)
            b.grad.copy_(gb)
            opt.step()
        worlds.append((a, b, opt))
    (a, b, opt), (ra, rb, ropt) = worlds
    assert b.dtype == torch.bfloat16
    assert_close(a, ra, torch.float32, "a")
    assert_close(b, rb, torch.bfloat16, "b")
    for p, rp, n in ((a, ra, "a"), (b, rb, "b")):
        for k, v in ropt.state[rp].items():
            assert_close(opt.state[p][k], v, torch.float32, f"state {k!r} of {n}")
