"""The grid every optimizer test runs on, and the comparisons the families share.

Two param groups of odd sizes (a zero-size tensor, a single element, a 2-D tensor, sizes that
are not whole 256-blocks), random params and grads (never zeros; each grad tensor with its own
scale), some grads ``None`` on some steps, one param that never gets a grad. A test steps a
fusedopt optimizer and a baseline on the same data and compares after every step.
"""

from __future__ import annotations

import io
import re

import pytest
import torch

import fusedopt
from fusedopt import quant
from fusedopt.optimizer import CLASSES as _REGISTERED
from fusedopt.testing import assert_close, assert_identical

STEPS = 8

# ---------------------------------------------------------------------------------------------
# The classes, read from fusedopt's registry and their family specs (fusedopt.families): what
# the generic grids (the base class, torch semantics, master weights, compile) run over.
# ---------------------------------------------------------------------------------------------

#: Every public optimizer class.
CLASSES = list(_REGISTERED.values())
#: Those with 8-bit states.
EIGHT_BIT = [cls for cls in CLASSES if cls._quantized]

#: The hyper-parameters that give each family its full set of states in the generic grids
#: (SGD and LARS keep a buffer only with momentum; LARS has no default lr).
STATEFUL = {
    "sgd": dict(momentum=0.9),
    "lars": dict(lr=1e-2, momentum=0.9),
    "rmsprop": dict(momentum=0.5, centered=True),
}

#: torch.optim's class for a fusedopt class that is its drop-in (the oracle of torch semantics).
TORCH = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD,
         "Adagrad": torch.optim.Adagrad, "RMSprop": torch.optim.RMSprop}


def having(name: str) -> list:
    """The classes whose family takes hyper-parameter or flag ``name``."""
    return [cls for cls in CLASSES if name in {h.name for h in cls._spec.hypers} | set(cls._spec.flags)]


def kwargs_of(cls, **extra) -> dict:
    """Constructor arguments for the generic grids: the family's :data:`STATEFUL` ones, 8-bit
    states for the grids' small tensors, then ``extra``."""
    return {**STATEFUL.get(cls._spec.name, {}), **({"min_8bit_size": 64} if cls._quantized else {}), **extra}


def state_names(cls, group: dict | None = None) -> tuple[str, ...]:
    """The states an optimizer of ``cls`` made with :func:`kwargs_of` keeps."""
    return cls._spec.state_names({**_defaults(cls), **(group or {})})


def skip_unless_backend_has(cls, backend: str, device: str = "cpu") -> None:
    """Skip (with the resolver's reason) when ``backend`` has no step for ``cls``'s family yet
    (or its 8-bit kind): ``fusedopt.backends.resolve`` refuses it, naming the backend."""
    import pytest

    from fusedopt import backends

    for quantized in {False, cls._quantized}:
        try:
            backends.resolve(backend, torch.device(device), (), kind=cls._spec.kind(quantized))
        except RuntimeError as e:
            pytest.skip(str(e))


def _defaults(cls) -> dict:
    import inspect

    sig = inspect.signature(cls.__init__)
    out = {k: v.default for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty}
    out.update(kwargs_of(cls))
    return out

# Shapes of each param group. The last param of group 0 never gets a grad (FROZEN).
SHAPES = ([(0,), (1,), (255,), (16, 17), (33,)], [(257,), (4097,)])
FROZEN = (0, 4)
# (step, group, param) whose grad is None at that step: its step count must not advance.
NO_GRAD = {(1, 0, 2), (2, 0, 2), (0, 1, 0), (5, 1, 1)}


