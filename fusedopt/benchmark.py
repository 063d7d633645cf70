"""``python -m fusedopt bench``: time every fusedopt backend and every peer on the same
optimizer steps, and report bandwidth against the copy ceiling measured in the same run.

An optimizer step moves bytes and does almost no arithmetic, so each case declares the bytes
per parameter its step must move at least (DESIGN.md's roofline) and every result is reported
as GB/s and as a percentage of a device-to-device copy timed in the same run.

The registry here is the one the pytest-benchmark suites (``bench/bench_*.py``) use too:

- :data:`OPTIMIZERS`: what a case steps (AdamW, AdamW + clipping, LAMB, Lion, AdamW8bit,
  Lion8bit) with its hyper-parameters;
- :data:`MODELS`: parameter shapes (GPT-2 124M, a Llama-like 1B, 20,000 tensors of 4,096
  elements), full size and a scaled-down ``--quick`` size;
- :data:`PROVIDERS`: who runs the step (torch's for-loop, foreach, fused and compiled steps,
  bitsandbytes, lion-pytorch, fusedopt's backends). One that cannot run here is listed with
  the reason, never dropped.

For each case and provider: the provider is first checked against fusedopt's reference on small
random data (a provider that computes something else is marked ``wrong`` and not timed); then
several input sets are built and rotated, the step is warmed up, and each timed repeat runs
after the L2 cache is flushed, timed with CUDA events on a GPU (wall clock on a CPU, where the
step is synchronous). The median and the 20% / 80% quantiles are reported, with the host time
per step, the kernel launches per step (torch profiler, GPU only) and the state memory.

Example::

    python -m fusedopt bench --quick                      # 1m10s on 2 CPU cores (load 3)
    python -m fusedopt bench --cases adamw/gpt2-124m --providers 'torch-*' 'fusedopt-*' \\
        --json bench/results/h100.json --plot bench/results/h100.png
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import backends
from .progress import Progress, Silent

SCHEMA_ID = "fusedopt-bench/1"

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


# ---------------------------------------------------------------------------------------------
# Providers: who runs the step.
# ---------------------------------------------------------------------------------------------


class Runner:
    """One optimizer over one input set; ``step()`` is what is timed."""

    def __init__(self, optimizer, step: Callable[[], Any]):
        self.optimizer = optimizer
        self.step = step


@dataclass(frozen=True)
class Provider:
    """A way to run an optimizer step.

    Attributes:
        name, description: as listed.
        optimizers: the :data:`OPTIMIZERS` it implements (others are not its cases).
        make: ``make(params, spec, hp) -> Runner`` for params whose ``.grad`` is set.
        reason: ``reason(device, quick) -> str | None``: why it cannot run here (None: it can).
        state_in_param_dtype: keeps its states in the param's dtype (torch does), so it moves
            fewer bytes and is checked with that precision's tolerance.
        separate_clip: clips with a separate ``clip_grad_norm_`` that rewrites the grads.
        known_differences: optimizer name -> how this provider's algorithm differs from
            DESIGN.md's (it still fails the check, and the reason says why).
    """

    name: str
    description: str
    optimizers: tuple[str, ...]
    make: Callable[..., Runner]
    reason: Callable[[torch.device, bool], str | None] = lambda device, quick: None
    state_in_param_dtype: bool = False
    separate_clip: bool = False
    known_differences: dict = field(default_factory=dict)

    def state_bytes(self, dtype: torch.dtype) -> int | None:
        return torch.empty((), dtype=dtype).element_size() if self.state_in_param_dtype else None


class Skip(str):
    """A reason that is a choice of this run (``--quick``, memory), not a missing capability:
    the result's status is ``skipped`` rather than ``unavailable``."""


def _module_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"not installed ({e})"
    return None


def _needs_cuda(what: str):
    def reason(device: torch.device, quick: bool) -> str | None:
        if device.type != "cuda":
            return f"{what} runs on CUDA tensors only"
        return None
    return reason


def _all(*reasons):
    def reason(device, quick):
        return next((r for r in (f(device, quick) for f in reasons) if r is not None), None)
    return reason


def _clip_then(params, max_grad_norm, foreach, step):
    if max_grad_norm is None:
        return step

    def clipped_step():
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=foreach)
        step()
    return clipped_step


def _torch_adamw(**flags):
    def make(params, spec, hp):
        opt = torch.optim.AdamW(params, **hp, **flags)
        return Runner(opt, _clip_then(params, spec.max_grad_norm, flags.get("foreach", True), opt.step))
    return make


def _torch_compile_make(params, spec, hp):
    if spec.family == "lion":
        import lion_pytorch
        opt = lion_pytorch.Lion(params, **hp)
    else:
        opt = torch.optim.AdamW(params, **hp, foreach=True)
    step = _clip_then(params, spec.max_grad_norm, True, opt.step)
    # As in torch's "compiling the optimizer" recipe: the whole step in one compiled function.
    return Runner(opt, torch.compile(step, fullgraph=False))


def _torch_compile_reason(device, quick):
    if quick:
        return Skip("not run under --quick: compiling a step takes tens of seconds per case")
    return None


def _bnb_make(bits):
    def make(params, spec, hp):
        import bitsandbytes as bnb
        if spec.quantized:
            cls = {"adam": bnb.optim.AdamW8bit, "lion": bnb.optim.Lion8bit}[spec.family]
            opt = cls(params, **hp, min_8bit_size=spec.min_8bit_size)
        else:
            cls = {"adam": bnb.optim.AdamW, "lion": bnb.optim.Lion, "lamb": bnb.optim.LAMB}[spec.family]
            opt = cls(params, **hp, optim_bits=bits)
        return Runner(opt, _clip_then(params, spec.max_grad_norm, True, opt.step))
    return make


def _lion_pytorch_make(use_triton):
    def make(params, spec, hp):
        import lion_pytorch
        opt = lion_pytorch.Lion(params, **hp, use_triton=use_triton)
        return Runner(opt, opt.step)
    return make


