"""The tests every torch-compatible family shares, declared once and run from each family's test
file: the file writes a :class:`Suite` (its flags, its bad inputs, its peers) and
``globals().update(shared(SUITE))``, then only what is its own.

Each test is the same comparison the families' files made by hand before (tests/cases.py's
grid: two groups of odd sizes, ``grad=None`` steps, a frozen param, 8 steps, every state under
torch's keys): the family against torch.optim (for-loop and default), its 16-bit params, a
tensor lr changed in place, torch's state dicts both ways, the 8-bit class step for step against
the 32-bit one on dequantized states and against bitsandbytes, bad input in torch's words, and
the extras. Nothing here reads the family's spec for what it checks: the states each group keeps
(``names``) and the errors are written in the suite, so that a wrong declaration fails.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from cases import (
    EXTRAS,
    STEPS,
    assert_no_worse_than_bnb,
    check_8bit_lockstep,
    check_bad_input,
    check_extra,
    clone_params,
    make_params,
    param_groups,
    run_16bit,
    run_against,
    run_against_bnb,
    state_dicts_both_ways,
    step_count,
)


@dataclass(frozen=True)
class Suite:
    """A family's shared tests, as data.

    Attributes:
        cls, cls8bit: the 32-bit and 8-bit classes; ``torch_cls``: torch.optim's drop-in.
        lr: the learning rate of the comparisons (group 0; group 1 takes ``group1``).
        group1: group 1's hyper-parameters (different from the defaults).
        names: ``names(kw)``, the states a group made with ``kw`` keeps (torch's keys).
        flags: named constructor arguments the comparisons with torch run over.
        every: the product of flag values of the full tier (``{name: values}``); ``allowed``
            drops the combinations torch refuses.
        sixteen: named ``(kw, group1 overrides)`` of the bf16/fp16 params comparison.
        tensor_lr: the other arguments of the tensor-lr run.
        state_dicts: named constructor arguments of the state-dict round trips.
        stepless: torch's state has no ``step`` (SGD): a loaded state is past its first step.
        lockstep: named arguments of the 8-bit against 32-bit comparison (``min_8bit_size`` goes
            to the comparison, default 256); ``lockstep_bf16`` those of its bf16-params run.
        bnb: ``(bitsandbytes class, state names, kwargs, why)`` of the comparison with
            bitsandbytes' CPU 8-bit class (``why``: how its CPU step restricts the comparison).
        bad: ``(overrides, exception, message, torch raises the same)``; ``bad_kw``: the
            arguments they override.
        extras: the arguments of the extras (clipping, GradScaler, master weights, stochastic
            rounding).
        xfail: ``xfail(dtype, flags)``: the reason a full-tier case is a strict xfail, or None.
    """

    cls: type
    cls8bit: type
    torch_cls: type
    lr: float
    group1: dict
    names: Callable[[dict], tuple]
    flags: dict[str, dict]
    every: dict[str, tuple]
    sixteen: dict[str, tuple[dict, dict]]
    tensor_lr: dict
    state_dicts: dict[str, dict]
    lockstep: dict[str, dict]
    lockstep_bf16: dict
    bnb: tuple
    bad: list
    extras: dict
    stepless: bool = False
    allowed: Callable[[dict], bool] = lambda flags: True
    bad_kw: dict = field(default_factory=dict)
    xfail: Callable[[torch.dtype, dict], str | None] = lambda dtype, flags: None

    def groups(self, kw: dict, group1: dict | None = None) -> list[tuple]:
        """The states of each group of the grid."""
        group1 = self.group1 if group1 is None else group1
        return [self.names(kw), self.names({**kw, **group1})]

    def every_combination(self) -> list[dict]:
        keys = list(self.every)
        combos = (dict(zip(keys, values)) for values in itertools.product(*self.every.values()))
        return [c for c in combos if self.allowed(c)]


def shared(s: Suite) -> dict:
    """The shared tests of suite ``s``, as a test module's globals."""
    both = pytest.mark.parametrize("cls", [s.cls, s.cls8bit], ids=lambda c: c.__name__)
    eight_bit = dict(min_8bit_size=256, block_size=64)

    def new(params, group1, **kw):
        return s.cls(param_groups(params, group1), backend="reference", **kw)

    def torch_new(params, group1, foreach=False, **kw):
        return s.torch_cls(param_groups(params, group1), foreach=foreach, **kw)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @pytest.mark.parametrize("flags", list(s.flags))
    @pytest.mark.parametrize("foreach", [False, None], ids=["for-loop", "default"])
    def test_matches_torch(dtype, flags, foreach):
        kw = dict(lr=s.lr, **s.flags[flags])
        ours, theirs = make_params(dtype), make_params(dtype)
        opt = new(ours, s.group1, **kw)
        run_against(opt, ours, torch_new(theirs, s.group1, foreach, **kw), theirs, dtype, s.groups(kw))
        # The grad=None steps and the frozen param: step counts lag or never start (a family
        # that makes its state at construction, as torch's Adagrad, has it at step 0).
        assert step_count(opt, ours[0][2]) == STEPS - 2
        assert step_count(opt, ours[1][0]) == STEPS - 1
        if s.cls._spec.eager_state:
            assert step_count(opt, ours[0][4]) == 0
        else:
            assert ours[0][4] not in opt.state

    @pytest.mark.full
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
    @pytest.mark.parametrize("flags", s.every_combination(), ids=str)
    def test_every_flag_combination(dtype, flags, request):
        reason = s.xfail(dtype, flags)
        if reason:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
        kw = dict(lr=s.lr, **flags)
        ours, theirs = make_params(dtype), make_params(dtype)
        run_against(new(ours, s.group1, **kw), ours, torch_new(theirs, s.group1, **kw), theirs, dtype, s.groups(kw))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("variant", list(s.sixteen))
    def test_16bit_params_fp32_states(dtype, variant):
        kw, overrides = s.sixteen[variant]
        kw = dict(lr=s.lr, **kw)
        group1 = {**s.group1, **overrides}
        ours = make_params(dtype)
        theirs = clone_params(ours, lambda p: p.double())
        run_16bit(new(ours, group1, **kw), ours, torch_new(theirs, group1, **kw), theirs, dtype, s.groups(kw, group1))

    def test_tensor_lr_changed_in_place():
        """lr as a 1-element tensor, changed in place between steps, followed as torch follows it."""
        ours, theirs = make_params(torch.float64), make_params(torch.float64)
        lr_ours, lr_theirs = torch.tensor(s.lr, dtype=torch.float64), torch.tensor(s.lr, dtype=torch.float64)
        opt = new(ours, {}, lr=lr_ours, **s.tensor_lr)
        topt = torch_new(theirs, {}, lr=lr_theirs, **s.tensor_lr)
        for step in range(STEPS):
            lr_ours.fill_(s.lr * 0.7**step)
            lr_theirs.fill_(s.lr * 0.7**step)
            run_against(opt, ours, topt, theirs, torch.float64, s.groups(s.tensor_lr, {}), [step])

    @pytest.mark.parametrize("flags", list(s.state_dicts))
    def test_torch_state_dict_loads_both_ways(flags):
        kw = dict(lr=s.lr, **s.state_dicts[flags])
        state_dicts_both_ways(lambda g: s.cls(g, backend="reference", **kw),
                              lambda g: s.torch_cls(g, foreach=False, **kw), s.group1, s.groups(kw),
                              stepless=s.stepless)

    @pytest.mark.parametrize("kw", list(s.lockstep.values()), ids=list(s.lockstep))
    def test_8bit_steps_as_32bit_on_dequantized_states(kw):
        kw = dict(kw)
        sizes = {"min_8bit_size": kw.pop("min_8bit_size")} if "min_8bit_size" in kw else {}
        check_8bit_lockstep(s.cls8bit, s.cls, kw, s.groups(kw, {}), **sizes)

    def test_8bit_bf16_params():
        check_8bit_lockstep(s.cls8bit, s.cls, s.lockstep_bf16, s.groups(s.lockstep_bf16, {}), dtype=torch.bfloat16)

    def test_8bit_no_worse_than_bitsandbytes():
        bnb_cls, names, kw, _why = s.bnb
        ours, theirs, ref = run_against_bnb(s.cls8bit, bnb_cls, s.torch_cls, names, **kw)
        assert_no_worse_than_bnb(ours, theirs, ref)

    test_8bit_no_worse_than_bitsandbytes.__doc__ = f"bitsandbytes' CPU {s.bnb[0].__name__}: {s.bnb[3]}"

    @both
    @pytest.mark.parametrize("overrides,exc,msg,torch_too", s.bad, ids=[str(b[0]) for b in s.bad])
    def test_bad_input_changes_nothing(cls, overrides, exc, msg, torch_too):
        kw = dict(backend="reference", **s.bad_kw, **({"min_8bit_size": 64} if cls is s.cls8bit else {}))
        torch_make = (lambda params, **o: s.torch_cls(params, **o)) if torch_too else None
        check_bad_input(cls, kw, overrides, exc, msg, torch_make)

    @pytest.mark.parametrize("extra", EXTRAS)
    @both
    def test_extras(cls, extra):
        check_extra(extra, cls, {**s.extras, **(eight_bit if cls is s.cls8bit else {})})

    return {k: v for k, v in locals().items() if k.startswith("test_")}