def make_params(dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    """Random params of :data:`SHAPES` in ``dtype`` (the same values for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for shapes in SHAPES]


def make_grads(step: int, params, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Random grads of step ``step`` in each param's dtype (None where :data:`NO_GRAD` or
    :data:`FROZEN` says), each tensor with its own scale between 0.01 and 10."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for gi, group in enumerate(params):
        gs = []
        for pi, p in enumerate(group):
            scale = 10.0 ** (torch.rand((), generator=gen).item() * 3 - 2)
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            skip = (gi, pi) == FROZEN or (step, gi, pi) in NO_GRAD
            gs.append(None if skip else g.to(p.dtype))
        out.append(gs)
    return out


def set_grads(params, grads, convert=lambda g: g) -> None:
    for group, gs in zip(params, grads):
        for p, g in zip(group, gs):
            p.grad = None if g is None else convert(g).clone()


def param_groups(params, group1: dict) -> list[dict]:
    """Group 0 takes the optimizer's defaults, group 1 the hyper-parameters ``group1``."""
    return [{"params": params[0]}, {"params": params[1], **group1}]


def compare(step, ours, opt, theirs, topt, dtype, state_dtype, names, their_step=True) -> None:
    """Every param (in ``dtype``'s tolerance), every state ``names`` (in ``state_dtype``'s; our
    states must have that dtype) and every step count of ``opt`` against ``topt``. ``names``: a
    tuple for every group, or a list of one tuple per group. A baseline without ``step`` in its
    state (lion-pytorch, torch's SGD) is compared on the other keys; ``their_step=False``: the
    baseline's ``step`` is not its own (torch's SGD keeps a loaded one without advancing it)."""
    per_group = names if isinstance(names, list) else [names] * len(ours)
    for gi, (og, tg, names) in enumerate(zip(ours, theirs, per_group)):
        for pi, (p, q) in enumerate(zip(og, tg)):
            where = f"step {step} group {gi} param {pi}"
            assert p.dtype == dtype, f"{where}: param dtype {p.dtype}"
            assert_close(p, q, dtype, f"{where} param")
            state, tstate = opt.state.get(p, {}), topt.state.get(q, {})
            assert set(state) - {"step"} == set(tstate) - {"step"}, f"{where}: state keys {set(state)} vs {set(tstate)}"
            if not state:
                continue
            assert set(state) == {"step", *names}, f"{where}: state keys {set(state)}"
            for name in names:
                assert state[name].dtype == state_dtype, f"{where} {name}: dtype {state[name].dtype}"
                assert_close(state[name], tstate[name], state_dtype, f"{where} {name}")
            assert state["step"].dtype == torch.float32 and state["step"].shape == ()
            if "step" in tstate and their_step:
                assert float(state["step"]) == float(tstate["step"]), f"{where} step"


def step_count(opt, p) -> float:
    return float(opt.state[p]["step"])


def checkpoint(state_dict: dict) -> dict:
    """``state_dict`` through ``torch.save`` / ``torch.load(weights_only=True)``. (Loading a
    live state dict would share tensors: torch.optim keeps the loaded ``step`` tensors as they
    are, so two optimizers would both advance them.)"""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt, params) -> list:
    """Copies of every param and its state (None where it has none)."""
    return [
        (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()} if opt.state.get(p) else None)
        for group in params
        for p in group
    ]


def assert_unchanged(opt, params, before, what: str) -> None:
    """Every param and state bit-identical to ``before``; no state where there was none."""
    flat = [p for group in params for p in group]
    for i, (p, (value, state)) in enumerate(zip(flat, before)):
        assert_identical(p, value, f"{what}: param {i}")
        if state is None:
            assert not opt.state.get(p), f"{what}: param {i} got state {sorted(opt.state[p])}"
            continue
        assert set(opt.state[p]) == set(state), f"{what}: param {i} state keys"
        for k, v in state.items():
            assert_identical(opt.state[p][k], v, f"{what}: param {i} {k}")


# ---------------------------------------------------------------------------------------------
# 8-bit states against bitsandbytes' CPU optimizers
# ---------------------------------------------------------------------------------------------

STEPS_8BIT = 50
BLOCK_BNB = 256  # bitsandbytes' CPU 8-bit path is hard-wired to 256-element blocks
N_8BIT = 3 * 4096 + 100  # above min_8bit_size, with a short last block