class _Graphed:
    """A step replayed from a CUDA graph: the first call runs it eagerly on a side stream
    (states, launch tables), the second captures it and replays the capture, every later call
    replays. Each call is one step (so the correctness check sees the graph's steps too); the
    host time left is one graph launch."""

    def __init__(self, step: Callable[[], Any]):
        self.eager, self.graph, self.calls = step, None, 0

    def __call__(self) -> None:
        if self.graph is None:
            if self.calls == 0:
                self.calls = 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.eager()
                torch.cuda.current_stream().wait_stream(side)
                return
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.eager()
            self.graph = graph
        self.graph.replay()


def _graphed(make):
    def graphed(params, spec, hp):
        runner = make(params, spec, hp)
        return Runner(runner.optimizer, _Graphed(runner.step))
    return graphed


def _fusedopt_make(backend):
    def make(params, spec, hp):
        import fusedopt
        extra = dict(block_size=spec.block_size, min_8bit_size=spec.min_8bit_size) if spec.quantized else {}
        opt = getattr(fusedopt, spec.fusedopt_class)(
            params, **hp, max_grad_norm=spec.max_grad_norm, backend=backend, **extra)
        return Runner(opt, opt.step)
    return make


def _fusedopt_reason(backend):
    def reason(device, quick):
        why = backends.unavailable_reason(backend, device)
        if why is None and device.type == "cpu" and backend != "reference" \
                and os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 runs its kernels in the Triton interpreter: not a timing"
        return why
    return reason


_ADAMS = ("adamw", "adamw-clip")
_ALL = tuple(OPTIMIZERS)

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("torch-forloop", "torch.optim.AdamW(foreach=False): a few kernels per tensor",
                 _ADAMS, _torch_adamw(foreach=False), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-foreach", "torch.optim.AdamW(foreach=True): multi-tensor ops",
                 _ADAMS, _torch_adamw(foreach=True), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-fused", "torch.optim.AdamW(fused=True): torch's fused kernel",
                 _ADAMS, _torch_adamw(fused=True), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-fused-graph", "torch.optim.AdamW(fused=True, capturable=True) replayed from a CUDA graph",
                 _ADAMS, _graphed(_torch_adamw(fused=True, capturable=True)), _needs_cuda("CUDA-graph replay"),
                 state_in_param_dtype=True, separate_clip=True),
        Provider("torch-compile", "torch.compile of the torch step (AdamW foreach; Lion: lion-pytorch's)",
                 _ADAMS + ("lion",), _torch_compile_make, _torch_compile_reason,
                 state_in_param_dtype=True, separate_clip=True),
        Provider("bnb-32bit", "bitsandbytes AdamW / LAMB / Lion, optim_bits=32",
                 _ADAMS + ("lamb", "lion"), _bnb_make(32), lambda d, q: _module_reason("bitsandbytes"),
                 separate_clip=True,
                 known_differences={"lamb": "bitsandbytes' LAMB is Adam with the update scaled down only "
                                            "when its norm exceeds max_unorm * ||p||, not the trust ratio"}),
        Provider("bnb-8bit", "bitsandbytes AdamW8bit / Lion8bit (block-wise)",
                 ("adamw8bit", "lion8bit"), _bnb_make(8), lambda d, q: _module_reason("bitsandbytes")),
        Provider("lion-pytorch", "lion_pytorch.Lion: a torch for-loop",
                 ("lion",), _lion_pytorch_make(False), lambda d, q: _module_reason("lion_pytorch"),
                 state_in_param_dtype=True),
        Provider("lion-pytorch-triton", "lion_pytorch.Lion(use_triton=True): one Triton kernel per tensor",
                 ("lion",), _lion_pytorch_make(True),
                 _all(lambda d, q: _module_reason("lion_pytorch"), _needs_cuda("its Triton kernel")),
                 state_in_param_dtype=True),
        Provider("fusedopt-reference", "fusedopt backend='reference': torch ops, the specification",
                 _ALL, _fusedopt_make("reference"), _fusedopt_reason("reference")),
        Provider("fusedopt-triton", "fusedopt backend='triton'",
                 _ALL, _fusedopt_make("triton"), _fusedopt_reason("triton")),
        Provider("fusedopt-cuda", "fusedopt backend='cuda'",
                 _ALL, _fusedopt_make("cuda"), _fusedopt_reason("cuda")),
        Provider("fusedopt-triton-graph", "fusedopt backend='triton' replayed from a CUDA graph (no host time)",
                 _ALL, _graphed(_fusedopt_make("triton")),
                 _all(_needs_cuda("CUDA-graph replay"), _fusedopt_reason("triton"))),
        Provider("fusedopt-cuda-graph", "fusedopt backend='cuda' replayed from a CUDA graph (no host time)",
                 _ALL, _graphed(_fusedopt_make("cuda")),
                 _all(_needs_cuda("CUDA-graph replay"), _fusedopt_reason("cuda"))),
    )
}


