"""The base class every fusedopt optimizer shares.

Class -> base step -> one backend. :class:`FusedOptimizer` validates hyper-parameters at
construction and gradients at ``step()`` (before anything changes), groups each param group's
tensors into batches of one device and one dtype combination, computes the per-step device
scalars (unscale, global-norm clip, skip), and hands each batch to one backend function. The
families (``adam.py``, ``lamb.py``, ``lion.py``) only declare their hyper-parameters and state.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Callable

import torch

from . import backends, capture, compiled, distributed, families, layout, quant
from .scalars import GRAD_MULT, SIZE
from .step import MASTER, Batch, run_batches, step_scalars

_numel = torch.Tensor.numel
_dtype = operator.attrgetter("dtype")
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class _GroupPlan:
    """How one param group is stepped: its batches, and what they were planned from."""

    group: dict
    params: list  # a copy of ``group["params"]`` at planning time (the list may be edited)
    grads: list  # the group's ``p.grad`` per param at planning time (None allowed)
    names: tuple  # state names
    signature: tuple  # what the layout depends on besides tensor identities
    entries: list  # (key, indices into group["params"], backend module) per batch
    batches: list | None  # Batch per entry; None until states exist
    # What the batches hold of ``opt.state``, to see it replaced: the group's params that have
    # batches, their state dicts, and (name, the tensors under it) for every state name.
    held: tuple | None = None
    # Each param's element count and dtype at planning time: ``p.data = other`` keeps the
    # object, not its size or dtype (C loops over 20,000 params: about 1.2 ms a step each on a
    # busy 2-core machine).
    numels: tuple = ()
    dtypes: tuple = ()


#: What a plan holds in place of a gradient it released (see ``FusedOptimizer.zero_grad``):
#: never the same object as a gradient, so the next step checks every gradient it gets.
_RELEASED = object()


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 states for fp32 and 16-bit params, float64 states for float64 params."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


#: Lines of the classes' ``Args`` sections that every family shares (written once, here).
DOC_LR = """        lr: learning rate: a float, or a 1-element tensor that may be changed in place (on the
            params' device: under ``torch.compile`` a new float recompiles the step and a
            tensor changed in place does not; a CUDA graph reads the tensor at every replay).
"""
DOC_TORCH_FLAGS = """        foreach, fused: torch.optim's choice of implementation. fusedopt has one, a fused
            multi-tensor step (one launch per group), so ``None`` and ``True`` are what it
            honours; ``False`` (torch's for-loop or unfused step) raises ``ValueError``, as does
            ``fused=True`` with ``foreach=True`` (as in torch).
        capturable: ``True`` or ``False``: every fusedopt step can be captured in a CUDA graph
            (step counts live on the params' device and nothing syncs with the host), which
            satisfies both.
        differentiable: ``False`` only: a step updates params and states in place without
            autograd; ``True`` raises ``ValueError``.
"""
DOC_STORAGE = """        stochastic_rounding: store bfloat16 params with stochastic rounding (up with
            probability equal to the discarded fraction, so updates smaller than a bf16 ulp
            are not lost on average) instead of round-to-nearest. Reproducible: the noise is a
            hash of the group's ``"seed"`` (0 unless the group sets one), the param's step,
            its position in the group and the element's index in the full param, in the
            param's memory order (the row-major index of a contiguous param; a
            ``channels_last`` param's elements are indexed in channels-last order, see
            ``fusedopt.layout``), so a param sharded on dim 0 (FSDP2's default ``Shard(0)``,
            even or not) rounds bit for bit as the unsharded one. Sharded on another dim, a
            shard's elements are indexed within the shard (every rank draws the same noise
            for the same local index). float32
            params are stored exactly; float16 params are refused.
        master_weights: keep an fp32 copy of every bfloat16/float16 param (state
            ``"master_param"``, 4 more bytes per param): the update is applied to the copy,
            and the param is rewritten from it with round-to-nearest, so updates smaller than
            half a 16-bit ulp accumulate instead of being lost. An alternative to
            ``stochastic_rounding`` (not both); ignored for float32 and float64 params.
"""
#: The clipping and backend arguments every class takes.
DOC_EXTRAS = """        max_grad_norm: clip the global 2-norm of all gradients to this value inside the step
            (``None``: no clipping). The unclipped norm is kept on the device as
            ``last_grad_norm``; a non-finite norm skips the step.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (the environment
            variable ``FUSEDOPT_BACKEND`` overrides ``"auto"``).
