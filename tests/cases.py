"""The grid every optimizer test runs on, and the comparisons the families share.

Two param groups of odd sizes (a zero-size tensor, a single element, a 2-D tensor, sizes that
are not whole 256-blocks), random params and grads (never zeros; each grad tensor with its own
scale), some grads ``None`` on some steps, one param that never gets a grad. A test steps a
fusedopt optimizer and a baseline on the same data and compares after every step.
"""

from __future__ import annotations

import io

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


def compare(step, ours, opt, theirs, topt, dtype, state_dtype, names) -> None:
    """Every param (in ``dtype``'s tolerance), every state ``names`` (in ``state_dtype``'s; our
    states must have that dtype) and every step count of ``opt`` against ``topt``. A baseline
    without ``step`` in its state (lion-pytorch) is compared on the other keys."""
    for gi, (og, tg) in enumerate(zip(ours, theirs)):
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
            if "step" in tstate:
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