def select_providers(patterns) -> list[Provider]:
    """Providers whose name matches one of ``patterns`` (shell globs), in registry order."""
    if not patterns:
        return list(PROVIDERS.values())
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in PROVIDERS):
            raise ValueError(f"Invalid --providers pattern {pattern!r}: matches none of {', '.join(PROVIDERS)}")
    return [p for n, p in PROVIDERS.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


# ---------------------------------------------------------------------------------------------
# The correctness check.
# ---------------------------------------------------------------------------------------------

#: Small shapes the check steps: odd sizes, one under ``min_8bit_size`` (fp32 states even in
#: the 8-bit optimizers) and three over it.
CHECK_SHAPES: Shapes = ((4161,), (65, 77), (33,), (2, 2500))


def check_tolerance(dtype: torch.dtype, *, quantized: bool, state_in_param_dtype: bool) -> float:
    """Largest relative error of the update a correct provider may show against the reference.

    The error is ``||dp - dp_ref|| / ||dp_ref||`` over all check tensors, ``dp`` the change of
    the params over the check's steps (float64). With the check's learning rate (5e-2) a
    wrong formula, a missing bias correction or decay, or a flipped sign errs by 10% to 200%.

    - fp32 params, fp32 states: 1e-4. float32 arithmetic in another order errs ~1e-6
      (torch.optim.AdamW vs the reference: 6.8e-6 measured).
    - bf16 params: 2e-2. Each step rounds the param to bf16 (half an ulp, 2^-9 of |p|, against
      updates of ~5e-2 |p|); bitsandbytes' 32-bit AdamW measured 3.4e-3.
    - 8-bit states: at least 2e-2. Two correct implementations may round a state to
      neighbouring codes; the coarsest step of the signed map is 1/64 of the block's absmax.
      bitsandbytes' AdamW8bit vs the 8-bit reference measured 2.3e-3 (fp32), 4.6e-3 (bf16).
    - states kept in bf16 (torch and lion-pytorch with bf16 params): 1.5e-1. The moments
      themselves carry bf16 rounding; torch.optim.AdamW measured 5.6e-2, lion-pytorch 7.5e-2
      (a rounded momentum near zero flips the sign of Lion's update).
    """
    if dtype == torch.float32:
        tol = 1e-4
    elif dtype in (torch.bfloat16, torch.float16):
        tol = 1.5e-1 if state_in_param_dtype else 2e-2
    else:
        raise ValueError(f"Invalid dtype: {dtype}; the benchmark checks fp32 and bf16 params")
    if quantized:
        tol = max(tol, 2e-2)
    return tol


def _check_inputs(dtype, device, steps, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in CHECK_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(device, dtype) for s in CHECK_SHAPES] for _ in range(steps)]
    return params, grads


def _run_check(make, spec, params0, grads):
    params = [p.clone() for p in params0]
    runner = make(params, spec, spec.check_hp)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        runner.step()
    return params