"""

#: The 8-bit classes' shared text: the format, and their two extra arguments.
DOC_8BIT = r"""
    States are stored block-wise in 8 bits (Dettmers et al., ICLR 2022): uint8 codes of the
    dynamic map (signed for moments and momentum buffers, unsigned for squares) with one fp32
    absmax per ``block_size`` elements, about 1 byte per parameter and state instead of 4. Each
    step dequantizes, updates in fp32 exactly as the 32-bit optimizer, writes the parameter from
    the fp32 states, then requantizes to the nearest code. State keys are torch's; the absmax
    of state ``name`` is ``name + "_absmax"``.
"""
DOC_8BIT_ARGS = """        block_size: elements per quantization block, one fp32 absmax each (a multiple of 32).
            The Triton kernels take blocks of up to 4096: ``backend="auto"`` runs larger ones
            on another backend, ``backend="triton"`` refuses them with a ``RuntimeError``.
        min_8bit_size: tensors with fewer elements keep fp32 states.
"""


# ---------------------------------------------------------------------------------------------
# Hyper-parameter checks, in torch.optim's words where torch has them.
# ---------------------------------------------------------------------------------------------


check_flag = families.check_flag


def check_torch_flags(group: dict) -> None:
    """torch.optim's implementation keywords, honoured or refused (see :data:`DOC_TORCH_FLAGS`)."""
    for name in ("foreach", "fused"):
        value = group[name]
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"Invalid {name}: {value!r}; expected None or True")
        if value is False:
            raise ValueError(
                f"{name}=False asks for torch.optim's {'for-loop' if name == 'foreach' else 'non-fused'} "
                "implementation; fusedopt has one implementation, a fused multi-tensor step: use "
                f"{name}=None or True (or torch.optim for {name}=False)"
            )
    if group["fused"] and group["foreach"]:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    check_flag("capturable", group["capturable"])
    check_flag("differentiable", group["differentiable"])
    if group["differentiable"]:
        raise ValueError(
            "differentiable=True is not supported: a fusedopt step updates params and states in "
            "place without autograd; use torch.optim for a step to differentiate through"
        )


_TORCH_FLAGS = ("foreach", "capturable", "differentiable", "fused")


def torch_flags(foreach, capturable, differentiable, fused) -> dict:
    """torch.optim's implementation keywords as group entries (torch keeps them in
    ``defaults``, so state dicts carry them both ways)."""
    return dict(foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)


def check_max_grad_norm(max_grad_norm) -> None:
    if max_grad_norm is None:
        return
    if not families.is_number(max_grad_norm):
        raise TypeError(f"Invalid max_grad_norm: {max_grad_norm!r}; expected a positive number or None")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}; expected a positive number or None")


def check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"Invalid block_size: {block_size!r}; expected a positive multiple of 32")
    if block_size <= 0 or block_size % 32:
        raise ValueError(f"Invalid block_size: {block_size}; expected a positive multiple of 32")


def check_stochastic_rounding(group: dict) -> None:
    """``stochastic_rounding`` is a flag; it rounds bfloat16 params (float32 and float64 params
    are stored exactly, float16 params are refused); ``seed``, when a group sets one, is an
    integer in [0, 2**32)."""
    value = group.get("stochastic_rounding", False)
    check_flag("stochastic_rounding", value)
    if "seed" in group:
        seed = group["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Invalid seed: {seed!r}; expected an integer in [0, 2**32)")
        if not 0 <= seed < 2**32:
            raise ValueError(f"Invalid seed: {seed}; expected an integer in [0, 2**32)")
    if value:
        for i, p in enumerate(group.get("params", ())):
            if isinstance(p, torch.Tensor) and p.dtype == torch.float16:
                raise ValueError(
                    f"stochastic_rounding=True rounds bfloat16 params, but param {i} of the group is float16"
                )


def check_master_weights(group: dict) -> None:
    """``master_weights`` is a flag, and an alternative to ``stochastic_rounding``."""
    value = group.get("master_weights", False)
    check_flag("master_weights", value)
    if value and group.get("stochastic_rounding", False):
        raise ValueError(
            "master_weights=True and stochastic_rounding=True are alternatives: an fp32 master "
            "copy already keeps the updates that rounding a 16-bit param would lose; choose one"
        )


def has_master(p: torch.Tensor, group: dict) -> bool:
    """Whether param ``p`` of ``group`` is stepped through an fp32 master copy."""
    return bool(group.get("master_weights", False)) and p.dtype in (torch.bfloat16, torch.float16)


def check_min_8bit_size(min_8bit_size) -> None:
    if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool):
        raise TypeError(f"Invalid min_8bit_size: {min_8bit_size!r}; expected an integer >= 0")
    if min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size}; expected an integer >= 0")


