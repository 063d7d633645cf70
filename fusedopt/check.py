"""``python -m fusedopt check``: is every backend right on this machine?

First the reference against the peers that have the optimizer (torch.optim, lion-pytorch,
bitsandbytes), then every other available backend against the reference, all on fresh random
data on this machine's device. Each row reports the largest error over params and every state
tensor, the tolerance and pass/fail; the command exits non-zero if any row fails.

What is checked is read from the families (``fusedopt.families.FAMILIES``): for each family,
with 32-bit and with 8-bit states, its first class (``fusedopt.optimizer.CLASSES``) with every
state the family declares kept and every flag on (:func:`configs`), and the clipping of the base class
once. A backend that cannot run one of them (no kernels for that family yet, a block size it
does not take) gets a ``not run`` row with the reason ``backends.resolve`` gives; the rest of
the check goes on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import backends, families, optimizer, quant
from .clip import clip_grad_norm_
from .progress import Progress, Silent
from .testing import compare

STEPS = 7
SIZES = (1, 257, 4099, 5000)  # odd sizes; the two largest are above min_8bit_size with a short tail block
LR = 1e-3


@dataclass
class Row:
    check: str
    backend: str
    dtype: str
    max_abs: float | None
    detail: str
    ok: bool | None  # None: not run (the reason is in detail)


# ---------------------------------------------------------------------------------------------
# Running an optimizer on fixed random data.
# ---------------------------------------------------------------------------------------------


def _data(device, dtype, seed, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    grads = [[torch.randn(n, generator=gen).to(device, dtype) for n in sizes] for _ in range(STEPS)]
    return params, grads


def _run(make: Callable, params0, grads, *, skip_grad=(2, 1)):
    """``STEPS`` steps of ``make(params)``; at step ``skip_grad[0]`` param ``skip_grad[1]`` has
    no gradient (its step count must not advance)."""
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = make(params)
    for s in range(STEPS):
        for i, p in enumerate(params):
            p.grad = None if (s, i) == skip_grad else grads[s][i].clone()
        opt.step()
    return params, opt


def _state_values(opt, p, name, block_size=256):
    state = opt.state[p]
    value = state[name]
    if value.dtype == torch.uint8:
        return quant.dequantize_blockwise(value, state[name + "_absmax"], quant.signed_state(name), block_size)
    return value


def _worst(results) -> tuple[float, str, bool]:
    worst = max(results, key=lambda r: (not r.ok, r.max_abs))
    return worst.max_abs, str(worst), all(r.ok for r in results)


# ---------------------------------------------------------------------------------------------
# The reference against peers.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# What is checked: read from the families.
# ---------------------------------------------------------------------------------------------

#: fusedopt's optimizer classes (the registry ``fusedopt.optimizer.CLASSES``), in the order of
#: their families in ``families.FAMILIES``, 32-bit before 8-bit.
CLASSES: tuple[type, ...] = tuple(sorted(
    optimizer.CLASSES.values(), key=lambda c: (list(families.FAMILIES).index(c._spec.name), bool(c._quantized))))


def class_of(family: families.Family, quantized: bool) -> type | None:
    """The first class of ``family`` with 8-bit (or 32-bit) states, or None."""
    return next((c for c in CLASSES if c._spec is family and bool(c._quantized) == quantized), None)


@dataclass(frozen=True)
class Config:
    """An optimizer class, the arguments the check constructs it with, and its ``lr``."""

    label: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    lr: float = LR

    @property
    def kind(self) -> str:
        return self.cls._spec.kind(bool(self.cls._quantized))

    def make(self, params, backend: str):
        return self.cls(params, lr=self.lr, **self.kwargs, backend=backend)


#: How far one step of the backend checks moves a param, relative to its size.
MOVE = 1e-2


def calibrated_lr(cls: type, kwargs: dict) -> float:
    """The ``lr`` at which one reference step moves a param by about :data:`MOVE` of its size
    (every family's update is ``lr`` times something): ~1e-2 for Adam and Lion, whose updates
    are about 1 per element, 1e-3 for RMSprop (its first steps divide by ``sqrt(1 - alpha)``
    of the grad), ~0.5 for LARS (its update is clipped to ``max_unorm`` of the param's norm).
    So a 1% error in any family's update is beyond the fp32 tolerance."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5000, generator=gen).requires_grad_(True)
    p0 = p.detach().clone()
    p.grad = torch.randn(5000, generator=gen)
    cls([p], lr=1.0, **kwargs, backend="reference").step()
    moved = float((p.detach() - p0).abs().mean() / p0.abs().mean())
    return MOVE / moved if moved > 0 else LR


def every_state(cls: type) -> dict:
    """Arguments of ``cls`` that keep every state its family declares and take every code path
    a flag opens: each flag the class takes on, ``momentum=0.9`` where the family has a
    momentum, a weight decay of 0.01. ``RuntimeError`` if a state is still not kept (a family
    whose states depend on something else: this needs extending)."""
    family = cls._spec
    params = inspect.signature(cls).parameters
    names = {h.name for h in family.hypers}
    kwargs = dict(momentum=0.9) if "momentum" in names else {}
    kwargs.update({flag: True for flag in family.flags if flag in params})
    if "weight_decay" in names:
        kwargs["weight_decay"] = 0.01
    group = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    group.update(kwargs, lr=LR)
    missing = [s.name for s in family.states if not s.kept(group)]
    if missing:  # pragma: no cover - a declaration this function does not know
        raise RuntimeError(f"check: {cls.__name__} with {kwargs} keeps no {missing}")
    return kwargs


def _label(cls: type, kwargs: dict) -> str:
    return " ".join([cls.__name__] + [k for k, v in kwargs.items() if v is True or k == "momentum"])


def configs() -> tuple[Config, ...]:
    """Each family with 32-bit and with 8-bit states (its first class, :func:`every_state`),
    then the first class with ``max_grad_norm`` (the base class's clip, on the flags' defaults);
    each at its :func:`calibrated_lr`."""
    out = []
    for family in families.FAMILIES.values():
        for quantized in (False, True):
            cls = class_of(family, quantized)
            if cls is not None:
                kwargs = every_state(cls)
                out.append(Config(_label(cls, kwargs), cls, kwargs, calibrated_lr(cls, kwargs)))
    first = class_of(next(iter(families.FAMILIES.values())), False)
    kwargs = dict(weight_decay=0.01, max_grad_norm=1.0)
    out.append(Config(f"{first.__name__} max_grad_norm", first, kwargs, calibrated_lr(first, kwargs)))
    return tuple(out)


def _torch_peer(cls: type) -> type | None:
    """torch.optim's class of the same name (fusedopt's 32-bit classes are drop-ins), or None."""
    if cls._quantized:
        return None
    theirs = getattr(torch.optim, cls.__name__, None)
    return theirs if isinstance(theirs, type) and issubclass(theirs, torch.optim.Optimizer) else None


def _peer_torch(device) -> list[Row]:
    rows = []
    for ours in CLASSES:
        theirs = _torch_peer(ours)
        if theirs is None:
            continue
        kwargs = every_state(ours)
        params0, grads = _data(device, torch.float32, 1)
        a, oa = _run(lambda ps: ours(ps, lr=LR, backend="reference", **kwargs), params0, grads)
        b, ob = _run(lambda ps: theirs(ps, lr=LR, foreach=False, **kwargs), params0, grads)
        results = []
        for i, (pa, pb) in enumerate(zip(a, b)):
            results.append(compare(pa, pb, torch.float32, f"param {i}"))
            for name in ob.state[pb]:  # torch's keys (SGD keeps no step)
                results.append(compare(oa.state[pa][name], ob.state[pb][name], torch.float32, f"{name} {i}"))
        m, detail, ok = _worst(results)
        rows.append(Row(f"{_label(ours, kwargs)} vs torch.optim.{theirs.__name__}", "reference", "float32",
                        m, detail, ok))
    return rows


def _peer_lion(device) -> list[Row]:
    try:
        from lion_pytorch import Lion as PeerLion
    except ImportError as e:
        return [Row("Lion vs lion-pytorch", "reference", "float32", None, f"not run: {e}", None)]
    params0, grads = _data(device, torch.float32, 2)
    a, oa = _run(lambda ps: optimizer.CLASSES["Lion"](ps, lr=LR, weight_decay=0.1, backend="reference"), params0, grads)
    b, ob = _run(lambda ps: PeerLion(ps, lr=LR, weight_decay=0.1), params0, grads)
    results = []
    for i, (pa, pb) in enumerate(zip(a, b)):
        results.append(compare(pa, pb, torch.float32, f"param {i}"))
        results.append(compare(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"], torch.float32, f"exp_avg {i}"))
    m, detail, ok = _worst(results)
    return [Row("Lion vs lion-pytorch", "reference", "float32", m, detail, ok)]


def _peer_bnb(device) -> list[Row]:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # bitsandbytes raises more than ImportError when it has no backend
        return [Row("8-bit vs bitsandbytes", "reference", "-", None, f"not run: bitsandbytes unavailable ({e})", None)]
    rows = []
    equal = all(torch.equal(quant.dynamic_map(s), bnbf.create_dynamic_map(signed=s).cpu()) for s in (True, False))
    rows.append(Row("codebooks vs bitsandbytes create_dynamic_map", "reference", "float32", 0.0 if equal else None,
                    "identical" if equal else "differ", equal))
    for ours, theirs in ((optimizer.CLASSES["AdamW8bit"], bnb.optim.AdamW8bit), (optimizer.CLASSES["Lion8bit"], bnb.optim.Lion8bit)):
        params0, grads = _data(device, torch.float32, 3)
        try:
            b, ob = _run(lambda ps: theirs(ps, lr=LR, min_8bit_size=4096), params0, grads, skip_grad=(-1, -1))
        except Exception as e:  # bitsandbytes without a backend for this device
            rows.append(Row(f"{ours.__name__} vs bitsandbytes", "reference", "float32", None,
                            f"not run: bitsandbytes failed on {device} ({type(e).__name__}: {e})", None))
            continue
        a, oa = _run(lambda ps: ours(ps, lr=LR, min_8bit_size=4096, backend="reference"), params0, grads,
                     skip_grad=(-1, -1))
        # Implementations may round a handful of values to neighbouring codes; a param may then
        # differ by a fraction of one step's movement (lr), never by more.
        results = [compare(pa, pb, torch.float32, f"param {i}", rtol=0.0, atol=LR) for i, (pa, pb) in enumerate(zip(a, b))]
        m, detail, ok = _worst(results)
        rows.append(Row(f"{ours.__name__} vs bitsandbytes", "reference", "float32", m, detail, ok))
    return rows


def _peer_clip(device) -> list[Row]:
    rows = []
    for norm_type in (2.0, float("inf")):
        params0, grads = _data(device, torch.float32, 4)
        pa = [p.clone().requires_grad_(True) for p in params0]
        pb = [p.clone().requires_grad_(True) for p in params0]
        for p, q, g in zip(pa, pb, grads[0]):
            p.grad, q.grad = g.clone(), g.clone()
        na = clip_grad_norm_(pa, 1.0, norm_type, backend="reference")
        nb = torch.nn.utils.clip_grad_norm_(pb, 1.0, norm_type)
        results = [compare(na, nb, torch.float32, "norm")] + [compare(p.grad, q.grad, torch.float32, f"grad {i}") for i, (p, q) in enumerate(zip(pa, pb))]
        m, detail, ok = _worst(results)
        rows.append(Row(f"clip_grad_norm_ (p={norm_type:g}) vs torch", "reference", "float32", m, detail, ok))
    return rows


# ---------------------------------------------------------------------------------------------
# Every other backend against the reference.
# ---------------------------------------------------------------------------------------------

_CONFIGS = configs()


def _stepwise(make: Callable, name: str, params0, grads, dtype) -> list:
    """Step ``name`` and the reference from the same params and states each step (the
    reference is re-loaded from the backend's before every step), comparing everything after
    it: a difference is one step's, never a trajectory's drift."""
    pa = [p.clone().requires_grad_(True) for p in params0]
    pb = [p.clone().requires_grad_(True) for p in params0]
    oa, ob = make(pa, name), make(pb, "reference")
    results = []
    for s in range(STEPS):
        with torch.no_grad():
            for x, y in zip(pb, pa):
                x.copy_(y)
        ob.load_state_dict(oa.state_dict())
        for i, (x, y) in enumerate(zip(pa, pb)):
            x.grad = None if (s, i) == (2, 1) else grads[s][i].clone()
            y.grad = None if x.grad is None else x.grad.clone()
        oa.step()
        ob.step()
        for i, (x, y) in enumerate(zip(pa, pb)):
            results.append(compare(x, y, dtype, f"step {s} param {i}"))
            for sname, value in ob.state[y].items():
                if sname == "step":
                    results.append(compare(oa.state[x][sname], value, torch.float32, f"step {s} step count {i}"))
                elif not sname.endswith("_absmax"):
                    got, want = _state_values(oa, x, sname), _state_values(ob, y, sname)
                    # 8-bit: an fp32 rounding difference may put a value on the other side of a
                    # midpoint; allow one code step (at most 1.41% of the block's absmax).
                    atol = 0.0141 * float(want.abs().max()) if value.dtype == torch.uint8 and want.numel() else None
                    results.append(compare(got, want, torch.float32, f"step {s} {sname} {i}",
                                           rtol=0.0 if atol is not None else None, atol=atol))
    return results


_DTYPES = (torch.float32, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _why_not(name: str, config: Config, device, dtype) -> str | None:
    """Why backend ``name`` cannot run ``config`` on ``dtype`` params (``backends.resolve``'s
    reason), or None."""
    block_size = config.kwargs.get("block_size", 256) if config.cls._quantized else None
    norm_type = None if config.kwargs.get("max_grad_norm") is None else 2.0
    try:
        backends.resolve(name, device, [torch.empty(0, device=device, dtype=dtype)], config.kind,
                         block_size=block_size, norm_type=norm_type)
    except RuntimeError as e:
        return str(e)
    return None


def plan(name: str, device) -> list[tuple[Config, torch.dtype, str | None]]:
    """Every (config, dtype) of backend ``name`` with why it cannot run it (None: it can)."""
    return [(c, d, _why_not(name, c, device, d)) for c in _CONFIGS for d in _DTYPES]


def _backend_rows(name: str, device, progress: Progress | None = None) -> list[Row]:
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        return [Row("all optimizers", name, "-", None, f"not run: {reason}", None)]
    progress = progress or Silent()
    rows = []
    steps = plan(name, device)
    for config in _CONFIGS:
        mine = [(d, why) for c, d, why in steps if c is config]
        whys = {why for _, why in mine}
        if len(whys) == 1 and None not in whys:  # one reason for every dtype: one row
            rows.append(Row(config.label, name, "-", None, f"not run: {whys.pop()}", None))
            continue
        for dtype, why in mine:
            dname = _dtype_name(dtype)
            if why is not None:
                rows.append(Row(config.label, name, dname, None, f"not run: {why}", None))
                continue
            progress.start(f"{name}: {config.label}, {dname}")
            params0, grads = _data(device, dtype, 5)
            try:
                m, detail, ok = _worst(_stepwise(config.make, name, params0, grads, dtype))
            except Exception as e:  # resolve said it can: a step that raises is a failure
                m, detail, ok = None, f"raised {type(e).__name__}: {e}", False
            rows.append(Row(config.label, name, dname, m, detail, ok))
            progress.advance()
    return rows


_PEERS = (
    (_peer_torch, "reference vs torch.optim " + ", ".join(c.__name__ for c in CLASSES if _torch_peer(c))),
    (_peer_lion, "reference vs lion-pytorch"),
    (_peer_bnb, "reference vs bitsandbytes 8-bit"),
    (_peer_clip, "clip_grad_norm_ vs torch"),
)


def run(device: torch.device, progress: Progress | None = None) -> list[Row]:
    """Every check on ``device``; ``progress`` (optional) is told each check as it starts."""
    progress = progress or Silent()
    others = [n for n in backends.NAMES if n not in ("auto", "reference")]
    runnable = [n for n in others if backends.unavailable_reason(n, device) is None]
    progress.set_total(len(_PEERS) + sum(why is None for n in runnable for _, _, why in plan(n, device)))
    rows = []
    for peer, label in _PEERS:
        progress.start(label)
        rows += peer(device)
        progress.advance()
    for name in others:
        rows += _backend_rows(name, device, progress)
    return rows


def format_rows(rows: list[Row]) -> str:
    head = ("check", "backend", "dtype", "max |err|", "result")
    body = []
    for r in rows:
        result = "not run" if r.ok is None else ("PASS" if r.ok else "FAIL")
        err = "-" if r.max_abs is None else f"{r.max_abs:.2e}"
        body.append((r.check, r.backend, r.dtype, err, result))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line("-" * w for w in widths)] + [line(b) for b in body]
    notes = [f"  {r.backend} / {r.check} / {r.dtype}: {r.detail}" for r in rows if r.ok is not True]
    if notes:
        out += ["", "details:"] + notes
    return "\n".join(out)
