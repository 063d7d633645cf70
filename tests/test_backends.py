"""Every available non-reference backend against the reference, through the public classes.

Backend-agnostic: each case runs once per backend in ``BACKENDS`` and device in ``DEVICES``;
a backend that cannot run there skips with its reason (without a GPU, the Triton kernels run
on CPU tensors in Triton's interpreter: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``).

A case is one optimizer class, one dtype combination, two param groups with different
hyper-parameters, odd sizes, and at least 7 steps on random data in which a grad is ``None``
for a step, a grad is replaced by a new tensor, a param is re-bound with ``p.data = ...``, and
(where the case uses them) GradScaler's ``found_inf`` and a non-finite gradient skip a step.
Every param, every state tensor and every step count is compared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
import torch

import fusedopt
from fusedopt import backends, quant
from fusedopt.testing import assert_close, assert_identical

BACKENDS = ("triton", "cuda")
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))

DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32-bf16grad": (torch.float32, torch.bfloat16),
}

SIZES = (0, 1, 255, 257, 4097, 65537)
SIZES_B = (3, (33, 65), 2049)  # the second group: other sizes, a 2-d param
STEPS = 7
GRAD_STD = 3.0  # moments of order one: the fp32 tolerance's atol does not hide their errors
CLIP = 100.0  # below the global norm of the grid's gradients (about 800): clipping is active
SCALE = 1024.0  # GradScaler's scale in the cases that use one


def mixed_sizes(count: int = 304, seed: int = 7) -> list[int]:
    """Many small odd sizes (and a few larger ones), as in a real model's tensor list."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(1, 700, (count - 8,), generator=gen).tolist()
    return small + [1, 2, 16383, 16384, 16385, 4096, 8191, 32769]


@dataclass
class Case:
    cls: str
    dtype: str = "fp32"
    kwargs: dict = field(default_factory=dict)  # constructor arguments
    group_b: dict = field(default_factory=dict)  # overrides for the second group
    sizes: tuple = SIZES
    sizes_b: tuple = SIZES_B
    scaler: bool = False  # GradScaler-style grad_scale / found_inf (one step skipped)
    nonfinite: bool = False  # a non-finite grad at one step (skipped when clipping)

    @property
    def id(self) -> str:
        parts = [self.cls, self.dtype]
        parts += [f"{k}={v}" for k, v in self.kwargs.items()]
        parts += [f"b.{k}={_show(v)}" for k, v in self.group_b.items()]
        if self.scaler:
            parts.append("scaler")
        if self.nonfinite:
            parts.append("nonfinite")
        if self.sizes != SIZES:
            parts.append(f"{len(self.sizes)}tensors")
        return "-".join(parts)


def _show(value):
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item():g})"
    if isinstance(value, tuple):
        return "(" + ",".join(map(_show, value)) + ")"
    return str(value)


def _adam_cases():
    cases = []
    for dtype in DTYPES:
        cases += [
            Case("AdamW", dtype, group_b=dict(lr=3e-3, weight_decay=0.0)),
            Case("Adam", dtype, dict(weight_decay=0.1, amsgrad=True), group_b=dict(weight_decay=0.0, lr=2e-3)),
            Case("AdamW", dtype, dict(maximize=True, max_grad_norm=CLIP), dict(weight_decay=0.3), nonfinite=True),
            Case("Adam", dtype, dict(maximize=True), dict(amsgrad=True, eps=1e-6), scaler=True),
        ]
    cases += [
        Case("AdamW", "fp32", dict(amsgrad=True, max_grad_norm=CLIP / 2), dict(betas=(0.8, 0.9)), scaler=True),
        Case("AdamW", "fp32", {}, dict(lr=torch.tensor(2e-3), betas=(torch.tensor(0.85), 0.99))),
    ]
    return cases