def run_against_bnb(ours_cls, bnb_cls, ref_cls, state_names, seed=0, **kw):
    """Run ours, bitsandbytes' and an fp32 reference optimizer for 50 steps on the same data.

    Returns ``(param, {state name: dequantized state})`` for ours and bitsandbytes', and
    ``(param, state)`` of the fp32 run. bitsandbytes keeps its states as ``state1``,
    ``state2`` with ``absmax1``, ``absmax2`` and ``qmap1``, ``qmap2``, in ``state_names``'s
    order.
    """
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(N_8BIT, generator=gen)
    # Per-element gradient scales spanning about five decades, as between the rows of a layer:
    # the block-wise quantizer must keep small entries of a block next to large ones.
    scale = torch.exp(2 * torch.randn(N_8BIT, generator=gen))
    a, b, r = p0.clone(), p0.clone(), p0.clone()
    opt = ours_cls([a], backend="reference", block_size=BLOCK_BNB, **kw)
    bopt = bnb_cls([b], **kw)
    ropt = ref_cls([r], **kw)
    for _ in range(STEPS_8BIT):
        g = torch.randn(N_8BIT, generator=gen) * scale
        for x in (a, b, r):
            x.grad = g.clone()
        opt.step()
        bopt.step()
        ropt.step()
    st, bst = opt.state[a], bopt.state[b]
    assert float(st["step"]) == STEPS_8BIT
    ours, theirs = {}, {}
    for i, name in enumerate(state_names, start=1):
        assert st[name].dtype == torch.uint8 and bst[f"state{i}"].dtype == torch.uint8
        ours[name] = quant.dequantize_blockwise(st[name], st[name + "_absmax"], quant.signed_state(name), BLOCK_BNB)
        theirs[name] = bnb.functional.dequantize_blockwise(
            bst[f"state{i}"], absmax=bst[f"absmax{i}"], code=bst[f"qmap{i}"], blocksize=BLOCK_BNB
        )
    return (a, ours), (b, theirs), (r, ropt.state[r])


def _errors(x, ref):
    d = (x.double() - ref.double()).abs()
    return d.max().item(), d.norm().item()


def _median_relative(x, ref):
    return ((x.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).median().item()


def assert_no_worse_than_bnb(ours, theirs, ref) -> None:
    """Param error (max and 2-norm) and state error (median relative error of the dequantized
    states) against the fp32 run: ours no worse than bitsandbytes'.

    The states' absolute error is dominated by each block's largest entries, whose codes are the
    same in both libraries (same codebook, both round to nearest there): after 50 steps it is a
    tie within the noise of two trajectories that differ in fp32 rounding (measured: ratios
    0.96-1.02 either way over seeds). The relative error is where the quantizers differ
    (bitsandbytes' CPU search is not round-to-nearest for small entries) and what Adam's
    ``1/sqrt(v)`` consumes.
    """
    (a, sa), (b, sb), (r, sr) = ours, theirs, ref
    (ours_max, ours_l2), (bnb_max, bnb_l2) = _errors(a, r), _errors(b, r)
    assert ours_max <= bnb_max, f"param max error {ours_max:.4g} > bitsandbytes' {bnb_max:.4g}"
    assert ours_l2 <= bnb_l2, f"param 2-norm error {ours_l2:.4g} > bitsandbytes' {bnb_l2:.4g}"
    for name in sa:
        e_ours, e_bnb = _median_relative(sa[name], sr[name]), _median_relative(sb[name], sr[name])
        assert e_ours <= e_bnb, f"{name}: median relative error {e_ours:.4g} > bitsandbytes' {e_bnb:.4g}"


# ---------------------------------------------------------------------------------------------
# What every family's test file checks of its classes (test_sgd.py, test_adagrad.py, ...)
# ---------------------------------------------------------------------------------------------


def clone_params(params, convert=lambda p: p.clone()):
    return [[convert(p) for p in group] for group in params]


def run_against(opt, ours, topt, theirs, dtype, names, steps=range(STEPS), *, state_dtype=None, their_step=True,
                withhold=()) -> None:
    """Step ``opt`` and the baseline ``topt`` on the grid's grads of each step, comparing every
    param and state after each. ``withhold``: ``(group, param)`` pairs without a grad at
    these steps too."""
    for step in steps:
        grads = make_grads(step, ours)
        for gi, pi in withhold:
            grads[gi][pi] = None
        set_grads(ours, grads)
        for group, gs in zip(theirs, grads):  # in the baseline's dtype (a float64 transcription)
            for q, g in zip(group, gs):
                q.grad = None if g is None else g.to(q.dtype).clone()
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, state_dtype or dtype, names, their_step)


def run_16bit(opt, ours, topt, theirs, dtype, names) -> None:
    """16-bit params with fp32 states against a baseline on float64 (or fp32) copies of them
    (``theirs``). Each step starts the baseline from our params and states (so the comparison is
    of one rounding, see fusedopt/testing.py): params within the 16-bit tolerance, states within
    fp32's."""
    for step in range(STEPS):
        with torch.no_grad():
            for og, tg in zip(ours, theirs):
                for p, q in zip(og, tg):
                    q.copy_(p)
                    tstate = topt.state.get(q, {})
                    for name, value in opt.state.get(p, {}).items():
                        if name in tstate:
                            tstate[name].copy_(value)
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads, convert=lambda g: g.to(theirs[0][0].dtype))
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, torch.float32, names, their_step=False)


