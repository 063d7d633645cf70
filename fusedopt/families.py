"""The optimizer families, each declared once: what every layer reads.

A :class:`Family` says what an optimizer keeps and takes, and nothing about how a backend runs
it: its state tensors under torch's keys (with the codebook each uses in 8 bits, and when a
group keeps it), its shape (every element on its own, or a per-tensor reduction before the
update), its hyper-parameters by name with their checks (in torch's words where torch has
them), the switches that change the code path, and the per-step scalars it derives from the
hyper-parameters and the step count. The optimizer base class validates groups, creates and
converts states and names the backend step from it; the reference backend derives its
per-step scalars with :meth:`Family.derive`; ``check``, ``bench`` and the test grids list the
families from :data:`FAMILIES`. Each backend writes the math once, in its own language, and
lists its step under the family's name in its ``STEPS`` (``reference.STEPS["sgd"]``, the same
in ``kernels.backend`` and ``cuda_backend``).

This module depends on nothing of fusedopt (``quant`` and ``reference`` read it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

#: Shapes of a family's step.
ELEMENTWISE = "elementwise"  # each element from its own param, grad and states: one pass
TENSOR_NORM = "tensor_norm"  # a per-tensor reduction (||p||, ||u||) then the update: two passes
FACTORED = "factored"  # row and column statistics of a matrix (Adafactor); none yet


# ---------------------------------------------------------------------------------------------
# Checks, in torch.optim's words where torch has them.
# ---------------------------------------------------------------------------------------------


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def scalar(name: str, value) -> float:
    """A hyper-parameter as a float: a Python number, or a 1-element floating-point tensor
    (``TypeError`` / ``ValueError`` naming ``name`` otherwise)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"Tensor {name} must be a 1-element floating-point tensor, got {value!r}")
        return float(value)
    if not is_number(value):
        raise TypeError(f"Invalid {name}: {value!r}; expected a number")
    return float(value)


def at_least_zero(message: str) -> Callable[[str, object], None]:
    """A check that the value is a number ``>= 0``, raising ``ValueError(message.format(value))``."""

    def check(name: str, value) -> None:
        if not 0.0 <= scalar(name, value):
            raise ValueError(message.format(value))

    return check


def any_number(name: str, value) -> None:
    scalar(name, value)


def unit_interval(message: str) -> Callable[[str, object], None]:
    """A check that the value lies in ``[0, 1)``."""

    def check(name: str, value) -> None:
        if not 0.0 <= scalar(name, value) < 1.0:
            raise ValueError(message.format(value))

    return check