def _lion_cases():
    cases = []
    for dtype in DTYPES:
        cases += [
            Case("Lion", dtype, dict(weight_decay=0.1), group_b=dict(lr=3e-4, betas=(0.95, 0.98))),
            Case("Lion", dtype, dict(max_grad_norm=CLIP), dict(weight_decay=0.5), nonfinite=True, scaler=True),
        ]
    cases.append(Case("Lion", "fp32", {}, dict(lr=torch.tensor(2e-4), weight_decay=0.2)))
    return cases


def _lamb_cases():
    cases = []
    for dtype in DTYPES:
        cases += [
            Case("LAMB", dtype, dict(weight_decay=0.1), group_b=dict(lr=3e-3, bias_correction=False)),
            Case("LAMB", dtype, dict(max_grad_norm=CLIP), dict(weight_decay=0.0, eps=1e-8), nonfinite=True, scaler=True),
        ]
    cases.append(Case("LAMB", "fp32", {}, dict(lr=torch.tensor(2e-3), betas=(0.8, torch.tensor(0.95)))))
    return cases


def _lars_cases():
    """LARS: momentum and none (no state), nesterov, dampening, L2 weight decay, max_unorm's clip
    active, off (0) and inactive (5: ``||u|| < 5 ||p||``). ``lr`` is required; it keeps each
    step's change of the params near LAMB's (about 1e-3 of them: with a larger one, a param
    that two backends round to neighbouring 16-bit values and that then heads for 0 leaves the
    relative tolerance)."""
    cases = []
    for dtype in DTYPES:
        cases += [
            Case("LARS", dtype, dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
                 group_b=dict(lr=3e-4, momentum=0.0, max_unorm=0.0)),
            Case("LARS", dtype, dict(lr=0.05, momentum=0.9, nesterov=True, max_grad_norm=CLIP),
                 dict(weight_decay=0.1, max_unorm=0.05, lr=0.02), nonfinite=True, scaler=True),
        ]
    cases += [
        Case("LARS", "fp32", dict(lr=2e-4, momentum=0.8, dampening=0.3, max_unorm=0.0),
             dict(lr=torch.tensor(0.05), momentum=0.5, dampening=0.0, nesterov=True, max_unorm=0.02)),
        Case("LARS", "fp32", dict(lr=3e-4, max_unorm=5.0, weight_decay=0.1), dict(lr=0.05, max_unorm=0.1), scaler=True),
    ]
    return cases


def _8bit_cases():
    small = dict(min_8bit_size=256)  # most tensors of the grid get 8-bit states
    cases = []
    for dtype in DTYPES:
        cases += [
            Case("AdamW8bit", dtype, small, group_b=dict(lr=3e-3, weight_decay=0.0, block_size=96)),
            Case("Lion8bit", dtype, dict(small, weight_decay=0.1), group_b=dict(block_size=2048)),
        ]
    cases += [
        Case("Adam8bit", "fp32", dict(small, amsgrad=True, maximize=True), dict(block_size=64)),
        Case("Adam8bit", "bf16", dict(small, weight_decay=0.1, max_grad_norm=CLIP), dict(amsgrad=True),
             nonfinite=True, scaler=True),
        Case("AdamW8bit", "fp32", dict(min_8bit_size=4096), dict(lr=torch.tensor(2e-3), block_size=4096)),
        Case("Lion8bit", "fp16", dict(small, max_grad_norm=CLIP), dict(block_size=8192), scaler=True),
    ]
    # the per-tensor-norm families (norms of this step's fp32 states; one skeleton, so a 16-bit
    # grad once)
    cases += [Case("LAMB8bit", dtype, dict(small, weight_decay=0.1),
                   group_b=dict(lr=3e-3, bias_correction=False, block_size=96))
              for dtype in ("fp32", "bf16", "fp32-bf16grad")]
    cases += [Case("LARS8bit", dtype, dict(small, lr=0.05, momentum=0.9, weight_decay=1e-2),
                   group_b=dict(nesterov=True, max_unorm=0.0, lr=3e-4, block_size=2048))
              for dtype in ("fp32", "bf16")]
    cases += [
        Case("LAMB8bit", "fp16", dict(small, max_grad_norm=CLIP), dict(weight_decay=0.0, block_size=8192), scaler=True),
        Case("LAMB8bit", "fp32", dict(small, max_grad_norm=CLIP), dict(lr=torch.tensor(2e-3), block_size=64),
             nonfinite=True, scaler=True),
        Case("LARS8bit", "fp32", dict(small, lr=0.05, momentum=0.9, dampening=0.2, max_grad_norm=CLIP),
             dict(momentum=0.0, lr=torch.tensor(0.02)), nonfinite=True, scaler=True),
        Case("LARS8bit", "bf16", dict(small, lr=0.05, momentum=0.9), dict(block_size=8192)),
    ]
    return cases


