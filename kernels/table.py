"""What the Triton launchers pass besides the launch table (:mod:`fusedopt.launch_table`, the
layout both device backends share): the 32-bit chunk size, the runtime hyper-parameters, the
per-step derivation's arguments, the stochastic-rounding integers of a batch, dtypes."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference

#: Elements per work item of the 32-bit kernels (a multiple of every BLOCK they loop with).
CHUNK = 16384


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------


def hyper_args(values: Sequence, device: torch.device):
    """Runtime hyper-parameters for a kernel: ``(floats, in_memory, tensor)``.

    Python numbers are passed as kernel arguments (a new value never recompiles anything).
    When any value is a tensor on the device (a learning rate a scheduler updates in place,
    for instance), every value goes into one fp32 device tensor the kernel reads instead,
    built with device ops only: no host sync, and a captured CUDA graph follows the tensor.
    """
    if not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values], False, None
    parts = [
        v.to(device=device, dtype=torch.float32).reshape(()) if isinstance(v, torch.Tensor)
        else torch.full((), float(v), dtype=torch.float32, device=device)
        for v in values
    ]
    return [0.0] * len(values), True, torch.stack(parts)


def group_value(value, device: torch.device):
    """A group hyper-parameter as the reference computes with it: a Python number stays one
    (exact double arithmetic on the host, rounded to fp32 once), a device tensor stays on the
    device (fp32 tensor arithmetic), a CPU tensor becomes a number (reading it does not sync)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and device.type != "cpu":
            return float(value)
        return value.to(device=device, dtype=torch.float32).reshape(())
    return value


# ---------------------------------------------------------------------------------------------
# Per-batch launch helpers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(tensor: torch.Tensor) -> str | None:
    """Why the kernels cannot take ``tensor`` (a param or a grad), or None. Any layout runs:
    dense tensors as flat memory, others through gathered copies (:mod:`fusedopt.layout`)."""
    if tensor.dtype not in _DTYPES:
        return f"the kernels compute in fp32 and take float32, bfloat16 and float16 tensors, not {tensor.dtype}"
    return None


_TL_DTYPES = {}


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch dtype the kernels take."""
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TL_DTYPES[dtype]


def stochastic(batch) -> bool:
    """Whether params of this batch are stored with stochastic rounding (bf16 params only:
    wider params are stored exactly); the reference decides."""
    return reference.stochastic(batch)


def seed(group) -> int:
    """The group's stochastic-rounding seed (``group["seed"]``, default 0)."""
    return int(group.get("seed", 0)) & 0xFFFFFFFF


def rounding(batch) -> list[tuple[int, int]]:
    """Each tensor's ``(salt, offset)``: the param's position in its group and the index of the
    tensor's first element in the full param (``batch.offsets``; 0 unless it is a shard). With
    the seed, the step and the element's index in the tensor, what makes its rounding noise
    (the same in every backend)."""
    offsets = batch.offsets or [0] * len(batch.positions)
    return list(zip(batch.positions, offsets))


def hyper_struct(values):
    """A family's runtime hyper-parameters for the kernels: ``(struct, in_memory)``.

    ``values`` is the family's struct (a namedtuple) of group values (:func:`group_value`).
    Python numbers become float kernel arguments (a new value never recompiles anything); a
    device tensor (a learning rate a scheduler updates in place, or what is derived from one)
    stays a tensor, which the kernel reads through its pointer: no host sync, and a captured
    CUDA graph follows it. ``in_memory[i]`` says which (``common.hypers``)."""
    tensors = tuple(isinstance(v, torch.Tensor) for v in values)
    return type(values)(*(v if t else float(v) for v, t in zip(values, tensors))), tensors


class LogOf:
    """A device-tensor beta whose ``log`` the kernels take in fp64 (see :func:`log_of`)."""

    __slots__ = ("beta",)

    def __init__(self, beta: torch.Tensor):
        self.beta = beta


def log_of(beta):
    """A step-struct field holding ``log(beta)`` in fp64 (``reference.log_beta``): of a Python
    number on the host, of a device tensor (:func:`group_value`) in the kernels."""
    return LogOf(beta) if isinstance(beta, torch.Tensor) else reference.log_beta(beta)


def step_args(values, scalars: torch.Tensor):
    """The per-step derivation's arguments for a family's step struct ``values`` (a namedtuple
    of at most three fields: Python numbers, device tensors, :func:`log_of` markers; None: no
    derivation): ``(pointers, numbers, modes)``, see ``common.step_hypers``. Numbers pass in
    float64."""
    if not values:  # none (an empty tuple is no kernel argument: the scalars stand in, never read)
        return (scalars,), (0.0, 0.0, 0.0), ()
    if len(values) > 3:
        raise ValueError(f"the per-step derivation takes at most 3 hyper-parameters, not {len(values)}: {values}")
    pointers, numbers, modes = [], [0.0, 0.0, 0.0], []
    for i, v in enumerate(values):
        if isinstance(v, LogOf):
            pointers.append(v.beta)
            modes.append(2)
        elif isinstance(v, torch.Tensor):
            pointers.append(v)
            modes.append(1)
        else:
            pointers.append(scalars)  # never read
            numbers[i] = float(v)
            modes.append(0)
    return tuple(pointers), tuple(numbers), tuple(modes)