def _laid_out_as(p: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``value`` (shaped as ``p``, on its device) in ``dtype`` and in ``p``'s layout,
    as the state tensors made for ``p`` (a state loaded from a checkpoint in another layout,
    e.g. contiguous for a ``channels_last`` param). Sharded (DTensor) states keep theirs."""
    if distributed.is_dtensor(p) or distributed.is_dtensor(value):
        return value.to(dtype).clone(memory_format=torch.contiguous_format)
    return torch.empty_like(p, dtype=dtype).copy_(value)


def _hypers(group: dict) -> tuple:
    """A group's keys and its values, in order: what :meth:`FusedOptimizer._check_edited` compares
    (the values by identity; two C calls, about 3x faster than leaving the params list out)."""
    return tuple(group), tuple(group.values())


# ---------------------------------------------------------------------------------------------


#: Every public optimizer class, by name, in the order they are defined (registered by
#: :meth:`FusedOptimizer.__init_subclass__`): what ``check``, ``bench`` and the test grids list.
CLASSES: dict[str, type] = {}


class FusedOptimizer(torch.optim.Optimizer):
    """Base of every fusedopt optimizer (see the families for the math).

    Subclasses set ``_spec`` (their :class:`fusedopt.families.Family`: states, hyper-parameters
    and their checks, the backend step to call) and ``_quantized`` (8-bit states); everything
    else is read from the spec.

    Inside ``torch.compile`` (``fullgraph=True`` works), ``step()`` is one custom op whose
    implementation is this eager step (:mod:`fusedopt.compiled`). A float ``lr`` is specialized
    by Dynamo, as for ``torch.optim``: each new value recompiles. Give ``lr`` as a tensor and
    change it in place to avoid that. Sharded (DTensor) params step eagerly.
    """

    _step_supports_amp_scaling = True
    _spec: families.Family
    _quantized: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.__module__.startswith("fusedopt."):
            CLASSES[cls.__name__] = cls

    def __init__(self, params, defaults: dict, *, max_grad_norm=None, backend: str = "auto"):
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                "params must be an ordered collection (a list of tensors or of param-group "
                "dicts), not a set: the ordering of tensors in sets changes between runs"
            )
        check_max_grad_norm(max_grad_norm)
        self.backend = backends.check_name(backend)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # Values a step leaves behind, in a dict: a compiled step can update a dict of the
        # optimizer, not its attributes (Dynamo drops attribute writes on an optimizer).
        self._results: dict = {"last_grad_norm": None}
        self._caches: dict = {}
        self._plans: dict = {}
        self._checked: dict = {}
        self._unit_scalars: dict = {}
        super().__init__(params, defaults)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """Global gradient norm of the last step that clipped, as a 0-d fp32 device tensor."""
        return self._results["last_grad_norm"]

    @last_grad_norm.setter
    def last_grad_norm(self, value: torch.Tensor | None) -> None:
        self._results["last_grad_norm"] = value

    # -- read from the family's spec --------------------------------------------------------

    @property
    def _family(self) -> str:
        """The family's name: the backends' function for its step (``reference.adam``, ...)."""
        return self._spec.name

    def _check_group(self, group: dict) -> None:
        """Every hyper-parameter and flag of ``group`` (``TypeError`` / ``ValueError`` naming
        the first bad one), before anything changes."""
        self._spec.check_group(group)
        check_torch_flags(group)
        check_stochastic_rounding(group)
        check_master_weights(group)
        if self._quantized:
            check_block_size(group["block_size"])
            check_min_8bit_size(group["min_8bit_size"])

    def _state_names(self, group: dict) -> tuple[str, ...]:
        return self._spec.state_names(group)

    # -- param groups -----------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, checked before anything changes.

        ``params`` may be tensors or ``(name, tensor)`` pairs (``model.named_parameters()``), as
        in torch >= 2.6: the names go to the group's ``"param_names"``. As in torch, the group
        added is ``param_group`` itself, completed with the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        elif params is None:
            raise ValueError("param_group must have a 'params' entry")
        else:
            params = list(params)
        names = [p[0] for p in params if isinstance(p, tuple)]
        if names:
            if len(names) != len(params):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            params = [p[1] for p in params]
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(
                    f"fusedopt optimizes float32, float64, bfloat16 and float16 params, but one "
                    f"of the params has dtype {p.dtype}"
                )
            if p.layout != torch.strided:
                raise TypeError(f"fusedopt optimizes dense (strided) tensors, but one of the params has layout {p.layout}")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter group contains the same tensor more than once")
        named = bool(names) or "param_names" in param_group
        for group in self.param_groups:
            if named != ("param_names" in group):
                raise ValueError(
                    "all optimizer param groups should be with/without names. cannot add param "
                    f"group {'with names' if named else 'without names'} to the optimizer"
                )
        taken = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in taken for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        self._check_group({**self.defaults, **param_group, "params": params})
        param_group["params"] = params
        if names:
            param_group["param_names"] = names
        super().add_param_group(param_group)
        self._caches.clear()
        self._plans.clear()
        self._checked[len(self.param_groups) - 1] = _hypers(param_group)
        if self._spec.eager_state:
            # As torch's Adagrad: every param's state made with the optimizer, and here for a
            # group added later too (torch's forgets that one, pytorch/pytorch#53712)
            names = self._state_names(param_group)
            for p in param_group["params"]:
                self._init_state(p, param_group, names)

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step over every param that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        With ``torch.amp.GradScaler``, the scaler sets ``grad_scale`` and ``found_inf`` on the
        optimizer: gradients are unscaled inside the update, and when ``found_inf`` is set the
        whole step changes nothing. Nothing here waits for the device.
        """
        if torch.compiler.is_compiling():
            return compiled.step(self, closure)  # the step as one custom op (fusedopt.compiled)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every check happens while planning, before any state changes.
        for gi, group in enumerate(self.param_groups):
            self._check_edited(gi, group)
        plans = [self._plan_group(gi, group) for gi, group in enumerate(self.param_groups)]
        if len(self._plans) > len(plans):  # groups removed: hold none of their tensors
            for gi in [gi for gi in self._plans if gi >= len(plans)]:
                del self._plans[gi]
        if len(self._checked) > len(plans):
            for gi in [gi for gi in self._checked if gi >= len(plans)]:
                del self._checked[gi]
        work = []
        for gi, (group, plan) in enumerate(zip(self.param_groups, plans)):
            if plan.batches is None:
                plan.batches = [self._batch(gi, group, key, idx, plan.grads) for key, idx, _ in plan.entries]
                plan.held = self._held(group, plan.entries)
                self._warn_if_no_8bit_state()
            elif plan is not self._plans.get(gi):  # new grad tensors in the same layout
                grads = plan.grads
                for batch, (key, idx, _) in zip(plan.batches, plan.entries):
                    if key[4]:  # sharded: the kernels take the local shards
                        batch.grads = [distributed.local(grads[i]) for i in idx]
                    else:
                        batch.grads = [grads[i] for i in idx]
            self._plans[gi] = plan
            work += [(key, batch, backend) for batch, (key, _, backend) in zip(plan.batches, plan.entries)]
        if not work:
            return loss
        run_batches(self._family, work, self._step_scalars(work))
        return loss

    def _check_edited(self, gi: int, group: dict) -> None:
        """Check group ``gi`` again if one of its entries was set since it was last checked
        (``group["lr"] = -1.0`` or ``opt.param_groups[gi] = {...}`` between steps), so that a bad
        value raises here, before any group steps, as it would have at construction. Entries are
        compared by identity (a C loop over the group's values): a tensor changed in place keeps
        its identity and is not read again (that would wait for the device), nor is anything
        checked while a CUDA graph is being captured."""
        hypers = _hypers(group)
        old = self._checked.get(gi)
        if old is not None and old[0] == hypers[0] and all(map(operator.is_, old[1], hypers[1])):
            return
        params = group["params"]
        if params and capture.capturing(params[0].device):
            return
        self._check_group(group)
        self._checked[gi] = hypers

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; inside ``torch.compile`` a traceable version of
        it (torch's own is skipped by Dynamo), so ``opt.step(); opt.zero_grad()`` compiles as
        one graph."""
        if torch.compiler.is_compiling():
            return compiled.zero_grad(self, set_to_none)
        super().zero_grad(set_to_none)
        if set_to_none:
            self._release_grads()

    def _release_grads(self) -> None:
        """Drop the plans' references to the gradients, so that ``zero_grad()`` frees them as
        torch.optim's does (before the next forward, not at the next step). The next step checks
        its new gradients and reuses the batches, as it would anyway after ``set_to_none``."""
        for plan in self._plans.values():
            plan.grads = [_RELEASED] * len(plan.grads)
            for batch in plan.batches or ():
                batch.grads = []

    def _init_group(self, params: list, grads: list, states: list, steps: list, outputs: list):
        """Under ``torch.compile``, Dynamo runs this eagerly, not traced: checks, state creation
        and the op's inputs for a compiled step (see :func:`fusedopt.compiled.init_group`)."""
        return compiled.init_group(self, params, grads, states, steps, outputs)

    def _plan_group(self, gi: int, group: dict) -> "_GroupPlan":
        """Validate this group's gradients and decide its batches, changing nothing.

        The plan of the last step is reused when the group holds the same param objects (an
        identity check in a C loop, about 0.35 ms at 20,000 params) and the gradients are the
        same tensors (grads zeroed in place), and its layout is reused when only the gradient
        tensors are new (``zero_grad(set_to_none=True)``): then only the new gradients are
        checked. Anything else (a param replaced, added, removed or moved in
        ``group["params"]``, another group dict, a grad that appeared or became None, a new grad
        dtype, new state names, another backend or ``block_size``, a param re-bound to another
        size with ``p.data = ...``) rebuilds the plan, and a new plan checks that existing states
        still fit their params. Backends still check addresses themselves (``p.data = ...``).
        """
        params = group["params"]
        grads = [p.grad for p in params]
        names = self._state_names(group)
        old = self._plans.get(gi)
        flags = (backends.requested(self.backend), bool(group.get("master_weights", False)),
                 group.get("block_size"), self.max_grad_norm is not None)
        if old is not None and (old.group is not group or len(old.params) != len(params)
                                or not all(map(operator.is_, params, old.params))):
            old = None  # another group dict, or its params list edited: batches anew
        if old is not None and (old.signature[3:] != flags or not all(map(operator.eq, map(_numel, params),
                                                                           old.numels))
                                or not all(map(operator.is_, map(_dtype, params), old.dtypes))):
            old = None  # another backend or block_size, or a param re-bound to another size or dtype
        if old is not None and not self._holds_current_state(old):
            old = None  # a state dict or tensor was replaced or removed: batches anew
        if old is not None and old.names == names and all(map(operator.is_, grads, old.grads)):
            return old
        previous = old.grads if old is not None else [None] * len(grads)
        strided = torch.strided
        for pi, (p, g, h) in enumerate(zip(params, grads, previous)):
            if g is not None and g is not h and (
                g.layout is not strided or g.shape != p.shape or g.device != p.device or not g.is_floating_point()
            ):
                self._check_grad(gi, pi, p, g)
        present = tuple(i for i, g in enumerate(grads) if g is not None)
        signature = (names, present, tuple(grads[i].dtype for i in present)) + flags
        if old is not None and old.signature == signature:
            return _GroupPlan(group, old.params, grads, names, signature, old.entries, old.batches, old.held,
                              old.numels, old.dtypes)
        missing = [i for i in present if self._missing_state(params[i], group, names)]
        if missing and capture.capturing(params[missing[0]].device):
            raise RuntimeError(
                f"param {missing[0]} of group {gi} has no optimizer state yet while a CUDA graph is being "
                "captured: state made during capture would be re-initialized at every replay. Step "
                "eagerly before capturing (the usual warm-up steps on a side stream)"
            )
        buckets: dict[tuple, list[int]] = {}
        for i in present:
            p = params[i]
            key = (p.device, p.dtype, grads[i].dtype, self._is_quantized(p, group), distributed.shard_key(p),
                   has_master(p, group))
            buckets.setdefault(key, []).append(i)
        for i in present:
            reason = layout.overlap_error(distributed.local(params[i]))
            if reason is not None:
                raise RuntimeError(f"param {i} of group {gi} cannot be stepped: {reason}")
            self._check_state_sizes(gi, i, params[i], group)
        entries = []
        for key in sorted(buckets, key=str):
            idx = buckets[key]
            tensors = chain((params[i] for i in idx), (grads[i] for i in idx))
            kind = self._family + ("8bit" if key[3] else "")
            # What decides whether a backend can run this batch: its tensors, its block size,
            # and the 2-norm of its grads when the step clips (step_scalars asks the backend).
            module = backends.resolve(self.backend, key[0], tensors, kind,
                                      block_size=group["block_size"] if key[3] else None,
                                      norm_type=2.0 if self.max_grad_norm is not None else None)
            entries.append((key, idx, module))
        return _GroupPlan(group, list(params), grads, names, signature, entries, None,
                          numels=tuple(map(_numel, params)), dtypes=tuple(map(_dtype, params)))

    def _check_state_sizes(self, gi: int, pi: int, p: torch.Tensor, group: dict) -> None:
        """Raise if the existing state of param ``pi`` no longer fits it: the param was re-bound
        to another size (``p.data = ...``; torch.optim raises at its step too), or the group's
        ``block_size`` changed after its 8-bit states were made. Run when a plan is made, so
        nothing has changed when it raises."""
        state = self.state.get(p)
        if not state:
            return
        numel = distributed.local(p).numel()
        for name, value in state.items():
            if name == "step" or name.endswith("_absmax") or not isinstance(value, torch.Tensor):
                continue
            if distributed.local(value).numel() != numel:
                raise RuntimeError(
                    f"param {pi} of group {gi} has {numel} elements but its state {name!r} has "
                    f"{distributed.local(value).numel()}: the param was re-bound to another size "
                    "(p.data = ...) after its state was made; delete opt.state[p] to start it afresh"
                )
            absmax = state.get(name + "_absmax")
            if value.dtype == torch.uint8 and isinstance(absmax, torch.Tensor):
                blocks = quant.num_blocks(numel, group["block_size"])
                if distributed.local(absmax).numel() != blocks:
                    raise ValueError(
                        f"Invalid block_size: {group['block_size']} for param {pi} of group {gi}: its 8-bit "
                        f"state {name!r} has {distributed.local(absmax).numel()} blocks, where block_size="
                        f"{group['block_size']} makes {blocks}; a group's block_size cannot change after its "
                        "states are made (save a state dict and load it into an optimizer with the new "
                        "block_size: loading requantizes)"
                    )

    def _held(self, group: dict, entries: list) -> tuple:
        """What a plan's batches hold of ``self.state`` (see :meth:`_holds_current_state`)."""
        params = [group["params"][i] for _, idx, _ in entries for i in idx]
        dicts = [self.state[p] for p in params]
        names = sorted({name for d in dicts for name in d})
        return params, dicts, [(name, [d.get(name) for d in dicts]) for name in names]

    def _holds_current_state(self, plan: "_GroupPlan") -> bool:
        """Whether ``opt.state`` still has the dicts and tensors the plan's batches step: False
        after ``opt.state[p][name] = new_tensor`` (states moved away and back, say), ``del
        opt.state[p]``, ``opt.state[p] = {}`` or ``opt.state = defaultdict(dict)``. As in
        torch.optim, the step then uses what is there (creating what is missing). In-place
        changes (``zero_()``, ``copy_()``) need nothing. Identity checks in C loops: about
        0.25 ms per thousand params (5 ms a step at 20,000 params, measured on a busy 2-core
        machine), the price of torch.optim's semantics."""
        if plan.held is None:
            return True
        params, dicts, tensors = plan.held
        if not all(map(operator.is_, map(self.state.get, params), dicts)):
            return False
        return all(all(map(operator.is_, map(dict.get, dicts, repeat(name)), held)) for name, held in tensors)

    def _check_grad(self, gi: int, pi: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """Raise the error that describes what is wrong with gradient ``g`` of param ``p``."""
        where = f"param {pi} of group {gi}"
        if g.layout is not torch.strided:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where})")
        if g.shape != p.shape:
            raise RuntimeError(f"gradient of {where} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}")
        if g.device != p.device:
            raise RuntimeError(f"gradient of {where} is on {g.device} but the param is on {p.device}")
        if not g.is_floating_point():
            raise RuntimeError(f"gradient of {where} has dtype {g.dtype}; expected a floating-point gradient")

    def _warn_if_no_8bit_state(self) -> None:
        """An 8-bit optimizer whose every param is under ``min_8bit_size`` keeps all its states
        in fp32 and saves no memory: say so once per optimizer, when its states are made."""
        if not self._quantized or self.__dict__.get("_warned_no_8bit"):
            return
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        if not params or any(self._is_quantized(p, g) for p, g in params):
            return
        self._warned_no_8bit = True
        sizes = sorted({g["min_8bit_size"] for g in self.param_groups})
        warnings.warn(
            f"{type(self).__name__}: all {len(params)} params have fewer elements than min_8bit_size="
            f"{'/'.join(map(str, sizes))} (the largest has {max(p.numel() for p, _ in params)}), so every "
            f"optimizer state is kept in fp32 and 8-bit saves no memory; pass a smaller min_8bit_size "
            f"(min_8bit_size=0 quantizes every tensor) to get 8-bit states", UserWarning, stacklevel=5)  # the caller of opt.step(), past torch's two wrappers

    def _is_quantized(self, p: torch.Tensor, group: dict) -> bool:
        if not self._quantized:
            return False
        state = self.state.get(p)
        if state:
            for s in self._spec.states:
                if s.name in state:
                    return state[s.name].dtype == torch.uint8
        return p.numel() >= group["min_8bit_size"]

    def _missing_state(self, p: torch.Tensor, group: dict, names: tuple[str, ...]) -> bool:
        """Whether :meth:`_init_state` would create anything for ``p``."""
        state = self.state.get(p)
        if not state or "step" not in state or (has_master(p, group) and MASTER not in state):
            return True
        return any(name not in state for name in names)

    def _init_state(self, p: torch.Tensor, group: dict, names: tuple[str, ...]) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if has_master(p, group) and MASTER not in state:
            state[MASTER] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        quantized = self._is_quantized(p, group)
        for name in names:
            if name in state:
                continue
            spec = self._spec.state(name)
            init = 0.0 if spec.init is None else families.scalar(spec.init, group[spec.init])
            if quantized:
                # Blocks run over the local shard: what a kernel sees. A sharded param's codes
                # and absmax are DTensors too, so a distributed checkpoint saves every shard.
                shard = distributed.local(p)
                if init == 0.0:
                    codes = torch.full_like(shard, quant.zero_code(spec.signed), dtype=torch.uint8)  # the param's layout
                    blocks = quant.num_blocks(shard.numel(), group["block_size"])
                    absmax = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                else:
                    filled = torch.full_like(shard, init, dtype=torch.float32)
                    codes, absmax = quant.quantize_blockwise(filled, spec.signed, group["block_size"])
                if distributed.is_dtensor(p):
                    codes, absmax = distributed.like(p, codes), distributed.blockwise(p, absmax)
                state[name], state[name + "_absmax"] = codes, absmax
            else:
                # In the param's layout, as torch.optim: a dense param, its grad and its states
                # are then flat memory to a kernel (see fusedopt.layout).
                state[name] = torch.full_like(p, init, dtype=state_dtype(p))
        return state

    def _batch(self, gi, group, key, idx, grads) -> Batch:
        names = self._state_names(group)
        params = [group["params"][i] for i in idx]
        states = [self._init_state(p, group, names) for p in params]
        quantized = key[3]
        if quantized:
            names = tuple(chain(names, (n + "_absmax" for n in names)))
        local = distributed.local
        master = key[5]
        return Batch(
            params=[local(s[MASTER]) for s in states] if master else [local(p) for p in params],
            grads=[local(grads[i]) for i in idx],
            state={n: [local(s[n]) for s in states] for n in names},
            steps=[s["step"] for s in states],
            group=group,
            scalars=None,
            quantized=quantized,
            block_size=group.get("block_size", 256),
            cache=self._caches.setdefault((gi, key), {}),
            all_reduce=distributed.all_reduce_sum(distributed.shard_groups(params[0])),
            positions=list(idx),
            offsets=[distributed.flat_offset(p) for p in params] if key[4] else [],
            outputs=[local(p) for p in params] if master else None,
        )

    def _step_scalars(self, work) -> dict[torch.device, torch.Tensor]:
        """Per device: ``[grad multiplier, skip, norm]`` (see :func:`step_scalars`)."""
        scalars, norm = step_scalars(work, getattr(self, "grad_scale", None), getattr(self, "found_inf", None),
                                     self.max_grad_norm, self._unit)
        if norm is not None:
            self.last_grad_norm = norm
        return scalars

    def _unit(self, device: torch.device) -> torch.Tensor:
        """The constant scalars of a step with no scaler and no clipping (cached per device)."""
        unit = self._unit_scalars.get(device)
        if unit is None:
            unit = torch.zeros(SIZE, dtype=torch.float32, device=device)
            unit[GRAD_MULT] = 1.0
            if not capture.capturing(device):  # see capture.capturing
                self._unit_scalars[device] = unit
        return unit

    # -- state dict -------------------------------------------------------------------------

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class, by another fusedopt optimizer of the same
        family, or by ``torch.optim`` (Adam/AdamW into Adam/AdamW).

        States are cast to this optimizer's layout: fp32 (float64 for float64 params), or 8-bit
        codes with fp32 absmax; fp32 states load into an 8-bit optimizer by quantizing them and
        8-bit states into a 32-bit optimizer by dequantizing. Nothing changes unless the whole
        dict loads. The loaded tensors are copies: stepping never writes into ``state_dict``.

        As in torch.optim, the hooks of ``register_load_state_dict_pre_hook`` run first on a
        shallow copy of ``state_dict`` (a dict one returns is what loads), and those of
        ``register_load_state_dict_post_hook`` after it loaded.
        """
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may edit its keys
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")

        new_groups = []
        owner = {}
        for g, sg in zip(groups, saved_groups):
            # torch's implementation keywords say how the saving optimizer ran, not the math:
            # this optimizer keeps its own (a torch.optim foreach=False checkpoint loads).
            ng = {**g, **{k: v for k, v in sg.items() if k != "params" and k not in _TORCH_FLAGS},
                  "params": g["params"]}
            self._check_group(ng)
            new_groups.append(ng)
            for p in g["params"]:
                owner[id(p)] = ng
        id_map = dict(zip(chain.from_iterable(sg["params"] for sg in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))

        new_state: dict = defaultdict(dict)
        for k, saved in state_dict["state"].items():
            if k in id_map:
                p = id_map[k]
                new_state[p] = self._convert_state(p, owner[id(p)], saved)
            else:
                new_state[k] = saved
        self.param_groups = new_groups
        self.state = new_state
        self._caches.clear()
        self._plans.clear()
        self._checked = {gi: _hypers(g) for gi, g in enumerate(new_groups)}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _convert_state(self, p: torch.Tensor, group: dict, saved: dict) -> dict:
        out = {}
        quantized = self._quantized and p.numel() >= group["min_8bit_size"]
        block_size = group.get("block_size", 256)
        for key, value in saved.items():
            if key == MASTER:
                # An fp32 master copy loads as one (copied); a group without master weights
                # drops it (the param itself is the weight then).
                if has_master(p, group) and isinstance(value, torch.Tensor):
                    if value.numel() != p.numel():
                        raise ValueError(f"state {key!r} has {value.numel()} elements but its param has {p.numel()}")
                    out[key] = _laid_out_as(p, value.to(p.device).reshape(p.shape), torch.float32)
                continue
            if key == "step":
                out["step"] = torch.as_tensor(value, dtype=torch.float32).reshape(()).to(p.device).clone()
            elif key.endswith("_absmax") or not isinstance(value, torch.Tensor):
                continue  # absmax travels with its codes; non-tensor extras are not ours
            elif key not in {s.name for s in self._spec.states}:
                out[key] = value.to(p.device).clone()  # not a state of this family: kept as it is
            else:
                if value.numel() != p.numel():
                    raise ValueError(f"state {key!r} has {value.numel()} elements but its param has {p.numel()}")
                signed = self._spec.state(key).signed
                absmax = saved.get(key + "_absmax")
                if distributed.is_dtensor(p) and quantized != (value.dtype == torch.uint8):
                    raise ValueError(
                        f"state {key!r} of a sharded param is {'8-bit' if value.dtype == torch.uint8 else 'fp32'} "
                        f"but this optimizer keeps it {'8-bit' if quantized else 'fp32'}; convert it unsharded"
                    )
                if value.dtype == torch.uint8:
                    if absmax is None:
                        raise ValueError(f"8-bit state {key!r} comes without {key + '_absmax'!r}")
                    shard, blocks = distributed.local(p).numel(), distributed.local(absmax).numel()
                    if blocks != quant.num_blocks(shard, block_size):
                        raise ValueError(
                            f"state {key + '_absmax'!r} has {blocks} blocks; block_size={block_size} "
                            f"gives {quant.num_blocks(shard, block_size)} for a param (shard) of {shard} elements"
                        )
                    value = value.reshape(p.shape)
                    if quantized and (distributed.is_dtensor(p) or layout.same_layout(value, p)):
                        out[key] = value.to(p.device).clone()  # the same blocks: codes as saved
                        out[key + "_absmax"] = absmax.to(p.device, torch.float32).clone()
                        continue
                    # Blocks over the saved codes' memory order; requantized below over the param's.
                    value = quant.dequantize_blockwise(value, absmax, signed, block_size)
                value = value.to(p.device).reshape(p.shape)
                if quantized:
                    # Blocks run over the param's memory order (see fusedopt.layout).
                    codes, scales = quant.quantize_blockwise(_laid_out_as(p, value, torch.float32), signed, block_size)
                    out[key], out[key + "_absmax"] = codes, scales
                else:
                    out[key] = _laid_out_as(p, value, state_dtype(p))
        if self._spec.stepless and "step" not in out and any(s.name in out for s in self._spec.states):
            # torch's SGD keeps no step: its momentum buffer says the first step is done (the
            # next one must blend into it, not copy the gradient)
            out["step"] = torch.ones((), dtype=torch.float32, device=p.device)
        return out

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole optimizer keep:
        torch's ``defaults``, ``state`` and ``param_groups``, and the optimizer-wide arguments
        that live outside the groups (``backend``, ``max_grad_norm``). As in torch, hooks and
        caches are not kept; a copy plans its batches anew at its first step."""
        return {**super().__getstate__(), "backend": self.backend, "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_caches", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("_unit_scalars", {})
        self.__dict__.setdefault("_results", {"last_grad_norm": self.__dict__.pop("last_grad_norm", None)})