def _sgd_cases():
    return [
        Case("SGD", "fp32", dict(momentum=0.9, weight_decay=0.1), group_b=dict(lr=3e-3, momentum=0.0)),
        Case("SGD", "bf16", dict(momentum=0.9, nesterov=True), group_b=dict(weight_decay=0.01, maximize=True)),
        Case("SGD", "fp32", dict(momentum=0.9, nesterov=True, maximize=True, max_grad_norm=CLIP),
             dict(momentum=0.5, weight_decay=0.2), nonfinite=True),
        Case("SGD", "fp32", dict(momentum=0.8, dampening=0.3), dict(lr=torch.tensor(2e-3)), scaler=True),
    ]


def _adagrad_cases():
    return [
        Case("Adagrad", "fp32", dict(lr_decay=0.01, weight_decay=0.1),
             group_b=dict(lr=3e-2, initial_accumulator_value=0.5)),
        Case("Adagrad", "bf16", dict(lr_decay=0.1), dict(maximize=True)),
        Case("Adagrad", "fp32", dict(maximize=True, max_grad_norm=CLIP), dict(eps=1e-6, lr_decay=0.5),
             nonfinite=True, scaler=True),
        Case("Adagrad", "fp32", {}, dict(lr=torch.tensor(5e-3), lr_decay=0.05, weight_decay=0.3)),
    ]


def _rmsprop_cases():
    return [
        Case("RMSprop", "fp32", dict(momentum=0.9, centered=True),
             group_b=dict(lr=3e-3, momentum=0.0, centered=False)),
        Case("RMSprop", "bf16", dict(centered=True), dict(momentum=0.5, weight_decay=0.1)),
        # no weight decay with clipping: where g + weight_decay * p cancels to about eps, the update
        # follows the last bit of the clip coefficient, which each backend's norm sums in its own order
        Case("RMSprop", "fp32", dict(maximize=True, max_grad_norm=CLIP), dict(centered=True, alpha=0.9),
             nonfinite=True, scaler=True),
        Case("RMSprop", "fp32", dict(momentum=0.5, weight_decay=0.1),
             dict(lr=torch.tensor(2e-3), alpha=0.3, centered=True)),
    ]


def _new_8bit_cases():
    small = dict(min_8bit_size=256)
    return [
        Case("SGD8bit", "fp32", dict(small, momentum=0.9), group_b=dict(block_size=96, nesterov=True)),
        Case("Adagrad8bit", "fp32", dict(small, lr_decay=0.01),
             group_b=dict(block_size=64, initial_accumulator_value=0.1)),
        Case("RMSprop8bit", "fp32", dict(small, momentum=0.9, centered=True),
             group_b=dict(block_size=96, momentum=0.0)),
        Case("SGD8bit", "bf16", dict(small, momentum=0.9, weight_decay=0.1, max_grad_norm=CLIP), dict(block_size=2048),
             nonfinite=True, scaler=True),
        Case("Adagrad8bit", "bf16", dict(small, maximize=True), dict(lr=torch.tensor(2e-3), weight_decay=0.1)),
        Case("RMSprop8bit", "bf16", dict(small, weight_decay=0.1), dict(block_size=2048, centered=True)),
        Case("SGD8bit", "fp32", dict(small, momentum=0.9, dampening=0.2), dict(lr=torch.tensor(2e-3), block_size=4096)),
        # fp16 without clipping: with it, the emulated CUDA norm (summed in another order) gave a clip
        # coefficient a bit off the reference's, which moved one 8-bit code and one fp16 element to
        # 1.06x the tolerance at step 3; clipping of RMSprop is in the fp32 cases above
        Case("RMSprop8bit", "fp16", dict(small, centered=True), dict(block_size=8192), scaler=True),
    ]


