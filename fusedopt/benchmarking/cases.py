"""The registry of cases: what a benchmark step runs over.

- :data:`MODELS`: parameter shapes (GPT-2 124M, a Llama-like 1B, 20,000 tensors of 4,096
  elements, one 82M tensor), full size and a scaled-down ``--quick`` size;
- :data:`OPTIMIZERS`: what a case steps, with its hyper-parameters, and the bytes its step
  must move at least (:func:`bytes_per_step`, DESIGN.md's roofline);
- :class:`Case`: an optimizer on a model in a dtype (``adamw/gpt2-124m/bf16``).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch


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
    """One optimizer configuration.

    ``hp`` are the hyper-parameters timed; ``check_hp`` those of the correctness check, with a
    learning rate and weight decay large enough that a wrong update, a missing bias
    correction or a missing decay moves a bf16 parameter by many ulps.
    """

    name: str
    fusedopt_class: str
    family: str  # adam | lamb | lion
    hp: dict
    check_hp: dict
    quantized: bool = False
    max_grad_norm: float | None = None
    block_size: int = 256
    min_8bit_size: int = 4096


_ADAM_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
_ADAM_CHECK = dict(_ADAM_HP, lr=5e-2, weight_decay=0.5)
_LAMB_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
_LAMB_CHECK = dict(_LAMB_HP, lr=5e-2, weight_decay=0.5)
_LION_HP = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
_LION_CHECK = dict(_LION_HP, lr=5e-2, weight_decay=0.5)

OPTIMIZERS: dict[str, OptSpec] = {
    s.name: s
    for s in (
        OptSpec("adamw", "AdamW", "adam", _ADAM_HP, _ADAM_CHECK),
        OptSpec("adamw-clip", "AdamW", "adam", _ADAM_HP, _ADAM_CHECK, max_grad_norm=1.0),
        OptSpec("lamb", "LAMB", "lamb", _LAMB_HP, _LAMB_CHECK),
        OptSpec("lion", "Lion", "lion", _LION_HP, _LION_CHECK),
        OptSpec("adamw8bit", "AdamW8bit", "adam", _ADAM_HP, _ADAM_CHECK, quantized=True),
        OptSpec("lion8bit", "Lion8bit", "lion", _LION_HP, _LION_CHECK, quantized=True),
    )
}


def bytes_per_step(spec: OptSpec, shapes: Shapes, dtype: torch.dtype, *,
                   state_bytes: int | None = None, separate_clip: bool = False) -> int:
    """The fewest bytes one step must read plus write (DESIGN.md's roofline).

    Per element, with ``P`` the param's bytes (its grad has the same dtype) and ``S`` a 32-bit
    state element (``state_bytes`` overrides it for providers that keep states in the param's
    dtype): the param is read and written (``2P``), the grad read (``P``) and each state read
    and written; LAMB's second pass reads the param and both states again and writes the
    param (``+ P + 2S``). 8-bit states are one byte each way plus one fp32 absmax per block
    each way; tensors under ``min_8bit_size`` keep 32-bit states. Clipping reads every grad
    once more for the norm when fused, and reads and writes it once more (``+3P``) when a
    separate ``clip_grad_norm_`` scales the grads in place.

    fp32: AdamW 28, + fused clip 32, + separate clip 40, LAMB 40, Lion 20, AdamW8bit ~16,
    Lion8bit ~14. bf16 params and grads with fp32 states: AdamW 22, + fused clip 24,
    + separate clip 28, LAMB 32, Lion 14, AdamW8bit ~10, Lion8bit ~8.
    """
    p = torch.empty((), dtype=dtype).element_size()
    s = 4 if state_bytes is None else state_bytes
    n_states = 1 if spec.family == "lion" else 2
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        per = 3 * p
        if spec.quantized and n >= spec.min_8bit_size:
            blocks = -(-n // spec.block_size)
            total += n * (per + 2 * n_states) + blocks * 8 * n_states
            continue
        per += 2 * s * n_states
        if spec.family == "lamb":
            per += p + 2 * s
        total += n * per
    if spec.max_grad_norm is not None:
        total += (3 if separate_clip else 1) * p * sum(math.prod(sh) for sh in shapes)
    return total


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
