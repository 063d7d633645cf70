"""The registry of cases: what a benchmark step runs over.

- :data:`MODELS`: parameter shapes (GPT-2 124M, a Llama-like 1B, 20,000 tensors of 4,096
  elements, one 82M tensor), full size and a scaled-down ``--quick`` size;
- :data:`OPTIMIZERS`: what a case steps (a fusedopt class and its hyper-parameters; what it
  keeps and how many passes it makes are read from ``fusedopt.families``), and the bytes its
  step must move at least (:func:`bytes_per_step`: the roofline, computed from the family);
- :class:`Case`: an optimizer on a model in a dtype (``adamw/gpt2-124m/bf16``).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from dataclasses import dataclass

import torch

from .. import families
from ..optimizer import CLASSES


# ---------------------------------------------------------------------------------------------
# Models: the parameter shapes a case steps over.
# ---------------------------------------------------------------------------------------------

Shapes = tuple[tuple[int, ...], ...]


def gpt2_shapes(n_layer=12, d=768, vocab=50257, ctx=1024) -> Shapes:
    """GPT-2 (Radford et al., 2019): tied token embedding, learned positions, pre-LN blocks
    with biases. The defaults give GPT-2 small, 124,439,808 params in 148 tensors."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),      # ln_1, attn.c_attn, attn.c_proj
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return ((vocab, d), (ctx, d), *block * n_layer, (d,), (d,))


def llama_shapes(n_layer=16, d=2048, ff=8192, vocab=128256, n_head=32, n_kv_head=8) -> Shapes:
    """A Llama-style decoder (RMSNorm, grouped-query attention, SwiGLU MLP, tied embedding).
    The defaults are Llama 3.2 1B's: 1,235,814,400 params in 146 tensors."""
    kv = d // n_head * n_kv_head
    block = [(d,), (d, d), (kv, d), (kv, d), (d, d),  # input norm, q, k, v, o
             (d,), (ff, d), (ff, d), (d, ff)]         # post-attention norm, gate, up, down
    return ((vocab, d), *block * n_layer, (d,))


def many_shapes(n=20000, numel=4096) -> Shapes:
    """Many small tensors: what per-tensor launch overhead costs."""
    return ((numel,),) * n


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    full: Shapes
    quick: Shapes


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("gpt2-124m", "GPT-2 small", gpt2_shapes(),
              gpt2_shapes(n_layer=2, d=64, vocab=1024, ctx=128)),
        Model("llama-1b", "Llama-like 1B (Llama 3.2 1B shapes)", llama_shapes(),
              llama_shapes(n_layer=2, d=64, ff=256, vocab=2048, n_head=4, n_kv_head=2)),
        Model("many-4k", "20,000 tensors of 4,096 elements", many_shapes(),
              many_shapes(n=64)),
        Model("one-82m", "the bytes of many-4k in one tensor (what its tensor count costs)",
              ((20000 * 4096,),), ((64 * 4096,),)),
    )
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------
# Optimizers: what a case steps.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptSpec:
    """One optimizer configuration: a fusedopt class and its hyper-parameters.

    ``hp`` are the hyper-parameters timed; ``check_hp`` those of the correctness check, with a
    learning rate and weight decay large enough that a wrong update, a missing bias
    correction or a missing decay moves a bf16 parameter by many ulps.

    What it keeps and moves is read from the class's family (:mod:`fusedopt.families`):
    :attr:`spec`, the states a group with these hyper-parameters keeps (:attr:`states`), its
    passes (:attr:`passes`) and 8-bit or not (:attr:`quantized`); nothing here names a family.
    """

    name: str
    fusedopt_class: str
    hp: dict
    check_hp: dict
    max_grad_norm: float | None = None
    block_size: int = 256
    min_8bit_size: int = 4096
    description: str = ""

    @property
    def optimizer_class(self) -> type:
        return CLASSES[self.fusedopt_class]

    @property
    def spec(self) -> families.Family:
        """The family (:class:`fusedopt.families.Family`) of :attr:`fusedopt_class`."""
        return self.optimizer_class._spec

    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def quantized(self) -> bool:
        return bool(self.optimizer_class._quantized)

    @property
    def kind(self) -> str:
        """The kind of step (``fusedopt.backends.KINDS``): ``"sgd"``, ``"lamb8bit"``, ..."""
        return self.spec.kind(self.quantized)

    @property
    def group(self) -> dict:
        """A param group of these hyper-parameters: the class's defaults, then :attr:`hp`."""
        sig = inspect.signature(self.optimizer_class)
        group = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        group.update(self.hp)
        return group

    @property
    def states(self) -> tuple[str, ...]:
        """The state tensors a group of :attr:`hp` keeps (torch's keys), as the family declares."""
        return self.spec.state_names(self.group)

    @property
    def passes(self) -> int:
        """Passes over the params a step makes: two for a per-tensor norm (LAMB, LARS)."""
        return 2 if self.spec.shape == families.TENSOR_NORM else 1