def _stochastic_rounding_cases():
    sr = dict(stochastic_rounding=True)
    return [  # both backends draw the same noise: results as close as round-to-nearest ones
        Case("AdamW", "bf16", sr, group_b=dict(seed=12345, lr=3e-3)),
        Case("Lion", "bf16", dict(sr, max_grad_norm=CLIP), group_b=dict(seed=2**32 - 1), scaler=True),
        Case("LAMB", "bf16", sr, group_b=dict(stochastic_rounding=False)),
        Case("AdamW8bit", "bf16", dict(sr, min_8bit_size=256), group_b=dict(seed=7)),
        Case("LAMB8bit", "bf16", dict(sr, min_8bit_size=256), group_b=dict(seed=3, block_size=128)),
        Case("LARS", "bf16", dict(sr, lr=0.05, momentum=0.9, nesterov=True), group_b=dict(seed=11)),
        Case("AdamW", "fp32", sr),  # float32 params are stored exactly
    ]


def _master_weights_cases():
    mw = dict(master_weights=True)
    return [  # the update runs on fp32 masters (fp32 params, 16-bit grads); params are rounded copies
        Case("AdamW", "bf16", mw, group_b=dict(lr=3e-3, weight_decay=0.0)),
        Case("Adam", "fp16", dict(mw, weight_decay=0.1, max_grad_norm=CLIP), dict(amsgrad=True), nonfinite=True),
        Case("LAMB", "bf16", dict(mw, max_grad_norm=CLIP), dict(master_weights=False), scaler=True),
        Case("Lion8bit", "bf16", dict(mw, min_8bit_size=256), dict(block_size=96)),
        Case("Lion", "fp32", mw),  # float32 params have no master copy
    ]


def _many_tensor_cases():
    """A model-like list of 300+ tensors of mixed sizes in one group (one launch a pass): the
    table and work list of each kernel kind (a 32-bit update with the norm, LAMB's per-tensor
    trust ratios, 8-bit block indices)."""
    many = dict(sizes=tuple(mixed_sizes()), sizes_b=(5, 700))
    return [
        Case("AdamW", "fp32", dict(amsgrad=True, max_grad_norm=CLIP), scaler=True, **many),
        Case("LAMB", "bf16", **many),
        Case("AdamW8bit", "fp32-bf16grad", dict(min_8bit_size=512), **many),
    ]


CASES = (_adam_cases() + _lion_cases() + _lamb_cases() + _lars_cases() + _8bit_cases() + _sgd_cases()
         + _adagrad_cases() + _rmsprop_cases() + _new_8bit_cases() + _stochastic_rounding_cases()
         + _master_weights_cases() + _many_tensor_cases())


def lean_params(cases) -> list:
    """``cases`` as pytest params: the first case of each kind of step (Adam/AdamW, LAMB, Lion,
    SGD, Adagrad, RMSprop and their 8-bit forms) and dtype runs in the default tier, every other
    one is ``full``."""
    seen, out = set(), []
    for case in cases:
        key = (case.cls.lower().replace("adamw", "adam"), case.dtype)
        out.append(pytest.param(case, id=case.id, marks=() if key not in seen else pytest.mark.full))
        seen.add(key)
    return out