def check(provider: Provider, case: Case, device: torch.device, steps: int) -> tuple[float, float]:
    """Step ``provider`` and fusedopt's reference ``steps`` times on the same small random
    inputs; return ``(error, tolerance)`` (see :func:`check_tolerance`)."""
    spec = case.optimizer
    params0, grads = _check_inputs(case.dtype, device, steps)
    got = _run_check(provider.make, spec, params0, grads)
    want = _run_check(_fusedopt_make("reference"), spec, params0, grads)
    num = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, want))
    den = sum(((b.double() - p.double()) ** 2).sum() for b, p in zip(want, params0))
    err = float((num / den).sqrt())
    tol = check_tolerance(case.dtype, quantized=spec.quantized, state_in_param_dtype=provider.state_in_param_dtype)
    return err, tol


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How much to measure. ``time_budget_s`` sets the repeats between the two bounds from the
    warm-up's step time; ``input_sets`` is the most input sets rotated (fewer when memory is
    short); ``flush_bytes`` is the buffer written before every repeat to evict the cache."""

    warmup: int
    min_repeat: int
    max_repeat: int
    time_budget_s: float
    input_sets: int
    check_steps: int
    flush_bytes: int
    copy_bytes: int


def default_config(quick: bool, device: torch.device) -> Config:
    gpu = device.type == "cuda"
    if quick:
        return Config(warmup=1, min_repeat=5, max_repeat=20, time_budget_s=0.05, input_sets=2,
                      check_steps=3, flush_bytes=(256 if gpu else 8) << 20,
                      copy_bytes=(256 if gpu else 32) << 20)
    return Config(warmup=5, min_repeat=10, max_repeat=100, time_budget_s=1.0, input_sets=3,
                  check_steps=3, flush_bytes=(256 if gpu else 64) << 20,
                  copy_bytes=(1024 if gpu else 256) << 20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_fn(fns: list[Callable[[], Any]], device: torch.device, repeats: int, flush: torch.Tensor):
    """Time ``repeats`` calls, rotating through ``fns``, each after ``flush`` is rewritten.

    Returns ``(device_ms, host_ms)`` lists: on a GPU the device time between CUDA events
    recorded around the call, and the host time the call took to return (what the launches
    cost the CPU); on a CPU both are the wall time of the (synchronous) call.
    """
    device_ms, host_ms = [], []
    cuda = device.type == "cuda"
    if cuda:
        start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        fn = fns[i % len(fns)]
        flush.zero_()
        _sync(device)
        if cuda:
            start[i].record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if cuda:
            end[i].record()
            end[i].synchronize()
            device_ms.append(start[i].elapsed_time(end[i]))
        else:
            device_ms.append((t1 - t0) * 1e3)
        host_ms.append((t1 - t0) * 1e3)
    return device_ms, host_ms


def copy_bandwidth(device: torch.device, config: Config) -> dict:
    """Median device-to-device copy (read + write bytes over time) of ``config.copy_bytes``."""
    n = config.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times, _ = time_fn([lambda: dst.copy_(src)], device, 20, flush)
    q20, median, q80 = _quantiles(times)
    moved = 2 * n * 4
    return dict(bytes=moved, median_ms=median, q20_ms=q20, q80_ms=q80, gbps=moved / median / 1e6)


def count_launches(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Device operations (kernels, memcpy, memset) one call of ``fn`` issues, counted with the
    torch profiler; None off a GPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    # Device-side events are kernels, memcpy and memset, plus the GPU-timeline copies of
    # record_function ranges (torch's Optimizer.step is one): those are not launches.
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "annotation" not in (getattr(e, "activity_type", None) or ""))


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, each storage counted once (bitsandbytes
    shares one codebook among all params)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = (value.device, storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def _set_bytes(case: Case) -> int:
    """Memory of one input set: params, grads and 32-bit states (an upper bound for 8-bit)."""
    p = torch.empty((), dtype=case.dtype).element_size()
    states = 1 if case.optimizer.family == "lion" else 2
    return case.numel * (2 * p + 4 * states)


def _make_set(case: Case, device: torch.device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
        params.append(p)
    return params


def warm_up(runners: list[Runner], device: torch.device, config: Config) -> int:
    """Step each runner ``config.warmup`` times (state allocation, compilation, autotuning stay
    out of the timings); return how many timed repeats fit the time budget."""
    for r in runners:
        for _ in range(config.warmup):
            r.step()
    _sync(device)
    t0 = time.perf_counter()
    runners[0].step()
    _sync(device)
    estimate = time.perf_counter() - t0
    return max(config.min_repeat, min(config.max_repeat, math.ceil(config.time_budget_s / max(estimate, 1e-6))))


def _result(provider: Provider, status: str, reason: str | None = None, **fields) -> dict:
    out = dict(provider=provider.name, status=status, reason=reason, check_error=None,
               check_tolerance=None, bytes_per_param=None, median_ms=None, q20_ms=None,
               q80_ms=None, gbps=None, pct_copy=None, x_floor=None, host_ms=None,
               launches=None, state_bytes_per_param=None, repeats=None, input_sets=None,
               notes=[])
    out.update(fields)
    return out


def measure(provider: Provider, case: Case, device: torch.device, config: Config,
            copy_gbps: float, quick: bool) -> dict:
    """Check, then time, one provider on one case; returns a result (see bench/README.md)."""
    reason = provider.reason(device, quick)
    if reason is not None:
        status = "skipped" if isinstance(reason, Skip) else "unavailable"
        return _result(provider, status, reason)

    notes = []
    if provider.state_in_param_dtype and case.dtype != torch.float32:
        notes.append(f"states in {case.dtype_name} (the param's dtype)")
    try:
        err, tol = check(provider, case, device, config.check_steps)
    except Exception as e:  # a peer that raises on this case is reported, not fatal
        return _result(provider, "error", f"check raised {type(e).__name__}: {e}", notes=notes)
    checked = dict(check_error=err if math.isfinite(err) else None, check_tolerance=tol, notes=notes)
    if not err <= tol:
        known = provider.known_differences.get(case.optimizer.name)
        what = f"relative error {err:.3g} > {tol:.3g}" if math.isfinite(err) else "non-finite params"
        return _result(provider, "wrong", f"update differs from fusedopt's reference: {what}; not timed"
                       + (f" (known: {known})" if known else ""), **checked)

    need = _set_bytes(case)
    free = _free_bytes(device)
    sets = min(config.input_sets, int(0.4 * free // max(need, 1)))
    if sets < 1:
        if need > 0.7 * free:
            return _result(provider, "skipped",
                           f"needs about {need / 2**30:.1f} GiB for one input set, {free / 2**30:.1f} GiB free",
                           **checked)
        sets = 1

    runners = []
    try:
        for s in range(sets):
            runners.append(provider.make(_make_set(case, device, seed=s), case.optimizer, case.optimizer.hp))
        repeats = warm_up(runners, device, config)
        flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
        times, host = time_fn([r.step for r in runners], device, repeats, flush)
        del flush
        launches = count_launches(runners[0].step, device)
        state = state_bytes(runners[0].optimizer)
    except torch.OutOfMemoryError as e:
        return _result(provider, "skipped", f"out of memory: {str(e).splitlines()[0]}", **checked)
    except Exception as e:
        return _result(provider, "error", f"{type(e).__name__}: {e}", **checked)
    finally:
        del runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    q20, median, q80 = _quantiles(times)
    moved = case.bytes_per_step(state_bytes=provider.state_bytes(case.dtype),
                                separate_clip=provider.separate_clip and case.optimizer.max_grad_norm is not None)
    gbps = moved / median / 1e6
    floor_ms = case.bytes_per_step() / copy_gbps / 1e6
    return _result(
        provider, "ok", None, **checked,
        bytes_per_param=moved / case.numel, median_ms=median, q20_ms=q20, q80_ms=q80,
        gbps=gbps, pct_copy=100 * gbps / copy_gbps, x_floor=median / floor_ms,
        host_ms=_quantiles(host)[1], launches=launches,
        state_bytes_per_param=state / case.numel, repeats=repeats, input_sets=sets,
    )


# ---------------------------------------------------------------------------------------------
# Environment and provenance.
# ---------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if gpu:
        props = torch.cuda.get_device_properties(device)
        name = props.name
        memory = props.total_memory
    else:
        name = _cpu_name()
        memory = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        device=str(device), device_name=name, gpu=gpu, device_memory_bytes=memory,
        driver=_driver() if gpu else None, cuda=torch.version.cuda,
        cpu_count=os.cpu_count(), python=platform.python_version(), platform=platform.platform(),
        versions={k: _version(d) for k, d in (("torch", "torch"), ("triton", "triton"),
                                               ("bitsandbytes", "bitsandbytes"),
                                               ("lion_pytorch", "lion-pytorch"), ("fusedopt", "fusedopt"))},
        commit=_git("rev-parse", "HEAD"), dirty=None if status is None else bool(status),
    )


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

NO_GPU_NOTE = ("No CUDA device: only the CPU providers ran, timed by wall clock. GPU figures "
               "(CUDA-event timings, kernel launches, fusedopt's triton and cuda backends, "
               "lion-pytorch's Triton kernel) need a GPU.")


def run(cases: list[Case], providers: list[Provider], device: torch.device, config: Config,
        quick: bool, progress: Progress | None = None, argv: list[str] | None = None) -> dict:
    """Measure every applicable (case, provider) pair; returns the JSON document."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    copy = copy_bandwidth(device, config)
    pairs = [(c, p) for c in cases for p in providers if c.optimizer.name in p.optimizers]
    progress = progress or Silent(len(pairs))
    results: dict[str, list] = {c.name: [] for c in cases}
    for case, provider in pairs:
        progress.start(f"{case.name} {provider.name}")
        results[case.name].append(measure(provider, case, device, config, copy["gbps"], quick))
        progress.advance()
    progress.close()

    out_cases = []
    for case in cases:
        floor = case.bytes_per_step()
        out_cases.append(dict(
            name=case.name, optimizer=case.optimizer.name, model=case.model.name,
            dtype=case.dtype_name, tensors=len(case.shapes), params=case.numel,
            bytes_per_param=floor / case.numel, floor_ms=floor / copy["gbps"] / 1e6,
            results=results[case.name],
        ))
    notes = [] if device.type == "cuda" else [NO_GPU_NOTE]
    if quick:
        notes.append("--quick: scaled-down shapes and few repeats; a smoke test, not a measurement")
    return dict(
        schema=SCHEMA_ID, date=date, argv=list(argv or []), quick=quick,
        environment=environment(device),
        config=dict(warmup=config.warmup, min_repeat=config.min_repeat, max_repeat=config.max_repeat,
                    time_budget_s=config.time_budget_s, input_sets=config.input_sets,
                    check_steps=config.check_steps, flush_bytes=config.flush_bytes,
                    cpu_threads=torch.get_num_threads()),
        copy=copy,
        providers=[dict(name=p.name, description=p.description, optimizers=list(p.optimizers),
                        reason=p.reason(device, quick)) for p in providers],
        cases=out_cases,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Output: the terminal table, the JSON schema, the plot.
# ---------------------------------------------------------------------------------------------


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


#: What a provider is, where its name alone does not say (the table's rows and the plot's legend).
ROLES = {
    "fusedopt-reference": "reference backend: the oracle, not a fast path",
    "fusedopt-triton": "triton backend",
    "fusedopt-cuda": "cuda backend",
    "fusedopt-triton-graph": "triton backend, CUDA-graph replay",
    "fusedopt-cuda-graph": "cuda backend, CUDA-graph replay",
}


def provider_label(name: str) -> str:
    """``name``, with its role in parentheses where :data:`ROLES` has one."""
    return f"{name} ({ROLES[name]})" if name in ROLES else name


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_table(doc: dict) -> str:
    """The run as text: one block per case, one row per provider, then the notes."""
    copy = doc["copy"]
    env = doc["environment"]
    lines = [
        f"fusedopt bench on {env['device']} ({env['device_name']}), torch {env['versions']['torch']}, "
        f"commit {(env['commit'] or 'unknown')[:10]}{' (dirty)' if env['dirty'] else ''}, {doc['date']}",
        f"copy ceiling: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2**20:.0f} MiB read + written "
        f"in {copy['median_ms']:.3f} ms, median)",
    ]
    # The name column fits the longest name (fusedopt-triton-graph is 21 characters).
    w = max([len("provider")] + [len(p["name"]) for p in doc["providers"]]
            + [len(r["provider"]) for c in doc["cases"] for r in c["results"]])
    head = (f"  {'provider':<{w}} {'status':<11} {'median ms':>10} {'[q20, q80]':>19} {'GB/s':>8} "
            f"{'%copy':>7} {'xfloor':>7} {'host ms':>8} {'launch':>6} {'stateB/p':>8} {'check':>8}")
    cached = False
    for case in doc["cases"]:
        lines.append("")
        lines.append(f"{case['name']}: {_count(case['params'])} params in {case['tensors']} tensors, "
                     f"{case['bytes_per_param']:.2f} B/param, floor {case['floor_ms']:.3f} ms at the copy ceiling")
        if not case["results"]:
            lines.append("  (no selected provider implements this optimizer)")
            continue
        lines.append(head)
        for r in case["results"]:
            if r["status"] != "ok":
                passed = r["status"] != "wrong" and r["check_error"] is not None
                check = f" (after passing the check: error {r['check_error']:.2g})" if passed else ""
                lines.append(f"  {r['provider']:<{w}} {r['status']:<11} {r['reason']}{check}")
                continue
            spread = f"[{r['q20_ms']:.3f}, {r['q80_ms']:.3f}]"
            notes = list(r["notes"])
            if r["provider"] in ROLES:
                notes.insert(0, ROLES[r["provider"]])
            # Faster than the copy: the step's bytes stayed in a cache the copy's did not fit.
            star = "*" if r["pct_copy"] > 100 else " "
            if star == "*":
                cached = True
                notes.append(f"*cache-resident: {_mib(r['bytes_per_param'] * case['params'])} moved per step")
            notes = f"  ({'; '.join(notes)})" if notes else ""
            lines.append(
                f"  {r['provider']:<{w}} {'ok':<11} {r['median_ms']:>10.3f} {spread:>19} {r['gbps']:>8.1f} "
                f"{r['pct_copy']:>5.1f}%{star} {r['x_floor']:>6.2f}x {r['host_ms']:>8.3f} {_fmt(r['launches'], 'd'):>6} "
                f"{r['state_bytes_per_param']:>8.2f} {r['check_error']:>8.1e}{notes}")
    lines.append("")
    lines.append("providers:")
    for p in doc["providers"]:
        lines.append(f"  {p['name']:<{w}} {p['description']}"
                     + ("" if p["reason"] is None else f"; not run here: {p['reason']}"))
    lines.append("GB/s: the bytes the provider's own algorithm must move (B/param shown per case is the "
                 "fused floor) over the median step time; xfloor: median over the case's floor.")
    if cached:
        lines.append(f"*: over 100% of the copy. The step's working set (the MiB moved per step, in the row) "
                     f"is small enough to stay in the device's caches between repeats, while the copy moves "
                     f"{copy['bytes'] / 2**20:.0f} MiB from memory: a cache speed, not memory bandwidth.")
    lines.extend(doc["notes"])
    return "\n".join(lines)


#: The kind of step (``fusedopt.backends.KINDS``) each benchmark optimizer exercises.
KIND_OF = {"adamw": "adam", "adamw-clip": "adam", "lamb": "lamb", "lion": "lion",
           "adamw8bit": "adam8bit", "lion8bit": "lion8bit"}


def _medians(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """(case name, provider) -> result, over several runs (a later run wins)."""
    out = {}
    for doc in docs:
        for case in doc["cases"]:
            for r in case["results"]:
                if r["status"] == "ok":
                    out[(case["name"], r["provider"])] = r
    return out


def headlines(docs: list[dict]) -> list[str]:
    """The figures the project's performance goals are stated in, from one or more runs of the
    same machine: ratios of medians measured in the same run, never across machines.

    - each fusedopt backend's %copy on AdamW fp32 (goal: >= 90%) and its speed-up over torch's
      fused AdamW; with clipping, over torch's clip_grad_norm_ + fused AdamW (goal: >= 1.5x);
    - AdamW8bit bf16 over bitsandbytes (goal: >= 1.5x);
    - 20,000 tensors of 4,096 elements over the same bytes in one tensor (goal: <= 1.3x);
    - per kind of step, the faster of triton and cuda (the geometric mean of their ratios over
      every case both ran): what ``fusedopt.backends.AUTO_ORDER`` should say.
    """
    res = _medians(docs)
    cases = sorted({c for c, _ in res})
    lines = []

    def ratio(case, slow, fast):
        a, b = res.get((case, slow)), res.get((case, fast))
        return None if a is None or b is None else a["median_ms"] / b["median_ms"]

    ours = [p for p in ("fusedopt-triton", "fusedopt-cuda", "fusedopt-triton-graph", "fusedopt-cuda-graph")
            if any(k[1] == p for k in res)]
    for case in cases:
        opt, model, dtype = case.split("/")
        for p in ours:
            r = res.get((case, p))
            if r is None:
                continue
            parts = [f"{r['pct_copy']:.1f}% of copy"]
            if opt in ("adamw", "adamw-clip"):
                for peer in ("torch-fused", "torch-fused-graph"):
                    x = ratio(case, peer, p)
                    if x is not None:
                        parts.append(f"{x:.2f}x {peer}")
            if opt in ("adamw8bit", "lion8bit"):
                x = ratio(case, "bnb-8bit", p)
                if x is not None:
                    parts.append(f"{x:.2f}x bnb-8bit")
            if model == "many-4k":
                one = res.get((f"{opt}/one-82m/{dtype}", p))
                if one is not None:
                    parts.append(f"{r['median_ms'] / one['median_ms']:.2f}x its one-tensor time (goal <= 1.3)")
            lines.append(f"  {case:<24} {p:<22} " + ", ".join(parts))
    for graph in ("", "-graph"):
        t, c = f"fusedopt-triton{graph}", f"fusedopt-cuda{graph}"
        by_kind: dict[str, list[float]] = {}
        for case in cases:
            x = ratio(case, t, c)  # > 1: cuda is faster
            if x is not None:
                by_kind.setdefault(KIND_OF[case.split("/")[0]], []).append(math.log(x))
        for kind, logs in sorted(by_kind.items()):
            g = math.exp(sum(logs) / len(logs))
            faster = "cuda" if g > 1 else "triton"
            lines.append(f"  auto{graph or ''} {kind:<9} {faster} ({max(g, 1 / g):.2f}x, geometric mean of "
                         f"{len(logs)} cases)")
    return ["headlines (ratios of medians within a run):"] + (lines or ["  (no fusedopt GPU results)"])


def _nullable(kind):
    return {"type": [kind, "null"]}


_RESULT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["provider", "status", "reason", "check_error", "check_tolerance", "bytes_per_param",
                 "median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy", "x_floor", "host_ms",
                 "launches", "state_bytes_per_param", "repeats", "input_sets", "notes"],
    "properties": {
        "provider": {"type": "string"},
        "status": {"enum": ["ok", "wrong", "error", "unavailable", "skipped"]},
        "reason": _nullable("string"),
        "check_error": _nullable("number"),
        "check_tolerance": _nullable("number"),
        "bytes_per_param": _nullable("number"),
        "median_ms": _nullable("number"),
        "q20_ms": _nullable("number"),
        "q80_ms": _nullable("number"),
        "gbps": _nullable("number"),
        "pct_copy": _nullable("number"),
        "x_floor": _nullable("number"),
        "host_ms": _nullable("number"),
        "launches": _nullable("integer"),
        "state_bytes_per_param": _nullable("number"),
        "repeats": _nullable("integer"),
        "input_sets": _nullable("integer"),
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    # A timed result has every timing; any other has none and says why.
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {"properties": {k: {"type": "number"} for k in
                            ("check_error", "median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy",
                             "x_floor", "host_ms", "state_bytes_per_param", "bytes_per_param")}
             | {"repeats": {"type": "integer", "minimum": 1}, "input_sets": {"type": "integer", "minimum": 1},
                "reason": {"type": "null"}}},
    "else": {"properties": {k: {"type": "null"} for k in
                            ("median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy", "x_floor", "host_ms",
                             "launches", "state_bytes_per_param", "repeats", "input_sets", "bytes_per_param")}
             | {"reason": {"type": "string"}}},
}

#: JSON Schema (draft 2020-12) of the document ``--json`` writes; bench/README.md explains it.
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fusedopt benchmark run",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "date", "argv", "quick", "environment", "config", "copy", "providers", "cases", "notes"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "date": {"type": "string"},
        "argv": {"type": "array", "items": {"type": "string"}},
        "quick": {"type": "boolean"},
        "environment": {
            "type": "object",
            "additionalProperties": False,
            "required": ["device", "device_name", "gpu", "device_memory_bytes", "driver", "cuda", "cpu_count",
                         "python", "platform", "versions", "commit", "dirty"],
            "properties": {
                "device": {"type": "string"},
                "device_name": {"type": "string"},
                "gpu": {"type": "boolean"},
                "device_memory_bytes": _nullable("integer"),
                "driver": _nullable("string"),
                "cuda": _nullable("string"),
                "cpu_count": _nullable("integer"),
                "python": {"type": "string"},
                "platform": {"type": "string"},
                "versions": {
                    "type": "object",
                    "required": ["torch", "triton", "bitsandbytes", "lion_pytorch", "fusedopt"],
                    "additionalProperties": _nullable("string"),
                },
                "commit": _nullable("string"),
                "dirty": _nullable("boolean"),
            },
        },
        "config": {
            "type": "object",
            "additionalProperties": False,
            "required": ["warmup", "min_repeat", "max_repeat", "time_budget_s", "input_sets", "check_steps",
                         "flush_bytes", "cpu_threads"],
            "properties": {
                "warmup": {"type": "integer", "minimum": 0},
                "min_repeat": {"type": "integer", "minimum": 1},
                "max_repeat": {"type": "integer", "minimum": 1},
                "time_budget_s": {"type": "number", "minimum": 0},
                "input_sets": {"type": "integer", "minimum": 1},
                "check_steps": {"type": "integer", "minimum": 1},
                "flush_bytes": {"type": "integer", "minimum": 0},
                "cpu_threads": {"type": "integer", "minimum": 1},
            },
        },
        "copy": {
            "type": "object",
            "additionalProperties": False,
            "required": ["bytes", "median_ms", "q20_ms", "q80_ms", "gbps"],
            "properties": {k: {"type": "number", "exclusiveMinimum": 0}
                           for k in ("bytes", "median_ms", "q20_ms", "q80_ms", "gbps")},
        },
        "providers": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "description", "optimizers", "reason"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "optimizers": {"type": "array", "items": {"type": "string"}},
                    "reason": _nullable("string"),
                },
            },
        },
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "optimizer", "model", "dtype", "tensors", "params", "bytes_per_param",
                             "floor_ms", "results"],
                "properties": {
                    "name": {"type": "string"},
                    "optimizer": {"enum": list(OPTIMIZERS)},
                    "model": {"enum": list(MODELS)},
                    "dtype": {"enum": list(DTYPES)},
                    "tensors": {"type": "integer", "minimum": 1},
                    "params": {"type": "integer", "minimum": 1},
                    "bytes_per_param": {"type": "number", "exclusiveMinimum": 0},
                    "floor_ms": {"type": "number", "exclusiveMinimum": 0},
                    "results": {"type": "array", "items": _RESULT_SCHEMA},
                },
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


