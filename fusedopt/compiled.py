"""``opt.step()`` inside ``torch.compile``: the whole step as one opaque torch custom op.

The backends build their launch tables from ``data_ptr()`` in Python, which Dynamo cannot
trace, so a compiled step does not trace them: it calls the custom op
``fusedopt::optimizer_step`` (with a fake implementation for tracing), whose implementation is
the eager machinery itself: batches rebuilt from the op's inputs, a backend resolved per batch,
:func:`fusedopt.step.step_scalars` and :func:`fusedopt.step.run_batches`.

How a step is traced (:func:`step`):

1. ``opt._init_group(params, grads, states, steps, outputs)`` is run *eagerly* by Dynamo
   (``torch/_dynamo/variables/optimizer.py`` intercepts a method of that name on any
   ``torch.optim.Optimizer``): it validates every gradient and resolves every backend (before
   any state changes, as the eager step does), creates missing state, appends the tensors of
   every batch to the lists (which Dynamo then wraps with the sources of ``opt.param_groups``,
   ``opt.state`` and ``p.grad``, and guards on) and returns a constant: the op's ``config``
   string (family, batch layout, the flags of each group) and the hyper-parameter ``reads``.
2. The traced code reads each hyper-parameter of ``reads`` from ``opt.param_groups``: Python
   numbers are specialized by Dynamo (a new float ``lr`` recompiles, with correct results),
   tensors are graph inputs (a tensor ``lr`` changed in place, as torch's LR schedulers do,
   never recompiles), and passes them, GradScaler's ``grad_scale`` / ``found_inf``,
   ``max_grad_norm`` and the backend name to the op.

The op is a pure function of its inputs; what persists between calls is a small bounded
cache of each batch's backend and launch tables, keyed by the op's config and the batch
(the backends re-check every address and rebuild a table when one changed).
"""

from __future__ import annotations

import collections
import functools
import json
import threading

import torch
from torch import Tensor

from . import backends, capture, distributed
from . import step as _step
from .scalars import GRAD_MULT, SIZE

OP_NAME = "fusedopt::optimizer_step"

# (config, requested backend, batch index) -> (backend module, Batch.cache dict). Bounded: a
# program compiles a handful of step graphs; each entry holds one batch's launch tables.
_CACHE_SIZE = 64
_batch_caches: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_units: dict = {}


# ---------------------------------------------------------------------------------------------
# Eager, at trace time: validation, state, the op's inputs
# ---------------------------------------------------------------------------------------------


def init_group(opt, params: list, grads: list, states: list, steps: list, outputs: list):
    """What Dynamo runs eagerly for ``opt._init_group(...)``: check the step as the eager step
    does (nothing changes on an error), create missing state, append the tensors of every
    batch to the lists, and return ``(config, reads)`` (see :func:`step`)."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is not None and distributed.is_dtensor(p):
                raise RuntimeError(
                    f"{type(opt).__name__}.step() inside torch.compile does not take sharded (DTensor) "
                    f"params (param {pi} of group {gi} is one): call opt.step() outside the compiled "
                    "function, eagerly (the backward can stay compiled)"
                )
    plans = [opt._plan_group(gi, group) for gi, group in enumerate(opt.param_groups)]
    reads: list = []
    groups, batches = [], []
    for gi, (group, plan) in enumerate(zip(opt.param_groups, plans)):
        groups.append({k: _encode(v, gi, k, reads) for k, v in group.items() if k != "params"})
        names = opt._state_names(group)
        for key, idx, _ in plan.entries:
            device, p_dtype, g_dtype, quantized, _, master = key
            members = [group["params"][i] for i in idx]
            state = [opt._init_state(p, group, names) for p in members]
            batch_names = list(names) + ([n + "_absmax" for n in names] if quantized else [])
            params += [s[_step.MASTER] for s in state] if master else members
            grads += [plan.grads[i] for i in idx]
            for name in batch_names:
                states += [s[name] for s in state]
            steps += [s["step"] for s in state]
            if master:
                outputs += members
            batches.append(dict(group=gi, device=str(device), dtypes=[str(p_dtype), str(g_dtype)],
                                count=len(idx), names=batch_names, quantized=quantized, master=master,
                                positions=list(idx)))
    config = json.dumps(dict(family=opt._family, groups=groups, batches=batches), sort_keys=True)
    return config, tuple(reads)


def _encode(value, gi: int, key: str, reads: list, index: int | None = None):
    """A group value in the op's config: a number or a tensor becomes a read (passed to the op
    in ``floats``, ``ints`` or ``tensors``); a flag, a string or None stays in the config (and
    Dynamo guards on it); a tuple is encoded element by element. Other values (user extras no
    backend reads) are left out."""
    if isinstance(value, torch.Tensor):
        kind = "t"
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return {"c": value}
    elif isinstance(value, int):
        kind = "i"
    elif isinstance(value, float):
        kind = "f"
    elif isinstance(value, (tuple, list)) and index is None:
        encoded = [_encode(v, gi, key, reads, i) for i, v in enumerate(value)]
        return None if any(e is None for e in encoded) else {"tuple": encoded}
    else:
        return None
    position = sum(1 for r in reads if r[3] == kind)
    reads.append((gi, key, index, kind))
    return {kind: position}


# ---------------------------------------------------------------------------------------------
# Traced: the step
# ---------------------------------------------------------------------------------------------


def step(opt, closure=None):
    """``opt.step(closure)`` when ``torch.compiler.is_compiling()`` (see the module doc)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    params, grads, states, steps, outputs = [], [], [], [], []
    config, reads = opt._init_group(params, grads, states, steps, outputs)
    if not params:
        return loss
    groups = opt.param_groups
    tensors, floats, ints = [], [], []
    for gi, key, index, kind in reads:
        value = groups[gi][key]
        if index is not None:
            value = value[index]
        if kind == "t":
            tensors.append(value)
        elif kind == "f":
            floats.append(value)
        else:
            ints.append(value)
    max_grad_norm = opt.max_grad_norm
    norm = optimizer_step(params, grads, states, steps, outputs, tensors, floats, ints,
                          getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None),
                          max_grad_norm, opt.backend, config)
    if max_grad_norm is not None:
        opt._results["last_grad_norm"] = norm  # see FusedOptimizer.last_grad_norm
    return loss