def state_dicts_both_ways(make_ours, make_theirs, group1, names, *, stepless) -> None:
    """A baseline's state dict (after 3 steps) loads into ours, and ours (3 steps later) into a
    fresh baseline; each continues as the uninterrupted baseline run (float64).

    Param 1 of group 1 gets its first grad only after the load: a state-less param starts
    afresh (SGD: its momentum buffer a copy of the grad), a loaded one continues (SGD: the
    loaded buffer blended with the grad, although torch's state dict has no ``step``)."""
    dtype, late = torch.float64, {(1, 1)}
    base = make_params(dtype)
    torch_run = make_theirs(param_groups(base, group1))
    ours = clone_params(base)
    opt = make_ours(param_groups(ours, group1))
    run_against(opt, ours, torch_run, base, dtype, names, range(3), withhold=late)

    # baseline -> fusedopt
    ours = clone_params(base)
    opt = make_ours(param_groups(ours, group1))
    opt.load_state_dict(checkpoint(torch_run.state_dict()))
    if stepless:
        for p in (p for group in ours for p in group):
            st = opt.state.get(p, {})
            assert ("step" in st) == any(name in st for name in ("momentum_buffer",))
            if "step" in st:
                assert float(st["step"]) == 1.0, "a loaded stepless state is past its first step"
    run_against(opt, ours, torch_run, base, dtype, names, range(3, 6), their_step=not stepless)

    # fusedopt -> baseline
    theirs = clone_params(ours)
    topt = make_theirs(param_groups(theirs, group1))
    topt.load_state_dict(checkpoint(opt.state_dict()))
    run_against(opt, ours, topt, theirs, dtype, names, range(6, 9), their_step=not stepless)


def check_bad_input(cls, kw, overrides, exc, msg, torch_make=None) -> None:
    """``overrides`` raise ``exc`` with ``msg`` (naming the argument) before anything changes:
    as the optimizer's arguments and in a param group at construction, in add_param_group
    (which then adds nothing), and in a group edited between steps (the step raises and no
    param, state or step count changes; with the group restored, the next step runs).
    ``torch_make(params, **overrides)``: the baseline, which raises the same words."""
    gen = torch.Generator().manual_seed(7)

    def new(n=10):
        return torch.randn(n, generator=gen)

    pattern = re.escape(msg)
    with pytest.raises(exc, match=pattern):
        cls([new()], **{**kw, **overrides})
    with pytest.raises(exc, match=pattern):
        cls([{"params": [new()]}, {"params": [new()], **overrides}], **kw)
    if torch_make is not None:
        with pytest.raises(exc, match=pattern):
            torch_make([new()], **overrides)
    opt = cls([new()], **kw)
    with pytest.raises(exc, match=pattern):
        opt.add_param_group({"params": [new()], **overrides})
    assert len(opt.param_groups) == 1

    params = [[new(300), new(17)], [new(257), new(5)]]
    opt = cls([{"params": params[0]}, {"params": params[1]}], **kw)
    for p in (p for group in params for p in group):
        p.grad = new(p.numel())
    opt.step()
    saved = dict(opt.param_groups[1])
    opt.param_groups[1].update(overrides)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=pattern):
        opt.step()
    assert_unchanged(opt, params, before, f"a step with {overrides} in group 1")
    opt.param_groups[1].clear()
    opt.param_groups[1].update(saved)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 2 for group in params for p in group)


# The extras every class takes through the base, each against the same class without it.
EXTRA_SIZES = (1, 255, 4097)
EXTRAS = ("max_grad_norm", "gradscaler", "master_weights", "stochastic_rounding")


def _extra_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in EXTRA_SIZES]


def _extra_grads(step, seed=1):
    """fp32 grads of every size; every other step large enough that a max norm of 1 clips."""
    gen = torch.Generator().manual_seed(seed * 100 + step)
    scale = 10.0 if step % 2 else 1e-3
    return [torch.randn(n, generator=gen) * scale for n in EXTRA_SIZES]


def _copy_state(dst_opt, dst, src_opt, src) -> None:
    """``dst``'s params and states set to ``src``'s (values, in ``dst``'s dtypes)."""
    with torch.no_grad():
        for p, q in zip(dst, src):
            p.copy_(q)
            dst_opt.state[p] = {k: v.clone() for k, v in src_opt.state[q].items()}