#: The default tier's norm grid: p=2 for every dtype; the other norms are ``full``.
NORM_TYPES = [2.0, pytest.param(math.inf, marks=pytest.mark.full), pytest.param(1.0, marks=pytest.mark.full),
              pytest.param(3.0, marks=pytest.mark.full)]


# ---------------------------------------------------------------------------------------------


def _make(case: Case, device: str, backend: str):
    p_dtype, _ = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(1234)

    def param(size):
        shape = size if isinstance(size, tuple) else (size,)
        return torch.randn(shape, generator=gen).to(device, p_dtype)

    group_a = [param(s) for s in case.sizes]
    group_b = [param(s) for s in case.sizes_b]
    _, g_dtype = DTYPES[case.dtype]
    if g_dtype != p_dtype:
        if not hasattr(group_a[0], "grad_dtype"):
            pytest.skip(f"this torch ({torch.__version__}) cannot give a {p_dtype} param a {g_dtype} grad")
        for p in group_a + group_b:
            p.grad_dtype = g_dtype
    cls = getattr(fusedopt, case.cls)
    opt = cls([{"params": group_a}, {"params": group_b, **case.group_b}], backend=backend, **case.kwargs)
    return opt, group_a + group_b


def _grads(case: Case, params, device, gen):
    """The gradients of one step (the same values for every backend)."""
    _, g_dtype = DTYPES[case.dtype]
    values = [torch.randn(p.shape, generator=gen) * GRAD_STD for p in params]
    return [(v * SCALE if case.scaler else v).to(device, g_dtype) for v in values]


class Runner:
    """One optimizer of the case on one backend, stepped with the events of the grid."""

    def __init__(self, case: Case, device: str, backend: str):
        self.case, self.device = case, device
        self.opt, self.params = _make(case, device, backend)
        self.grads = [None] * len(self.params)
        self.largest = max(range(len(self.params)), key=lambda i: self.params[i].numel())

    def step(self, step: int, values) -> None:
        case, params, grads, largest = self.case, self.params, self.grads, self.largest
        for i, v in enumerate(values):
            if grads[i] is None:
                grads[i] = v.clone()
            else:
                grads[i].copy_(v)  # in place: the launch tables are reused
            params[i].grad = grads[i]
        if step == 2:  # no grad: the param and its step are left alone
            params[1].grad = None
            params[largest].grad = None
        if step == 3:  # a new grad tensor: a new address
            grads[largest] = grads[largest].clone()
            params[largest].grad = grads[largest]
        if step == 4:  # a re-bound param: a new address
            params[largest].data = params[largest].data.clone()
            params[-1].data = params[-1].data * 0.5
        if case.nonfinite and step == 5:  # a non-finite norm skips the clipped step
            grads[largest].view(-1)[7] = float("inf")
        if case.scaler:
            self.opt.grad_scale = torch.tensor(SCALE, device=self.device)
            self.opt.found_inf = torch.tensor(1.0 if step == 6 else 0.0, device=self.device)
        self.opt.step()


def _p_feeds_states(case: Case) -> bool:
    """Whether the params enter the states (L2 weight decay into the gradient: Adam, SGD,
    Adagrad, RMSprop, LARS): then a param that two backends round to neighbouring 16-bit values
    moves the states by that much."""
    if case.cls.removesuffix("8bit") not in ("Adam", "SGD", "Adagrad", "RMSprop", "LARS"):
        return False
    return any(g.get("weight_decay", 0.0) for g in (case.kwargs, case.group_b))


def _codes_exact(case: Case) -> bool:
    """Whether both backends quantize the same fp32 states, so that the codes must be equal.
    Not when the params enter the moments (above), nor when clipping: the clip coefficient
    comes from a norm each backend sums in its own order, so the gradients fed to the moments
    can differ in the last bit, and a state that lands on a midpoint flips to the
    neighbouring code."""
    return not _p_feeds_states(case) and case.kwargs.get("max_grad_norm") is None