def check_betas(name: str, betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not 0.0 <= scalar(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r}; expected True or False")


check_lr = at_least_zero("Invalid learning rate: {}")
check_eps = at_least_zero("Invalid epsilon value: {}")
check_weight_decay = at_least_zero("Invalid weight_decay value: {}")
check_momentum = at_least_zero("Invalid momentum value: {}")


def _check_nesterov(group: dict) -> None:
    """torch.optim.SGD's rule (and bitsandbytes' LARS's)."""
    if group["nesterov"] and (scalar("momentum", group["momentum"]) <= 0
                              or scalar("dampening", group["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


# ---------------------------------------------------------------------------------------------
# Bias corrections, in float64 (what Adam and LAMB derive per step).
# ---------------------------------------------------------------------------------------------


def log_beta(beta):
    """``log(beta)`` in float64: of a Python number on the host (``-inf`` for 0), of a tensor
    (whatever its dtype) on its device. What :func:`one_minus_power` starts from; the kernels
    take the same value (a float64 kernel argument, or computed on the device from a tensor)."""
    if isinstance(beta, torch.Tensor):
        return torch.log(beta.to(torch.float64))
    return math.log(beta) if beta > 0 else -math.inf


def one_minus_power(beta, t: torch.Tensor) -> torch.Tensor:
    """``1 - beta^t`` as ``-expm1(t * log(beta))``, a float64 tensor.

    ``beta`` is a Python number (exact double, as torch.optim's for-loop computes ``beta ** t``
    on the host) or a tensor; ``t`` a float64 step count on the device. ``1 - beta ** t`` in
    fp32 cancels: fp32(0.99999) is off from 0.99999 by 1.4e-5 of ``1 - beta``, so the first
    update was 6.8e-4 too large relative to float64 math; here the result is within an ulp of
    float64 (no host sync: the step count never leaves the device). What is derived from it
    (Adam's step size and square root, LAMB's divisors) is rounded once to the compute dtype."""
    return -torch.expm1(t * log_beta(beta))


def _float64(value):
    return value.to(torch.float64) if isinstance(value, torch.Tensor) else value


def _adam_derive(h: dict, t: torch.Tensor, dtype: torch.dtype) -> dict:
    # lr / (1 - beta1^t) and sqrt(1 - beta2^t) in float64, each rounded once, as torch's for-loop
    # takes them (in double on the host)
    return dict(step_size=(_float64(h["lr"]) / one_minus_power(h["beta1"], t)).to(dtype),
                bias_correction2_sqrt=torch.sqrt(one_minus_power(h["beta2"], t)).to(dtype))


def _lamb_derive(h: dict, t: torch.Tensor, dtype: torch.dtype) -> dict:
    return dict(bias_correction1=one_minus_power(h["beta1"], t).to(dtype),
                bias_correction2=one_minus_power(h["beta2"], t).to(dtype))


def _first_step(h: dict, t: torch.Tensor, dtype: torch.dtype) -> dict:
    # torch's SGD makes the momentum buffer a copy of the first step's gradient
    return dict(first=t == 1)


def _adagrad_derive(h: dict, t: torch.Tensor, dtype: torch.dtype) -> dict:
    # torch: clr = lr / (1 + (step - 1) * lr_decay), in double on the host, rounded once
    return dict(clr=(_float64(h["lr"]) / (1 + (t - 1) * _float64(h["lr_decay"]))).to(dtype))


def _no_derive(h: dict, t: torch.Tensor, dtype: torch.dtype) -> dict:
    return {}


# ---------------------------------------------------------------------------------------------
# The declaration.
# ---------------------------------------------------------------------------------------------


def _always(group: dict) -> bool:
    return True


@dataclass(frozen=True)
class State:
    """One state tensor of a family, shaped as its param.

    Attributes:
        name: torch's key (``exp_avg``, ``momentum_buffer``, ...).
        signed: the 8-bit codebook it uses: the signed dynamic map for values of either sign
            (moments, momentum buffers), the unsigned one (twice as fine) for squares.
        kept: whether a group keeps it (``amsgrad``'s ``max_exp_avg_sq``, a momentum buffer
            only with ``momentum != 0``).
        init: the group key of its initial value (Adagrad's ``initial_accumulator_value``);
            None: zeros.
    """

    name: str
    signed: bool
    kept: Callable[[dict], bool] = _always
    init: str | None = None


@dataclass(frozen=True)
class Hyper:
    """A runtime hyper-parameter: a group key and its check (``check(name, value)``)."""

    name: str
    check: Callable[[str, object], None]


@dataclass(frozen=True)
class Family:
    """An optimizer family (see the module docstring).

    Attributes:
        name: the backends' function for its step (``reference.adam``, ...) and the stem of its
            kinds of step (``"adam"``, ``"adam8bit"``: see ``fusedopt.backends.KINDS``).
        shape: :data:`ELEMENTWISE`, :data:`TENSOR_NORM` or :data:`FACTORED`.
        states: its state tensors, in the order the backends take them.
        hypers: its runtime hyper-parameters (a new value never recompiles a kernel). ``betas``
            reaches the math as ``beta1`` and ``beta2`` (:meth:`values`).
        flags: group switches that change the code path (compile-time constants of a kernel).
        checks: cross-argument checks of a group (after each value is checked).
        derive: ``derive(values, t, dtype) -> dict``: the per-step scalars of a tensor at step
            ``t`` (a float64 tensor), in float64 and rounded once to ``dtype``, named as the
            math uses them (Adam's ``step_size``, Adagrad's ``clr``, SGD's ``first``).
        eager_state: states are made at construction for every param (torch's Adagrad).
        stepless: torch keeps no ``step`` for it (SGD, LARS): a state dict without one loads
            as past its first step (fusedopt keeps ``step`` for every family).
    """

    name: str
    shape: str
    states: tuple[State, ...]
    hypers: tuple[Hyper, ...]
    flags: tuple[str, ...] = ()
    checks: tuple[Callable[[dict], None], ...] = ()
    derive: Callable[[dict, torch.Tensor, torch.dtype], dict] = _no_derive
    eager_state: bool = False
    stepless: bool = False
    paper: str = ""

    def state_names(self, group: dict) -> tuple[str, ...]:
        """The states a group keeps, in the backends' order."""
        return tuple(s.name for s in self.states if s.kept(group))

    def state(self, name: str) -> State:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no state {name!r}; its states: {[s.name for s in self.states]}")

    def kind(self, quantized: bool) -> str:
        """The kind of step (``fusedopt.backends.KINDS``) of this family with 32 or 8-bit states."""
        return self.name + ("8bit" if quantized else "")

    def check_group(self, group: dict) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the first bad hyper-parameter or flag."""
        for h in self.hypers:
            h.check(h.name, group[h.name])
        for flag in self.flags:
            check_flag(flag, group[flag])
        for check in self.checks:
            check(group)

    def values(self, group: dict, convert: Callable = lambda v: v) -> dict:
        """The group's hyper-parameters by name, each through ``convert``; ``betas`` as
        ``beta1``, ``beta2``."""
        out = {}
        for h in self.hypers:
            value = group[h.name]
            if h.name == "betas":
                out["beta1"], out["beta2"] = (convert(b) for b in value)
            else:
                out[h.name] = convert(value)
        return out


_LR = Hyper("lr", check_lr)
_BETAS = Hyper("betas", check_betas)
_EPS = Hyper("eps", check_eps)
_WD = Hyper("weight_decay", check_weight_decay)
_MOMENTUM = Hyper("momentum", check_momentum)


def _momentum(group: dict) -> bool:
    return group["momentum"] != 0


ADAM = Family(
    "adam", ELEMENTWISE,
    states=(State("exp_avg", True), State("exp_avg_sq", False),
            State("max_exp_avg_sq", False, kept=lambda g: g["amsgrad"])),
    hypers=(_LR, _BETAS, _EPS, _WD),
    flags=("amsgrad", "maximize", "decoupled_weight_decay"),
    derive=_adam_derive,
    paper="Kingma & Ba, ICLR 2015; Loshchilov & Hutter, ICLR 2019",
)

LAMB = Family(
    "lamb", TENSOR_NORM,
    states=(State("exp_avg", True), State("exp_avg_sq", False)),
    hypers=(_LR, _BETAS, _EPS, _WD),
    flags=("bias_correction",),
    derive=_lamb_derive,
    paper="You et al., ICLR 2020",
)

LION = Family(
    "lion", ELEMENTWISE,
    states=(State("exp_avg", True),),
    hypers=(_LR, _BETAS, _WD),
    paper="Chen et al., NeurIPS 2023",
)

SGD = Family(
    "sgd", ELEMENTWISE,
    states=(State("momentum_buffer", True, kept=_momentum),),
    hypers=(_LR, _MOMENTUM, Hyper("dampening", any_number), _WD),
    flags=("nesterov", "maximize"),
    checks=(_check_nesterov,),
    derive=_first_step,
    stepless=True,
    paper="Sutskever et al., ICML 2013 (momentum and Nesterov as torch.optim.SGD)",
)

ADAGRAD = Family(
    "adagrad", ELEMENTWISE,
    states=(State("sum", False, init="initial_accumulator_value"),),
    hypers=(_LR, Hyper("lr_decay", at_least_zero("Invalid lr_decay value: {}")), _WD,
            Hyper("initial_accumulator_value", at_least_zero("Invalid initial_accumulator_value value: {}")),
            _EPS),
    flags=("maximize",),
    derive=_adagrad_derive,
    eager_state=True,
    paper="Duchi et al., JMLR 2011",
)

RMSPROP = Family(
    "rmsprop", ELEMENTWISE,
    states=(State("square_avg", False), State("momentum_buffer", True, kept=lambda g: g["momentum"] > 0),
            State("grad_avg", True, kept=lambda g: g["centered"])),
    hypers=(_LR, Hyper("alpha", at_least_zero("Invalid alpha value: {}")), _EPS, _WD, _MOMENTUM),
    flags=("centered", "maximize"),
    paper="Hinton, Coursera lecture 6e, 2012 (as torch.optim.RMSprop)",
)

LARS = Family(
    "lars", TENSOR_NORM,
    states=(State("momentum_buffer", True, kept=_momentum),),
    hypers=(_LR, _MOMENTUM, Hyper("dampening", any_number), _WD,
            Hyper("max_unorm", at_least_zero("Invalid max_unorm value: {}"))),
    flags=("nesterov",),
    checks=(_check_nesterov,),
    derive=_first_step,
    stepless=True,
    paper="You et al., 2017 (as bitsandbytes' PytorchLARS)",
)

#: Every family, by name.
FAMILIES: dict[str, Family] = {f.name: f for f in (ADAM, LAMB, LION, SGD, ADAGRAD, RMSPROP, LARS)}

#: Each state name's codebook (a name means the same state in every family that keeps it).
_SIGNED: dict[str, bool] = {}
for _family in FAMILIES.values():
    for _state in _family.states:
        if _SIGNED.setdefault(_state.name, _state.signed) != _state.signed:  # pragma: no cover - a declaration error
            raise RuntimeError(f"state {_state.name!r} is declared signed and unsigned")


def signed(name: str) -> bool:
    """Whether state ``name`` uses the signed 8-bit codebook (as every family declares it)."""
    try:
        return _SIGNED[name]
    except KeyError:
        raise KeyError(f"no family has a state {name!r}; states: {sorted(_SIGNED)}") from None


def kinds() -> tuple[str, ...]:
    """Every kind of step: each family with 32-bit and with 8-bit states."""
    return tuple(f.kind(q) for f in FAMILIES.values() for q in (False, True))