#: The plot's columns: (result field, axis label, log scale).
_PLOT_METRICS = (
    ("gbps", "GB/s (log)", True),
    ("median_ms", "median step time, ms (log)", True),
    ("state_bytes_per_param", "optimizer state, bytes/param", False),
)


def plot(doc: dict, path: str) -> str | None:
    """One row of panels per model and dtype: GB/s (against the copy ceiling), median step time
    and optimizer state bytes per parameter, one group of bars per optimizer. Log axes keep slow
    bars (8-bit states on a CPU) readable next to fast ones, and the state panel shows what
    8-bit buys. fusedopt's reference (the oracle, not a fast path) is hatched. Returns None, or
    why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib, or pip install 'fusedopt[test]'); no plot written"

    panels = list(dict.fromkeys((c["model"], c["dtype"]) for c in doc["cases"]))
    providers = [p["name"] for p in doc["providers"]]
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(providers)}
    ncol, nrow = len(_PLOT_METRICS), max(len(panels), 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 3.2 * nrow), squeeze=False)
    ceiling = doc["copy"]["gbps"]
    for row, (model, dtype) in zip(axes, panels):
        cases = [c for c in doc["cases"] if c["model"] == model and c["dtype"] == dtype]
        ok = {(c["name"], r["provider"]): r for c in cases for r in c["results"] if r["status"] == "ok"}
        shown = [n for n in providers if any((c["name"], n) in ok for c in cases)]
        width = 0.8 / max(len(shown), 1)
        for ax, (field_name, label, log) in zip(row, _PLOT_METRICS):
            for j, name in enumerate(shown):
                xs = [i - 0.4 + (j + 0.5) * width for i, c in enumerate(cases) if (c["name"], name) in ok]
                ys = [ok[c["name"], name][field_name] for c in cases if (c["name"], name) in ok]
                ax.bar(xs, ys, width, color=colors[name], label=provider_label(name),
                       hatch="//" if name == "fusedopt-reference" else None, edgecolor="white", linewidth=0)
            if field_name == "gbps":
                ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
                ax.text(len(cases) - 0.5, ceiling, f"copy {ceiling:.0f} GB/s", ha="right", va="bottom", fontsize=8)
            if log:
                ax.set_yscale("log")
            if field_name == "gbps":  # room above the copy line for its label
                ax.set_ylim(top=2 * max([ceiling] + [r["gbps"] for r in ok.values()]))
            ax.set_xticks(range(len(cases)), [c["optimizer"] for c in cases], fontsize=8)
            ax.set_xlim(-0.5, len(cases) - 0.5)
            ax.set_ylabel(label, fontsize=9)
            ax.set_title(f"{model}, {dtype} params: {label.split(' (')[0].split(',')[0]}", fontsize=10)
            ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    env = doc["environment"]
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, max(len(handles), 1)), fontsize=9)
    fig.suptitle(f"fusedopt bench: {env['device_name']} ({env['device']}), commit "
                 f"{(env['commit'] or 'unknown')[:10]}, {doc['date'][:10]}"
                 f"{' (--quick: a smoke test, not a measurement)' if doc['quick'] else ''}", fontsize=11)
    fig.tight_layout(rect=(0, 0.9 / (3.2 * nrow), 1, 1 - 0.4 / (3.2 * nrow)))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (bench/bench_*.py use this).
# ---------------------------------------------------------------------------------------------


def pytest_params(optimizers) -> list:
    """``pytest.param(case name, provider name)`` for a suite over ``optimizers``; names, so
    that the same ids collect in quick and full mode."""
    import pytest
    return [pytest.param(c.name, p.name, id=f"{c.name}:{p.name}")
            for c in all_cases(quick=True) if c.optimizer.name in optimizers
            for p in PROVIDERS.values() if c.optimizer.name in p.optimizers]


def pytest_benchmark(benchmark, case_name: str, provider_name: str, quick: bool) -> None:
    """Check a provider on a case, then time its step with pytest-benchmark's ``pedantic``
    (input sets rotated, the cache flushed and the device synchronized before each round, the
    device synchronized inside it), and record bandwidth and memory in ``extra_info``. Skips a
    provider that cannot run here; fails one that computes the wrong thing, untimed."""
    import pytest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = default_config(quick, device)
    (case,) = (c for c in all_cases(quick) if c.name == case_name)
    provider = PROVIDERS[provider_name]
    reason = provider.reason(device, quick)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason}")
    err, tol = check(provider, case, device, config.check_steps)
    if not err <= tol:
        known = provider.known_differences.get(case.optimizer.name)
        if known:
            pytest.xfail(f"{provider.name} on {case.name}: relative error {err:.3g} > {tol:.3g}; {known}")
        pytest.fail(f"{provider.name} on {case.name}: update differs from fusedopt's reference "
                    f"(relative error {err:.3g} > {tol:.3g}); not timed")
    sets = max(1, min(config.input_sets, int(0.4 * _free_bytes(device) // max(_set_bytes(case), 1))))
    runners = [provider.make(_make_set(case, device, seed=s), case.optimizer, case.optimizer.hp)
               for s in range(sets)]
    rounds = warm_up(runners, device, config)
    flush = torch.empty(config.flush_bytes, dtype=torch.int8, device=device)
    turn = iter(range(1 << 62))

    def setup():
        flush.zero_()
        _sync(device)
        return (runners[next(turn) % len(runners)],), {}

    def step(runner):
        runner.step()
        _sync(device)

    benchmark.group = case.name
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    moved = case.bytes_per_step(state_bytes=provider.state_bytes(case.dtype),
                                separate_clip=provider.separate_clip and case.optimizer.max_grad_norm is not None)
    benchmark.extra_info.update(
        case=case.name, provider=provider.name, device=str(device), params=case.numel,
        bytes_per_param=moved / case.numel, check_error=err, input_sets=sets,
        state_bytes_per_param=state_bytes(runners[0].optimizer) / case.numel)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fusedopt bench",
        description="Time fusedopt's backends and the peers on optimizer steps; report GB/s against the "
                    "device-to-device copy measured in the same run.")
    ap.add_argument("--quick", action="store_true",
                    help="scaled-down shapes and few repeats: a smoke test, not a measurement (1m10s on 2 "
                         "shared CPU cores at load 3, 2m11s at load 6)")
    ap.add_argument("--cases", nargs="+", metavar="PATTERN",
                    help="optimizer/model/dtype globs, e.g. 'adamw' '*/llama-1b/bf16' (default: all)")
    ap.add_argument("--providers", nargs="+", metavar="PATTERN",
                    help="provider name globs, e.g. 'torch-*' fusedopt-triton (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write the run as JSON (schema in bench/README.md)")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s per provider per case (needs matplotlib)")
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    ap.add_argument("--threads", type=int, default=1, metavar="N",
                    help="torch CPU threads (default 1: on a shared machine a thread pool stalls "
                         "whenever another process takes a core, which made CPU timings vary 100x)")
    ap.add_argument("--list", action="store_true", help="list cases and providers with availability, run nothing")
    ap.add_argument("--schema", action="store_true", help="print the JSON schema of --json's output, run nothing")
    ap.add_argument("--headlines", nargs="+", metavar="JSON",
                    help="print the goal ratios of saved runs (--json files of one device), run nothing")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.schema:
        print(json.dumps(JSON_SCHEMA, indent=2))
        return 0
    if args.headlines:
        try:
            docs = [json.loads(Path(p).read_text()) for p in args.headlines]
        except (OSError, ValueError) as e:
            print(f"fusedopt bench: Invalid --headlines file: {e}", file=sys.stderr)
            return 2
        devices = {d["environment"]["device_name"] for d in docs}
        if len(devices) > 1:
            print(f"fusedopt bench: Invalid --headlines files: runs of different devices {sorted(devices)}",
                  file=sys.stderr)
            return 2
        print("\n".join(headlines(docs)))
        return 0
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"Invalid --device: {args.device!r}; expected cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid --device: {args.device!r}; this machine has no CUDA device")
        if args.threads < 1:
            raise ValueError(f"Invalid --threads: {args.threads}; expected an integer >= 1")
        cases = select_cases(args.cases, args.quick)
        providers = select_providers(args.providers)
    except (ValueError, RuntimeError) as e:
        print(f"fusedopt bench: {e}", file=sys.stderr)
        return 2

    if args.list:
        for c in cases:
            print(f"{c.name:<28} {_count(c.numel):>7} params {len(c.shapes):>6} tensors "
                  f"{c.bytes_per_step() / c.numel:6.2f} B/param")
        for p in providers:
            why = p.reason(device, args.quick)
            print(f"{p.name:<20} {'ok' if why is None else why}")
        return 0

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pairs = sum(1 for c in cases for p in providers if c.optimizer.name in p.optimizers)
    doc = run(cases, providers, device, default_config(args.quick, device), args.quick,
              progress=Progress(pairs, "bench", unit="pair"), argv=["bench", *argv])
    print(format_table(doc))
    print("\n".join(headlines([doc])))
    print(f"ran {pairs} case/provider pairs in {time.perf_counter() - started:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        why = plot(doc, args.plot)
        if why is None:
            print(f"wrote {args.plot}")
        else:
            print(f"fusedopt bench: {why}", file=sys.stderr)
    return 0