def _state_dtype(case: Case) -> torch.dtype:
    p_dtype, _ = DTYPES[case.dtype]
    return p_dtype if _p_feeds_states(case) else torch.float32


def assert_codes_close(name, codes, absmax, expected_codes, expected_absmax, signed, block_size, exact):
    """8-bit states: absmax within fp32 tolerance; codes identical when ``exact`` (the same
    fp32 state went into the same quantizer), else each dequantized value within one code
    step (the wider gap next to the expected code, at the larger absmax) of the expected one:
    what a last-bit difference in the fp32 state moves it by at a midpoint."""
    assert_close(absmax, expected_absmax, torch.float32, name + "_absmax")
    if exact:
        diff = (codes.long() - expected_codes.long()).reshape(-1)
        if bool(diff.any()):
            idx = diff.nonzero()[:, 0]
            raise AssertionError(
                f"{name}: {idx.numel()} of {diff.numel()} codes differ; first at {int(idx[0])}: "
                f"{int(codes.reshape(-1)[idx[0]])} vs expected {int(expected_codes.reshape(-1)[idx[0]])}"
            )
        return
    book = quant.dynamic_map(signed).double()
    gaps = book[1:] - book[:-1]
    wider = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))
    e_codes = expected_codes.reshape(-1).long().cpu()
    scale = torch.maximum(absmax.double().cpu(), expected_absmax.double().cpu())
    scale = scale.repeat_interleave(block_size)[: e_codes.numel()]
    actual = quant.dequantize_blockwise(codes.cpu(), absmax.cpu(), signed, block_size).double().reshape(-1)
    expected = quant.dequantize_blockwise(expected_codes.cpu(), expected_absmax.cpu(), signed, block_size)
    expected = expected.double().reshape(-1)
    bound = wider[e_codes] * scale + (absmax.double().cpu() - expected_absmax.double().cpu()).abs().max()
    bad = (actual - expected).abs() > bound
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} dequantized values differ by more than one code step; first at {i}: "
            f"code {int(codes.reshape(-1)[i])} ({float(actual[i])!r}) vs {int(e_codes[i])} ({float(expected[i])!r})"
        )


def compare(case: Case, run: Runner, ref: Runner, when: str) -> None:
    """Every param, every state tensor and every step count of ``run`` against ``ref``."""
    p_dtype, _ = DTYPES[case.dtype]
    state_dtype = _state_dtype(case)
    exact = _codes_exact(case)
    for i, (p, r) in enumerate(zip(run.params, ref.params)):
        assert_close(p, r, p_dtype, f"{when}: param {i}")
        state, ref_state = run.opt.state[p], ref.opt.state[r]
        assert sorted(state) == sorted(ref_state), f"{when}: param {i}: state keys {sorted(state)} vs {sorted(ref_state)}"
        for key, value in ref_state.items():
            got = state[key]
            name = f"{when}: param {i} {key}"
            assert got.dtype == value.dtype and got.shape == value.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
            if key == "step":
                assert float(got) == float(value), f"{name}: {float(got)} vs {float(value)}"
            elif key.endswith("_absmax"):
                continue  # with its codes
            elif value.dtype == torch.uint8:
                group = next(g for g in ref.opt.param_groups if any(q is r for q in g["params"]))
                absmax, ref_absmax = state[key + "_absmax"], ref_state[key + "_absmax"]
                assert_codes_close(name, got, absmax, value, ref_absmax, quant.signed_state(key),
                                   group["block_size"], exact)
                if not exact:  # the next step starts from the same 8-bit state again
                    got.copy_(value)
                    absmax.copy_(ref_absmax)
            else:
                assert_close(got, value, state_dtype, name)


