"""The registry of providers: who runs a benchmark step, and the check that it computes the
right thing.

:data:`PROVIDERS`: torch's for-loop, foreach, fused and compiled steps, bitsandbytes,
lion-pytorch and fusedopt's backends. One that cannot run here gives the reason
(``Provider.reason``), and is listed, never dropped; one that cannot run a case (a peer
without that form, a backend without the family's kernels) says why for that case
(``Provider.unsupported``). Which cases a peer implements is read from the peer: torch's class
of the fusedopt class's name and the flags its signature takes (``fused``, ``foreach``),
bitsandbytes' class of the same name. :func:`check` compares a provider's
update with fusedopt's reference on small random data before anything is timed.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import backends
from .cases import OPTIMIZERS, Case, OptSpec, Shapes


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
        unsupported: ``unsupported(spec, device) -> str | None``: why it cannot run this
            optimizer configuration (a peer without centered RMSprop, a backend without the
            family's kernels yet), asked once ``reason`` is None; the case is reported
            ``unavailable`` with it.
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
    unsupported: Callable[[OptSpec, torch.device], str | None] = lambda spec, device: None
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


def torch_class(spec: OptSpec) -> type | None:
    """torch.optim's class of the same name as the case's fusedopt class (fusedopt's 32-bit
    classes are drop-ins for torch's: AdamW, SGD, Adagrad, RMSprop), or None."""
    if spec.quantized:
        return None
    cls = getattr(torch.optim, spec.fusedopt_class, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _torch_takes(*flags: str) -> tuple[str, ...]:
    """The :data:`OPTIMIZERS` whose torch class takes every one of ``flags`` (``fused``: torch
    has a fused kernel for it)."""
    return tuple(o.name for o in OPTIMIZERS.values()
                 if (cls := torch_class(o)) is not None and all(f in inspect.signature(cls).parameters for f in flags))


def _torch_names(optimizers) -> str:
    return ", ".join(dict.fromkeys(OPTIMIZERS[o].fusedopt_class for o in optimizers))


def _torch_step(**flags):
    def make(params, spec, hp):
        opt = torch_class(spec)(params, **hp, **flags)
        return Runner(opt, _clip_then(params, spec.max_grad_norm, flags.get("foreach", True), opt.step))
    return make


def _torch_compile_make(params, spec, hp):
    cls = torch_class(spec)
    if cls is None:  # Lion: lion-pytorch's torch for-loop
        import lion_pytorch
        opt = lion_pytorch.Lion(params, **hp)
    else:
        opt = cls(params, **hp, foreach=True)
    step = _clip_then(params, spec.max_grad_norm, True, opt.step)
    # As in torch's "compiling the optimizer" recipe: the whole step in one compiled function.
    return Runner(opt, torch.compile(step, fullgraph=False))


def _torch_compile_reason(device, quick):
    if quick:
        return Skip("not run under --quick: compiling a step takes tens of seconds per case")
    return None


#: bitsandbytes.optim's classes (0.50), named as fusedopt's: the peer of a case is the class of
#: the same name.
_BNB_CLASSES = ("AdamW", "LAMB", "Lion", "SGD", "Adagrad", "RMSprop", "LARS",
                "AdamW8bit", "Lion8bit", "LAMB8bit", "SGD8bit", "Adagrad8bit", "RMSprop8bit", "LARS8bit")


def _bnb_optimizers(quantized: bool) -> tuple[str, ...]:
    return tuple(o.name for o in OPTIMIZERS.values() if o.quantized == quantized and o.fusedopt_class in _BNB_CLASSES)


def _bnb_new(params, spec, hp):
    import bitsandbytes as bnb
    cls = getattr(bnb.optim, spec.fusedopt_class)
    if spec.quantized:
        return cls(params, **hp, min_8bit_size=spec.min_8bit_size)
    return cls(params, **hp, optim_bits=32)


def _bnb_make(params, spec, hp):
    opt = _bnb_new(params, spec, hp)
    return Runner(opt, _clip_then(params, spec.max_grad_norm, True, opt.step))


def _bnb_unsupported(spec, device):
    """What bitsandbytes' constructor refuses (SGD and LARS without momentum, centered RMSprop)."""
    try:
        _bnb_new([torch.zeros(1, requires_grad=True)], spec, spec.hp)
    except (NotImplementedError, ValueError) as e:
        return f"bitsandbytes' {spec.fusedopt_class} refuses these hyper-parameters ({type(e).__name__}: {e})"
    return None


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


def _fusedopt_unsupported(backend):
    def unsupported(spec, device):
        # What backends.resolve says before a step of this kind (its kernels, its block size)
        try:
            backends.resolve(backend, device, (), spec.kind, block_size=spec.block_size if spec.quantized else None,
                             norm_type=None if spec.max_grad_norm is None else 2.0)
        except RuntimeError as e:
            return str(e)
        return None
    return unsupported


_ALL = tuple(OPTIMIZERS)
_FORLOOP = _torch_takes("foreach")
_FUSED = _torch_takes("fused")
_FUSED_GRAPH = _torch_takes("fused", "capturable")
_ADAMS = tuple(o for o in OPTIMIZERS if OPTIMIZERS[o].fusedopt_class == "AdamW")
_BNB_KNOWN = {"lamb": "bitsandbytes' LAMB is Adam with the update scaled down only when its norm exceeds "
                      "max_unorm * ||p||, not the trust ratio"}

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("torch-forloop", f"torch.optim {_torch_names(_FORLOOP)}(foreach=False): a few kernels per tensor",
                 _FORLOOP, _torch_step(foreach=False), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-foreach", f"torch.optim {_torch_names(_FORLOOP)}(foreach=True): multi-tensor ops",
                 _FORLOOP, _torch_step(foreach=True), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-fused", f"torch.optim {_torch_names(_FUSED)}(fused=True): torch's fused kernels",
                 _FUSED, _torch_step(fused=True), state_in_param_dtype=True, separate_clip=True),
        Provider("torch-fused-graph", f"torch.optim {_torch_names(_FUSED_GRAPH)}(fused=True, capturable=True) "
                 "replayed from a CUDA graph",
                 _FUSED_GRAPH, _graphed(_torch_step(fused=True, capturable=True)), _needs_cuda("CUDA-graph replay"),
                 state_in_param_dtype=True, separate_clip=True),
        Provider("torch-compile", "torch.compile of the torch step (AdamW foreach; Lion: lion-pytorch's)",
                 _ADAMS + ("lion",), _torch_compile_make, _torch_compile_reason,
                 state_in_param_dtype=True, separate_clip=True),
        Provider("bnb-32bit", f"bitsandbytes {_torch_names(_bnb_optimizers(False))}, optim_bits=32",
                 _bnb_optimizers(False), _bnb_make, lambda d, q: _module_reason("bitsandbytes"),
                 _bnb_unsupported, separate_clip=True,
                 known_differences={**_BNB_KNOWN,
                                    "sgd-nesterov": "bitsandbytes' SGD takes nesterov and steps plain momentum "
                                                    "(measured on CPU, bitsandbytes 0.50.2)"}),
        Provider("bnb-8bit", f"bitsandbytes {_torch_names(_bnb_optimizers(True))} (block-wise)",
                 _bnb_optimizers(True), _bnb_make, lambda d, q: _module_reason("bitsandbytes"), _bnb_unsupported,
                 known_differences={"lamb8bit": _BNB_KNOWN["lamb"],
                                    "lars8bit": "bitsandbytes' LARS8bit did not apply max_unorm on CPU "
                                                "(bitsandbytes 0.50.2: its update was as large as SGD8bit's)"}),
        Provider("lion-pytorch", "lion_pytorch.Lion: a torch for-loop",
                 ("lion",), _lion_pytorch_make(False), lambda d, q: _module_reason("lion_pytorch"),
                 state_in_param_dtype=True),
        Provider("lion-pytorch-triton", "lion_pytorch.Lion(use_triton=True): one Triton kernel per tensor",
                 ("lion",), _lion_pytorch_make(True),
                 _all(lambda d, q: _module_reason("lion_pytorch"), _needs_cuda("its Triton kernel")),
                 state_in_param_dtype=True),
        Provider("fusedopt-reference", "fusedopt backend='reference': torch ops, the specification",
                 _ALL, _fusedopt_make("reference"), _fusedopt_reason("reference"), _fusedopt_unsupported("reference")),
        Provider("fusedopt-triton", "fusedopt backend='triton'",
                 _ALL, _fusedopt_make("triton"), _fusedopt_reason("triton"), _fusedopt_unsupported("triton")),
        Provider("fusedopt-cuda", "fusedopt backend='cuda'",
                 _ALL, _fusedopt_make("cuda"), _fusedopt_reason("cuda"), _fusedopt_unsupported("cuda")),
        Provider("fusedopt-triton-graph", "fusedopt backend='triton' replayed from a CUDA graph (no host time)",
                 _ALL, _graphed(_fusedopt_make("triton")),
                 _all(_needs_cuda("CUDA-graph replay"), _fusedopt_reason("triton")), _fusedopt_unsupported("triton")),
        Provider("fusedopt-cuda-graph", "fusedopt backend='cuda' replayed from a CUDA graph (no host time)",
                 _ALL, _graphed(_fusedopt_make("cuda")),
                 _all(_needs_cuda("CUDA-graph replay"), _fusedopt_reason("cuda")), _fusedopt_unsupported("cuda")),
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