def zero_grad(opt, set_to_none: bool = True) -> None:
    """``opt.zero_grad(set_to_none)`` when compiling: grads set to None, or zeroed in place."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.requires_grad_(False)
                    p.grad.zero_()


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=("params", "states", "steps", "outputs"))
def optimizer_step(params: list[Tensor], grads: list[Tensor], states: list[Tensor], steps: list[Tensor],
                   outputs: list[Tensor], tensors: list[Tensor], floats: list[float], ints: list[int],
                   grad_scale: Tensor | None, found_inf: Tensor | None, max_grad_norm: float | None,
                   backend: str, config: str) -> Tensor:
    """One optimizer step over the batches ``config`` lays out; returns the global gradient
    norm (0-d fp32 on the first batch's device; zero when ``max_grad_norm`` is None).

    Args:
        params: the tensors each batch updates, batch after batch (fp32 masters for a batch
            with master weights).
        grads: their gradients.
        states: each batch's states, name after name (``config`` lists the names).
        steps: the per-param step counts.
        outputs: the 16-bit params rewritten from their masters (master-weight batches only).
        tensors, floats, ints: hyper-parameter values, in the order of the config's reads.
        grad_scale, found_inf: GradScaler's, or None.
        max_grad_norm: clip the global norm to this (None: no clipping).
        backend: the backend asked for (``"auto"``, ``"triton"``, ...).
        config: the static layout (JSON written by :func:`init_group`).
    """
    spec = _spec(config)
    groups = [_decode_group(g, tensors, floats, ints) for g in spec["groups"]]
    requested = backends.requested(backend)
    local = distributed.local
    work = []
    p_at = s_at = o_at = 0
    for bi, b in enumerate(spec["batches"]):
        n = b["count"]
        group = groups[b["group"]]
        state = {}
        for name in b["names"]:
            state[name] = states[s_at:s_at + n]
            s_at += n
        batch = _step.Batch(
            params=params[p_at:p_at + n],
            grads=grads[p_at:p_at + n],
            state=state,
            steps=steps[p_at:p_at + n],
            group=group,
            scalars=None,
            quantized=b["quantized"],
            block_size=group.get("block_size", 256),
            positions=b["positions"],
            outputs=outputs[o_at:o_at + n] if b["master"] else None,
        )
        if b["master"]:
            o_at += n
        p_at += n
        device = batch.params[0].device
        kind = spec["family"] + ("8bit" if b["quantized"] else "")  # as FusedOptimizer._plan_group
        module, batch.cache = _batch_cache(config, requested, bi, device, batch, kind, max_grad_norm is not None)
        key = (device, batch.params[0].dtype, batch.grads[0].dtype, b["quantized"], (), b["master"])
        work.append((key, batch, module))
    scalars, norm = _step.step_scalars(work, grad_scale, found_inf, max_grad_norm, _unit)
    _step.run_batches(spec["family"], work, scalars)
    if norm is None:
        return torch.zeros((), dtype=torch.float32, device=work[0][0][0])
    return norm


@optimizer_step.register_fake
def _(params, grads, states, steps, outputs, tensors, floats, ints, grad_scale, found_inf, max_grad_norm,
      backend, config):
    return params[0].new_empty((), dtype=torch.float32)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _spec(config: str) -> dict:
    return json.loads(config)


def _decode_group(encoded: dict, tensors, floats, ints) -> dict:
    lists = {"t": tensors, "f": floats, "i": ints}

    def decode(e):
        if "c" in e:
            return e["c"]
        if "tuple" in e:
            return tuple(decode(x) for x in e["tuple"])
        (kind, position), = e.items()
        return lists[kind][position]

    return {k: decode(e) for k, e in encoded.items() if e is not None}


def _batch_cache(config: str, requested: str, index: int, device: torch.device, batch, kind: str,
                 clips: bool) -> tuple:
    """The backend of batch ``index`` for a step of ``kind`` (resolved once per config,
    backend, block size and clipping, as the eager step resolves once per plan, with the same
    requirements) and its persistent ``Batch.cache``."""
    block_size = batch.block_size if batch.quantized else None
    key = (config, requested, index, block_size, clips)
    with _lock:
        entry = _batch_caches.get(key)
        if entry is not None:
            _batch_caches.move_to_end(key)
            return entry
    module = backends.resolve(requested, device, [*batch.params, *batch.grads], kind, block_size=block_size,
                              norm_type=2.0 if clips else None)
    entry = (module, {})
    with _lock:
        _batch_caches[key] = entry
        while len(_batch_caches) > _CACHE_SIZE:
            _batch_caches.popitem(last=False)
    return entry


def _unit(device: torch.device) -> Tensor:
    """The constant scalars of a step with no scaler and no clipping (cached per device)."""
    unit = _units.get(device)
    if unit is None:
        unit = torch.zeros(SIZE, dtype=torch.float32, device=device)
        unit[GRAD_MULT] = 1.0
        if not capture.capturing(device):  # see capture.capturing
            _units[device] = unit
    return unit