def _unsupported_step(case: Case, backend: str) -> str | None:
    """Why ``backend`` cannot run the case's 8-bit steps (their block sizes), or None."""
    module = backends.load(backend)[0]
    if not case.cls.endswith("8bit") or not hasattr(module, "unsupported_step"):
        return None
    kind = case.cls.lower().replace("adamw", "adam")
    sizes = {case.kwargs.get("block_size", 256), case.group_b.get("block_size", case.kwargs.get("block_size", 256))}
    return next((r for r in (module.unsupported_step(kind, block_size=b) for b in sizes) if r is not None), None)


def _check(case: Case, device: str, backend: str) -> None:
    """Step the case on ``backend`` and on the reference side by side, comparing after every
    step."""
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")
    ref = Runner(case, device, "reference")
    run = Runner(case, device, backend)
    gen = torch.Generator().manual_seed(99)
    refused = _unsupported_step(case, backend)
    if refused is not None:  # e.g. Triton and block_size 8192: refused at the first step, nothing runs
        before = [p.detach().clone() for p in run.params]
        with pytest.raises(RuntimeError, match=re.escape(f"backend {backend!r} cannot run this")):
            run.step(0, _grads(case, run.params, device, gen))
        assert not run.opt.state and all(torch.equal(a, b) for a, b in zip(before, run.params))
        return
    for step in range(STEPS):
        values = _grads(case, run.params, device, gen)
        ref.step(step, values)
        run.step(step, values)
        compare(case, run, ref, f"step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", lean_params(CASES))
def test_against_reference(case, device, backend):
    _check(case, device, backend)


