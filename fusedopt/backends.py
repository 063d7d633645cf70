"""Backend selection: the one place that decides which implementation runs a step.

A backend is a module with ``NAME``, ``DESCRIPTION``, ``available(device) -> str | None``
(None when it can run on that device, else the reason it cannot), ``STEPS``, its step function
for each family it runs (``STEPS["sgd"](batch)``; the family names of :mod:`fusedopt.families`;
a backend without an entry cannot run that family), and ``global_norm`` (see
:mod:`fusedopt.reference`). The three are imported below by name, each on first use
(:data:`LOADERS`). A backend may also define (a backend that does not takes everything):

* ``unsupported(tensor) -> str | None``: why it cannot take this param or grad (its dtype,
  its device), or None;
* ``unsupported_step(kind, *, block_size=None, norm_type=None) -> str | None``: why it cannot
  run a step of ``kind`` (one of :data:`KINDS`) with these requirements, or None. A
  requirement left None is not asked about. ``block_size`` is the quantization block size of
  an 8-bit kind; ``norm_type`` the order of the global norm the step computes (the ``"norm"``
  kind of :func:`fusedopt.clip_grad_norm_`, or ``2.0`` for a family step that clips with
  ``max_grad_norm``).

Whether a backend can run a step is decided here, in :func:`resolve`, before the step
changes anything; a backend's functions never hand a step to another backend (reached with a
step they cannot run, they raise). ``"auto"`` (or the ``FUSEDOPT_BACKEND`` environment
variable, which overrides it) takes, for the kind of step at hand, the first backend of
:data:`AUTO_ORDER` that runs on the device and supports the step's tensors and requirements
(an 8-bit step with ``block_size`` over the Triton kernels' 4096 gets the next one, say);
CPU tensors always get the reference. An explicitly requested backend that cannot run the
step raises ``RuntimeError`` naming the backend and the reason.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Callable

import torch

from . import families

NAMES = ("auto", "triton", "cuda", "reference")


# Each concrete backend, imported on first use so that importing fusedopt never pulls in Triton
# or compiles anything. (The import statements are the edges a reader follows from here.)
def _reference() -> ModuleType:
    from . import reference

    return reference


def _triton() -> ModuleType:
    from .kernels import backend

    return backend


def _cuda() -> ModuleType:
    from . import cuda_backend

    return cuda_backend


#: The loader of each concrete backend (a test may register a stand-in here).
LOADERS: dict[str, Callable[[], ModuleType]] = {"reference": _reference, "triton": _triton, "cuda": _cuda}

#: What ``auto`` picks on CUDA devices, per kind of step, fastest first. The kinds: the
#: families (``fusedopt.families``) with 32-bit and with 8-bit states, and the global norm of
#: clipping.
KINDS = families.kinds() + ("norm",)

#: Measured: nothing yet. No GPU has run the benchmark, so every kind prefers Triton (the cuda
#: backend, which may need minutes to compile on first use, is only used when asked for).
#: Fill this from ``python -m fusedopt bench`` on a GPU (the ``fusedopt-triton`` and
#: ``fusedopt-cuda`` rows of the same run) and name the committed result it came from.
AUTO_ORDER: dict[str, tuple[str, ...]] = {kind: ("triton", "reference") for kind in KINDS}


def check_name(backend: object, argument: str = "backend") -> str:
    """Validate a backend name (``ValueError`` naming the argument and the value)."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"Invalid {argument}: {backend!r}; expected one of {', '.join(map(repr, NAMES))}")
    return backend


def load(name: str) -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` for a backend that imports, else ``(None, reason)``."""
    try:
        return LOADERS[name](), None
    except ImportError as e:
        return None, f"not importable: {e}"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not."""
    return _reason(name, torch.device(device), ())


def requested(backend: str) -> str:
    """The backend a user asked for, with ``FUSEDOPT_BACKEND`` applied to ``"auto"``."""
    if backend == "auto":
        env = os.environ.get("FUSEDOPT_BACKEND", "").strip()
        if env:
            return check_name(env, "FUSEDOPT_BACKEND")
    return backend


def _reason(name: str, device: torch.device, tensors) -> str | None:
    module, reason = load(name)
    if module is None:
        return reason
    reason = module.available(device)
    if reason is None and hasattr(module, "unsupported"):
        reason = next((r for r in map(module.unsupported, tensors) if r is not None), None)
    return reason


def _step_reason(name: str, kind: str, requirements: dict) -> str | None:
    module = load(name)[0]
    family = kind.removesuffix("8bit")
    if kind != "norm" and family not in module.STEPS:
        return f"it has no {families.FAMILIES[family].name} step"
    if not hasattr(module, "unsupported_step"):
        return None
    return module.unsupported_step(kind, **requirements)


def resolve(backend: str, device: torch.device, tensors=(), kind: str = "adam", *,
            block_size: int | None = None, norm_type: float | None = None) -> ModuleType:
    """The backend module to run ``tensors`` (all on ``device``) with, for a step of ``kind``
    (one of :data:`KINDS`) that needs ``block_size`` (the 8-bit block size, 8-bit kinds) and
    ``norm_type`` (the order of the global norm it computes); None asks nothing about it.

    ``"auto"`` takes the first of ``AUTO_ORDER[kind]`` that runs on the device, supports every
    tensor (``unsupported``) and the step (``unsupported_step``), the reference on CPU. A
    backend named explicitly that cannot run the step raises ``RuntimeError`` with the reason.
    """
    name = requested(backend)
    device = torch.device(device)
    tensors = list(tensors)
    if kind not in AUTO_ORDER:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    requirements = dict(block_size=block_size, norm_type=None if norm_type is None else float(norm_type))
    if name == "auto":
        candidates = ("reference",) if device.type == "cpu" else AUTO_ORDER[kind]
    else:
        candidates = (name,)
    reasons = []
    for n in candidates:
        reason = _reason(n, device, tensors)
        if reason is not None:
            reasons.append(f"backend {n!r} cannot run on {device} tensors: {reason}")
            continue
        reason = _step_reason(n, kind, requirements)
        if reason is not None:
            reasons.append(f"backend {n!r} cannot run this {kind} step: {reason}")
            continue
        return load(n)[0]
    raise RuntimeError("; ".join(reasons))
