"""The Triton backend: multi-tensor kernels for every family, the global norm and fused
clipping (see :mod:`fusedopt.backends` for the contract).

Each family pass is one launch per batch whatever its tensor count (one pass for the
elementwise families, two for LAMB and LARS; each program reads its tensor's step and the last
to finish a tensor advances it); nothing waits for the device. CUDA tensors run compiled kernels; CPU tensors run
them in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module was
imported (how CI tests them).
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (an ImportError here is the "not importable" reason)

from .. import layout
from ..quant import relayout as _relayout_codes
from . import adagrad as _adagrad
from . import adam as _adam
from . import common
from . import elementwise as _elementwise
from . import lamb as _lamb
from . import lars as _lars
from . import lion as _lion
from . import norm as _norm
from . import quant as _quant
from . import rmsprop as _rmsprop
from . import sgd as _sgd
from .table import unsupported  # noqa: F401  (what backends.resolve asks of a backend)

NAME = "triton"
DESCRIPTION = "Triton multi-tensor kernels: one launch per param group and pass, no host sync (CUDA)"

INTERPRET = common.INTERPRET


def available(device: torch.device) -> str | None:
    """None when the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if INTERPRET:
        if device.type == "cpu":
            return None
        return (
            "TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, which reaches only CPU "
            f"memory through the launch tables; unset it to run on {device}"
        )
    if device.type == "cpu":
        return "the Triton kernels run on CUDA devices; CPU tensors need TRITON_INTERPRET=1 set before fusedopt.kernels is imported"
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"Triton needs compute capability 7.0 or newer; {device} has {major}.{minor}"
    return None


def unsupported_step(kind: str, *, block_size: int | None = None, norm_type: float | None = None) -> str | None:
    """Why the kernels cannot run a step of ``kind`` with these requirements, or None (see
    :mod:`fusedopt.backends`): 8-bit blocks up to ``quant.MAX_BLOCK`` (4096) elements (every
    ``*8bit`` kind, the two-pass ``lamb8bit`` and ``lars8bit`` too), and the 1-, 2- and inf-norms."""
    if block_size is not None and kind.endswith("8bit"):
        reason = _quant.unsupported_block(block_size)
        if reason is not None:
            return reason
    if norm_type is not None:
        return _norm.unsupported_order(norm_type)
    return None


def _on_device(fn):
    def run(batch):
        device = batch.params[0].device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return _flat(fn, batch)
        return _flat(fn, batch)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _flat(fn, batch) -> None:
    """``fn`` on ``batch`` with every tensor of a param flat memory in the param's layout
    (gathered copies where one is not, scattered back after the launch: fusedopt.layout)."""
    gathered = layout.gather(batch, _relayout_codes)
    fn(gathered.batch)
    gathered.scatter()


@_on_device
def adam(batch) -> None:
    """Adam / AdamW over one batch (32-bit or 8-bit states)."""
    _elementwise.step(batch, _adam.ADAM)


@_on_device
def lamb(batch) -> None:
    """LAMB over one batch (32-bit or 8-bit states): moments, trust ratios, apply."""
    _lamb.step(batch)


@_on_device
def lars(batch) -> None:
    """LARS over one batch (32-bit or 8-bit momentum): momentum, clip scales, apply."""
    _lars.step(batch)


@_on_device
def lion(batch) -> None:
    """Lion over one batch (32-bit or 8-bit state)."""
    _elementwise.step(batch, _lion.LION)


@_on_device
def sgd(batch) -> None:
    """SGD over one batch (32-bit or 8-bit momentum buffer, or none)."""
    _elementwise.step(batch, _sgd.SGD)


@_on_device
def adagrad(batch) -> None:
    """Adagrad over one batch (32-bit or 8-bit sum)."""
    _elementwise.step(batch, _adagrad.ADAGRAD)


@_on_device
def rmsprop(batch) -> None:
    """RMSprop over one batch (32-bit or 8-bit states)."""
    _elementwise.step(batch, _rmsprop.RMSPROP)


#: The step of each family (``fusedopt.backends``).
STEPS = {"adam": adam, "lamb": lamb, "lion": lion, "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "lars": lars}


def global_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` (0-d fp32 on their device): a deterministic
    two-pass reduction for 1, 2 and inf; other orders raise (``unsupported_step`` says so
    first, so that ``fusedopt.backends`` resolves them elsewhere)."""
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    device = tensors[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return _norm.global_norm(tensors, norm_type)
    return _norm.global_norm(tensors, norm_type)