def _assert_states(opt, params, topt, theirs, what, exact) -> None:
    for i, (p, q) in enumerate(zip(params, theirs)):
        st, tst = opt.state[p], topt.state[q]
        assert set(st) == set(tst), f"{what} param {i}: state keys {set(st)} vs {set(tst)}"
        for k, v in st.items():
            if exact:
                assert_identical(v, tst[k], f"{what} param {i} {k}")
            elif v.dtype != torch.uint8 and not k.endswith("_absmax"):
                assert_close(v, tst[k], v.dtype, f"{what} param {i} {k}")


def check_extra(extra, cls, kw) -> None:
    """One of :data:`EXTRAS` on ``cls`` (reference backend) against ``cls`` without it.

    - ``max_grad_norm``: against grads clipped by ``torch.nn.utils.clip_grad_norm_``, each step
      from the same params and states (a step of each; 8-bit codes may differ where the clip
      coefficients differ in the last bit, so they are not compared); ``last_grad_norm`` is
      torch's norm.
    - ``gradscaler``: ``torch.amp.GradScaler("cpu")``'s scaled grads (a power of two: unscaling
      is exact) step bit for bit as the unscaled ones, and a step with an inf changes nothing.
    - ``master_weights``: bf16 params' masters bit for bit as fp32 params on the same grads,
      the params the masters rounded to nearest.
    - ``stochastic_rounding``: a bf16 param is the fp32 update (from the same param and states)
      rounded with the documented noise (``reference.rounding_noise``), and differs from
      round-to-nearest somewhere.
    """
    from fusedopt import reference

    kw = dict(kw, backend="reference")
    if extra == "max_grad_norm":
        ours, theirs = _extra_params(torch.float32), _extra_params(torch.float32)
        opt, topt = cls(ours, max_grad_norm=1.0, **kw), cls(theirs, **kw)
        clipped = 0
        for step in range(STEPS):
            if step:
                _copy_state(topt, theirs, opt, ours)
            for p, q, g in zip(ours, theirs, _extra_grads(step)):
                p.grad, q.grad = g, g.clone()
            norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False)
            clipped += bool(norm > 1.0)
            opt.step()
            topt.step()
            assert_close(opt.last_grad_norm, norm, torch.float32, f"step {step} last_grad_norm")
            for i, (p, q) in enumerate(zip(ours, theirs)):
                assert_close(p, q, torch.float32, f"step {step} param {i}")
            _assert_states(opt, ours, topt, theirs, f"step {step}", exact=False)
        assert 0 < clipped < STEPS
    elif extra == "gradscaler":
        ours, theirs = _extra_params(torch.float32), _extra_params(torch.float32)
        opt, topt = cls(ours, **kw), cls(theirs, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        inf_steps = {3, 4}
        for step in range(STEPS):
            scaler.scale(torch.ones(()))
            scale = scaler.get_scale()
            for p, q, g in zip(ours, theirs, _extra_grads(step)):
                p.grad, q.grad = g * scale, g.clone()
            if step in inf_steps:
                ours[-1].grad[17] = float("inf")
            before = snapshot(opt, [ours])
            scaler.step(opt)
            scaler.update()
            if step in inf_steps:
                assert_unchanged(opt, [ours], before, f"step {step} with an inf")
                continue
            topt.step()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                assert_identical(p, q, f"step {step} param {i}")
            _assert_states(opt, ours, topt, theirs, f"step {step}", exact=True)
        assert float(opt.state[ours[0]]["step"]) == STEPS - len(inf_steps)
    elif extra == "master_weights":
        ours = _extra_params(torch.bfloat16)
        masters = [p.float() for p in ours]
        opt, topt = cls(ours, master_weights=True, **kw), cls(masters, **kw)
        for step in range(STEPS):
            for p, m, g in zip(ours, masters, _extra_grads(step)):
                p.grad = g.to(torch.bfloat16)
                m.grad = p.grad.float()
            opt.step()
            topt.step()
            for i, (p, m) in enumerate(zip(ours, masters)):
                st = opt.state[p]
                assert_identical(st["master_param"], m, f"step {step} master {i}")
                assert_identical(p, m.to(torch.bfloat16), f"step {step} param {i}")
                for k, v in topt.state[m].items():
                    assert_identical(st[k], v, f"step {step} param {i} {k}")
    elif extra == "stochastic_rounding":
        ours = _extra_params(torch.bfloat16)
        theirs = [p.float() for p in ours]
        opt, topt = cls(ours, stochastic_rounding=True, **kw), cls(theirs, **kw)
        differs = 0
        for step in range(STEPS):
            if step:
                _copy_state(topt, theirs, opt, ours)
            for p, q, g in zip(ours, theirs, _extra_grads(step)):
                p.grad = g.to(torch.bfloat16)
                q.grad = p.grad.float()
            opt.step()
            topt.step()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                t = opt.state[p]["step"].to(torch.float64)
                noise = reference.rounding_noise(0, t, i, p.numel())
                assert_identical(p, reference.round_stochastic_bf16(q, noise), f"step {step} param {i}")
                differs += int((p != q.to(torch.bfloat16)).sum())
            _assert_states(opt, ours, topt, theirs, f"step {step}", exact=True)
        assert differs > 0, "stochastic rounding never differed from round-to-nearest"
    else:
        raise AssertionError(extra)


#: The 8-bit codebook of each state (issue 14: the signed map for first moments and momentum
#: buffers, the unsigned one for second moments and Adagrad's sum), written here, not read
#: from fusedopt.families, so that a wrong declaration fails.
SIGNED = {"exp_avg": True, "momentum_buffer": True, "grad_avg": True,
          "exp_avg_sq": False, "sum": False, "square_avg": False, "max_exp_avg_sq": False}


def check_8bit_lockstep(cls8, cls32, kw, names, dtype=torch.float32, block_size=64, min_8bit_size=256) -> None:
    """An 8-bit class against its 32-bit class, one step at a time from the same params and
    (dequantized) states: the 8-bit step runs the 32-bit math on the dequantized states, so the
    param is bit for bit the 32-bit one, and each state's codes and absmax are
    ``quant.quantize_blockwise`` of the 32-bit state (in its codebook, :data:`SIGNED`); tensors
    under ``min_8bit_size`` keep fp32 states, bit for bit the 32-bit ones. ``names``: the
    states of each group (a list of two tuples)."""
    ours, plain = make_params(dtype), make_params(dtype)
    opt = cls8(param_groups(ours, {"lr": 3e-3}), backend="reference", block_size=block_size,
               min_8bit_size=min_8bit_size, **kw)
    popt = cls32(param_groups(plain, {"lr": 3e-3}), backend="reference", **kw)
    quantized = 0
    for step in range(STEPS):
        with torch.no_grad():
            for og, pg in zip(ours, plain):
                for p, q in zip(og, pg):
                    q.copy_(p)
                    st = opt.state.get(p)
                    if not st:
                        continue
                    popt.state[q] = {
                        k: (quant.dequantize_blockwise(v, st[k + "_absmax"], SIGNED[k], block_size)
                            if v.dtype == torch.uint8 else v.clone())
                        for k, v in st.items() if not k.endswith("_absmax")
                    }
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(plain, grads)
        before = snapshot(opt, ours)
        opt.step()
        popt.step()
        for gi, (og, pg) in enumerate(zip(ours, plain)):
            for pi, (p, q) in enumerate(zip(og, pg)):
                where = f"step {step} group {gi} param {pi}"
                assert_identical(p, q, f"{where} param")
                st, pst = opt.state.get(p), popt.state.get(q)
                if not st:
                    assert not pst, f"{where}: no state, but the 32-bit class has {sorted(pst)}"
                    continue
                if grads[gi][pi] is None:  # not stepped: its codes stay as they were
                    for k, v in st.items():
                        assert_identical(v, before[sum(map(len, ours[:gi])) + pi][1][k], f"{where} {k}")
                    continue
                assert_identical(st["step"], pst["step"], f"{where} step")
                big = p.numel() >= min_8bit_size
                assert set(st) == {"step", *names[gi], *(n + "_absmax" for n in names[gi] if big)}, f"{where}: {set(st)}"
                for name in names[gi]:
                    if not big:
                        assert_identical(st[name], pst[name], f"{where} {name}")
                        continue
                    quantized += 1
                    codes, absmax = quant.quantize_blockwise(pst[name], SIGNED[name], block_size)
                    assert st[name].dtype == torch.uint8 and st[name].shape == p.shape
                    assert_identical(st[name], codes, f"{where} {name} codes")
                    assert_identical(st[name + "_absmax"], absmax, f"{where} {name}_absmax")
    assert quantized or not any(names), "no state was quantized"