_ADAM_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
_ADAM_CHECK = dict(_ADAM_HP, lr=5e-2, weight_decay=0.5)
_LAMB_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
_LAMB_CHECK = dict(_LAMB_HP, lr=5e-2, weight_decay=0.5)
_LION_HP = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
_LION_CHECK = dict(_LION_HP, lr=5e-2, weight_decay=0.5)
_SGD_HP = dict(lr=1e-2, momentum=0.9, weight_decay=1e-4)
_SGD_CHECK = dict(_SGD_HP, lr=5e-2, weight_decay=0.5)
_NESTEROV_HP = dict(_SGD_HP, nesterov=True)
_NESTEROV_CHECK = dict(_SGD_CHECK, nesterov=True)
_ADAGRAD_HP = dict(lr=1e-2, weight_decay=1e-4)
_ADAGRAD_CHECK = dict(_ADAGRAD_HP, lr=5e-2, weight_decay=0.5)
# RMSprop's first steps move a param by about 10 lr (square_avg starts at (1 - alpha) g^2)
_RMSPROP_HP = dict(lr=1e-3, alpha=0.99, weight_decay=1e-4)
_RMSPROP_CHECK = dict(_RMSPROP_HP, lr=5e-3, weight_decay=0.5)
_CENTERED_HP = dict(_RMSPROP_HP, momentum=0.9, centered=True)
_CENTERED_CHECK = dict(_RMSPROP_CHECK, momentum=0.9, centered=True)
# LARS moves a param by at most lr * max_unorm * ||p|| a step: the check's lr 1.0 and
# max_unorm 0.05 move it by ~5% (as the others' checks do), with the trust clip active.
_LARS_HP = dict(lr=1.0, momentum=0.9, weight_decay=1e-4, max_unorm=0.02)
_LARS_CHECK = dict(_LARS_HP, weight_decay=0.5, max_unorm=0.05)

OPTIMIZERS: dict[str, OptSpec] = {
    s.name: s
    for s in (
        OptSpec("adamw", "AdamW", _ADAM_HP, _ADAM_CHECK),
        OptSpec("adamw-clip", "AdamW", _ADAM_HP, _ADAM_CHECK, max_grad_norm=1.0,
                description="`max_grad_norm=1.0`: the clip fused into the step"),
        OptSpec("lamb", "LAMB", _LAMB_HP, _LAMB_CHECK),
        OptSpec("lion", "Lion", _LION_HP, _LION_CHECK),
        OptSpec("sgd", "SGD", _SGD_HP, _SGD_CHECK, description="momentum 0.9"),
        OptSpec("sgd-nesterov", "SGD", _NESTEROV_HP, _NESTEROV_CHECK, description="Nesterov momentum 0.9"),
        OptSpec("adagrad", "Adagrad", _ADAGRAD_HP, _ADAGRAD_CHECK),
        OptSpec("rmsprop", "RMSprop", _RMSPROP_HP, _RMSPROP_CHECK, description="torch's defaults: no momentum"),
        OptSpec("rmsprop-centered", "RMSprop", _CENTERED_HP, _CENTERED_CHECK, description="centered, momentum 0.9"),
        OptSpec("lars", "LARS", _LARS_HP, _LARS_CHECK, description="momentum 0.9"),
        OptSpec("adamw8bit", "AdamW8bit", _ADAM_HP, _ADAM_CHECK),
        OptSpec("lion8bit", "Lion8bit", _LION_HP, _LION_CHECK),
        OptSpec("lamb8bit", "LAMB8bit", _LAMB_HP, _LAMB_CHECK),
        OptSpec("sgd8bit", "SGD8bit", _SGD_HP, _SGD_CHECK, description="momentum 0.9"),
        OptSpec("adagrad8bit", "Adagrad8bit", _ADAGRAD_HP, _ADAGRAD_CHECK),
        OptSpec("rmsprop8bit", "RMSprop8bit", _RMSPROP_HP, _RMSPROP_CHECK, description="no momentum"),
        OptSpec("lars8bit", "LARS8bit", _LARS_HP, _LARS_CHECK, description="momentum 0.9"),
    )
}


def optimizers_of(family: str) -> tuple[str, ...]:
    """The :data:`OPTIMIZERS` of one family (``fusedopt.families.FAMILIES``), 32 and 8-bit."""
    if family not in families.FAMILIES:
        raise ValueError(f"Invalid family: {family!r}; expected one of {', '.join(families.FAMILIES)}")
    return tuple(o.name for o in OPTIMIZERS.values() if o.family == family)


def second_pass_reads_grad(spec: OptSpec) -> bool:
    """Whether the apply pass of a two-pass (per-tensor norm) step must read the grad again.

    The apply pass rebuilds the update from the param and the states the first pass wrote
    (LAMB: ``m / (sqrt(v) + eps) + wd p``; LARS: its buffer), unless the update is not a
    function of them: a group that keeps no state (LARS without momentum: the update is
    ``g + wd p``) or a Nesterov step (``u = d + momentum * buf``, ``d`` from the grad). Read
    from the family's states and flags (a family declares nothing finer)."""
    group = spec.group
    return not spec.states or ("nesterov" in spec.spec.flags and bool(group["nesterov"]))