# ---------------------------------------------------------------------------------------------
# The global norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "fp16", "mixed"])
def test_global_norm(dtypes, norm_type, device, backend):
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")
    module = backends.load(backend)[0]
    gen = torch.Generator().manual_seed(5)
    kinds = [torch.float32, torch.bfloat16, torch.float16] if dtypes == "mixed" else [DTYPES[dtypes][0]]
    sizes = [1, 255, 257, 4097, 65537, 0] + mixed_sizes(40)
    tensors = [(torch.randn(n, generator=gen) * 3).to(device, kinds[i % len(kinds)]) for i, n in enumerate(sizes)]
    if norm_type == math.inf:
        tensors = [t for t in tensors if t.numel()]  # torch's inf-norm has no identity for an empty tensor
    refused = module.unsupported_step("norm", norm_type=norm_type)
    if refused is not None:  # resolution refuses it; reached anyway, the backend raises (no fallback)
        assert norm_type not in (1.0, 2.0, math.inf), refused
        with pytest.raises(RuntimeError, match=re.escape(refused)):
            module.global_norm(tensors, norm_type)
        return
    got = module.global_norm(tensors, norm_type)
    assert got.shape == () and got.device == tensors[0].device and got.dtype == torch.float32
    # against the exact (float64) norm: an fp32 accumulation is within fp32 tolerance of it
    expected = fusedopt.reference.global_norm([t.double() for t in tensors], norm_type)
    assert_close(got, expected, torch.float32, f"{norm_type}-norm")
    again = module.global_norm(tensors, norm_type)
    assert torch.equal(got, again), "the norm is not deterministic"
    # non-finite gradients give a non-finite norm (which makes a clipped step skip)
    tensors[3].view(-1)[5] = float("nan")
    assert torch.isnan(module.global_norm(tensors, norm_type))
    tensors[3].view(-1)[5] = float("inf")
    assert not torch.isfinite(module.global_norm(tensors, norm_type))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_norm(device, backend):
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(n, generator=gen).to(device) * GRAD_STD for n in (3, 4097, 300)]
    results = []
    for b in ("reference", backend):
        params = [torch.zeros_like(g) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = fusedopt.clip_grad_norm_(params, 10.0, backend=b)
        results.append((params, norm))
    (ref_params, ref_norm), (params, norm) = results
    assert_close(norm, ref_norm, torch.float32, "norm")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert_close(p.grad, r.grad, torch.float32, f"grad {i}")


# ---------------------------------------------------------------------------------------------
# Bias corrections (1 - beta^t) at betas close to 1 and at a large step
# ---------------------------------------------------------------------------------------------

_B2 = (0.9, 0.99999)
BIAS_CASES = [
    Case("Adam", "fp32", dict(lr=10.0, betas=_B2, weight_decay=0.01, amsgrad=True), dict(betas=(0.8, 0.9999)),
         sizes=(300, 17), sizes_b=(5,)),
    Case("AdamW", "fp32", dict(lr=10.0, betas=_B2), dict(betas=(torch.tensor(0.9), torch.tensor(0.99999))),
         sizes=(300, 17), sizes_b=(5,)),
    Case("LAMB", "fp32", dict(lr=1.0, betas=_B2, weight_decay=0.1), dict(betas=(0.8, torch.tensor(0.9999))),
         sizes=(300, 17), sizes_b=(5,)),
    Case("AdamW8bit", "fp32", dict(lr=10.0, betas=_B2, amsgrad=True, min_8bit_size=256, block_size=128),
         dict(betas=(torch.tensor(0.9), 0.9999)), sizes=(300, 17), sizes_b=(257,)),
]


def check_bias_corrections(case: Case, device: str, backend: str) -> None:
    """Three steps from the start, then two at step 10**6, on ``backend`` and the reference.
    With beta2 = 0.99999, ``1 - beta2 ** t`` in fp32 put the first updates off by 6.8e-4
    (relative); ``lr`` is large so that the update, not the param, sets the tolerance."""
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")
    ref = Runner(case, device, "reference")
    run = Runner(case, device, backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        if step == 3:
            for r in (ref, run):
                for state in r.opt.state.values():
                    state["step"].fill_(10**6 - 1)
        values = _grads(case, run.params, device, gen)
        ref.step(step, values)
        run.step(step, values)
        compare(case, run, ref, f"step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BIAS_CASES, ids=lambda c: c.id)
def test_bias_corrections(case, device, backend):
    check_bias_corrections(case, device, backend)


def check_step_size_rounded_once(backend: str) -> None:
    """Adam's ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` are taken in double and rounded
    once to fp32, as torch's for-loop takes them: one step from random states at steps 1..10
    and 10**6 (beta2 0.999 to 0.99999) is, bit for bit, the fp32 formula with those two numbers.
    (Derived in fp32 from fp32 bias corrections they carried two or three roundings: the largest
    error of the update against float64 math was 3.1e-7 of it, torch's 2.0e-7 to 2.6e-7.)"""
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    for beta2 in (0.999, 0.9999, 0.99999):
        for t in tuple(range(1, 11)) + (10**6,):
            gen = torch.Generator().manual_seed(t)
            p0, g, m = (torch.randn(257, generator=gen) for _ in range(3))
            v = torch.rand(257, generator=gen) + 0.1
            q = p0.clone()
            opt = fusedopt.AdamW([q], lr=1e-3, betas=(0.9, beta2), weight_decay=0.0, backend=backend)
            opt.state[q] = dict(step=torch.tensor(float(t - 1)), exp_avg=m.clone(), exp_avg_sq=v.clone())
            q.grad = g.clone()
            opt.step()
            step_size = torch.tensor(1e-3 / (1 - 0.9**t), dtype=torch.float32)
            bias_correction2_sqrt = torch.tensor(math.sqrt(1 - beta2**t), dtype=torch.float32)
            m = 0.9 * m + (1 - 0.9) * g
            v = beta2 * v + (1 - beta2) * g * g
            expected = p0 - step_size * m / (torch.sqrt(v) / bias_correction2_sqrt + 1e-8)
            assert_identical(q, expected, f"{backend} beta2={beta2} t={t} param")


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_step_size_rounded_once(backend):
    check_step_size_rounded_once(backend)