def tensor_bytes(spec: OptSpec, n: int, p: int, s: int = 4) -> int:
    """The fewest bytes one step moves (read + write) over one tensor of ``n`` elements, with
    ``p`` bytes per param (and grad) element and ``s`` per 32-bit state element.

    From the family: ``k = len(spec.states)`` states, each read and written once; the param
    read and written and the grad read (``3p``).

    - One pass (elementwise families): ``3p + 2ks`` per element.
    - Two passes, 32-bit states (LAMB, LARS): the first reads the param, the grad and the
      states and writes the states; the second reads the param and the states again (and the
      grad where :func:`second_pass_reads_grad`) and writes the param: ``4p + 3ks (+ p)``.
    - 8-bit states (tensors of at least ``min_8bit_size`` elements; smaller ones keep 32-bit
      states): a state is one byte each way plus one fp32 absmax per ``block_size`` block each
      way. One pass: ``3p + 2k`` plus ``8k`` bytes per block. Two passes: the first reads the
      param, the grad and the states and writes nothing (the norms); the second reads them
      again and writes the param and the states (the update uses this step's unquantized
      states, so it recomputes them): ``5p + 3k`` plus ``12k`` bytes per block.
    """
    k = len(spec.states)
    if spec.quantized and n >= spec.min_8bit_size:
        blocks = -(-n // spec.block_size)
        state = n * k + blocks * 4 * k  # every state's codes and absmaxes, once one way
        if spec.passes == 2:
            return 2 * (2 * p * n + state) + p * n + state
        return 3 * p * n + 2 * state
    state = n * k * s
    total = 3 * p * n + 2 * state
    if spec.passes == 2:
        total += p * n + state + (p * n if second_pass_reads_grad(spec) else 0)
    return total


def bytes_per_step(spec: OptSpec, shapes: Shapes, dtype: torch.dtype, *,
                   state_bytes: int | None = None, separate_clip: bool = False) -> int:
    """The fewest bytes one step must read plus write (the roofline), summed over the
    tensors (:func:`tensor_bytes`): ``P`` bytes per param and grad element, ``S`` per 32-bit
    state element (4; ``state_bytes`` overrides it for providers that keep states in the
    param's dtype). Clipping reads every grad once more for the norm when fused (``+P``), and
    reads and writes it once more (``+3P``) when a separate ``clip_grad_norm_`` scales the
    grads in place.

    fp32 AdamW 28, + fused clip 32, + separate clip 40, LAMB 40, Lion 20, AdamW8bit ~16.06;
    every optimizer, both dtypes: the roofline table (``python -m fusedopt bench --roofline``,
    the README's).
    """
    p = torch.empty((), dtype=dtype).element_size()
    s = 4 if state_bytes is None else state_bytes
    total = sum(tensor_bytes(spec, math.prod(shape), p, s) for shape in shapes)
    if spec.max_grad_norm is not None:
        total += (3 if separate_clip else 1) * p * sum(math.prod(sh) for sh in shapes)
    return total


def bytes_per_param(spec: OptSpec, dtype: torch.dtype, *, separate_clip: bool = False) -> float:
    """:func:`bytes_per_step` per element of a large tensor (a whole number of 8-bit blocks,
    over ``min_8bit_size``): the roofline table's figure."""
    n = spec.block_size * max(1, -(-spec.min_8bit_size // spec.block_size)) * 64
    return bytes_per_step(spec, ((n,),), dtype, separate_clip=separate_clip) / n


# ---------------------------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    optimizer: OptSpec
    model: Model
    dtype_name: str
    quick: bool

    @property
    def name(self) -> str:
        return f"{self.optimizer.name}/{self.model.name}/{self.dtype_name}"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def shapes(self) -> Shapes:
        return self.model.quick if self.quick else self.model.full

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def bytes_per_step(self, **provider_bytes) -> int:
        return bytes_per_step(self.optimizer, self.shapes, self.dtype, **provider_bytes)


def all_cases(quick: bool) -> list[Case]:
    return [Case(o, m, d, quick) for o in OPTIMIZERS.values() for m in MODELS.values() for d in DTYPES]


def select_cases(patterns, quick: bool) -> list[Case]:
    """Cases whose ``optimizer/model/dtype`` name matches one of ``patterns`` (shell globs; a
    missing part matches anything, so ``lion`` is every Lion case and ``*/*/bf16`` every bf16
    one). ``ValueError`` for a pattern that matches nothing."""
    cases = all_cases(quick)
    if not patterns:
        return cases
    chosen = set()
    for pattern in patterns:
        parts = pattern.split("/")
        parts += ["*"] * (3 - len(parts))
        hits = {c.name for c in cases
                if len(parts) == 3 and all(fnmatch.fnmatchcase(x, p) for x, p in zip(c.name.split("/"), parts))}
        if not hits:
            raise ValueError(f"Invalid --cases pattern {pattern!r}: matches none of "
                             f"{', '.join(c.name for c in cases)}")
        chosen |= hits
    return [c for c in cases if c.name in chosen]
