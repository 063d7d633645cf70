"""Non-finite params, grads and states (inf, -inf, NaN) in every family and backend.

The reference against torch where torch has the family (torch.optim.Adam / AdamW / SGD /
Adagrad / RMSprop, for-loop, fp32; Lion against lion-pytorch; LARS against bitsandbytes'
PytorchLARS), and every other backend against the reference: the same
elements must come out NaN, the same ones infinite (``fusedopt.testing.assert_close`` compares
non-finite values exactly), the finite ones within the fp32 tolerance.

One small tensor per family and non-finite kind: the value goes into the param at one element,
the grad at another and each state at a third (in 8-bit states, each into its own
quantization block, as a block's absmax carries a non-finite entry to the whole block), after
a first step, and two more steps show where it spread. No clipping and no GradScaler: the step
runs with the non-finite grad (a skipped step is tested in ``test_backends.py``).
``test_cuda_emulated.py`` runs the backend half on the CUDA backend.
"""

from __future__ import annotations

import pytest
import torch
from lion_pytorch import Lion as LionPytorch

import cases
import fusedopt
from fusedopt import backends, quant
from fusedopt.testing import assert_close

KINDS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
BLOCK = 64  # 8-bit states: blocks of 64, one per injected value
N = 6 * BLOCK - 5  # above min_8bit_size below; a short last block

# name: (class, constructor arguments). weight_decay=0 in Adam and LAMB: the L2 term is
# skipped (torch: ``if weight_decay != 0``), so a -inf param with a zero grad does not make 0 * inf.
FAMILIES = {
    "Adam": ("Adam", dict(weight_decay=0.0)),
    "Adam-wd-amsgrad": ("Adam", dict(weight_decay=0.1, amsgrad=True)),
    "AdamW-amsgrad": ("AdamW", dict(amsgrad=True)),
    "AdamW": ("AdamW", dict(weight_decay=0.0, maximize=True)),
    # torch's lerp takes its other branch at weight 1 - beta1 >= 0.5: an infinite exp_avg stays
    # infinite for 0 < beta1 <= 0.5 and becomes NaN at beta1 = 0
    "AdamW-beta1=0.3": ("AdamW", dict(betas=(0.3, 0.999))),
    "Adam-beta1=0": ("Adam", dict(weight_decay=0.0, betas=(0.0, 0.999))),
    "LAMB": ("LAMB", dict(weight_decay=0.0)),
    "LAMB-wd": ("LAMB", dict(weight_decay=0.1)),
    "Lion": ("Lion", dict(weight_decay=0.1)),
    "Adam8bit": ("Adam8bit", dict(weight_decay=0.0)),
    "AdamW8bit-amsgrad": ("AdamW8bit", dict(amsgrad=True)),
    "Lion8bit": ("Lion8bit", dict()),
    "SGD": ("SGD", dict()),
    "SGD-nesterov-wd": ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    "SGD-dampening-maximize": ("SGD", dict(momentum=0.5, dampening=0.3, maximize=True)),
    "Adagrad": ("Adagrad", dict(lr_decay=0.1, initial_accumulator_value=0.5)),
    "Adagrad-wd": ("Adagrad", dict(weight_decay=0.1, maximize=True)),
    "RMSprop": ("RMSprop", dict()),
    "RMSprop-centered-momentum": ("RMSprop", dict(centered=True, momentum=0.9, weight_decay=0.1)),
    "LARS": ("LARS", dict(momentum=0.9)),
    "LARS-nesterov-noclip": ("LARS", dict(momentum=0.9, nesterov=True, max_unorm=0.0, weight_decay=0.1)),
    "SGD8bit": ("SGD8bit", dict(momentum=0.9)),
    "Adagrad8bit": ("Adagrad8bit", dict()),
    "RMSprop8bit": ("RMSprop8bit", dict(centered=True, momentum=0.9)),
    "LARS8bit": ("LARS8bit", dict(momentum=0.9)),
    "LAMB8bit": ("LAMB8bit", dict(weight_decay=0.0)),
}
TORCH = dict(cases.TORCH)


def _kwargs(family: str) -> dict:
    name, kw = FAMILIES[family]
    kw = dict(kw, lr=1e-2)
    if name.endswith("8bit"):
        kw.update(block_size=BLOCK, min_8bit_size=256)
    return kw


def _state_names(opt, p) -> list[str]:
    return sorted(k for k in opt.state[p] if k != "step" and not k.endswith("_absmax"))


def _inject_state(opt, p, name: str, index: int, value: float) -> None:
    """State ``name`` of ``p`` holds ``value`` at ``index``: written into an fp32 state, or
    into an 8-bit state's values (decoded, set, encoded again by the reference quantizer)."""
    state = opt.state[p]
    if state[name].dtype != torch.uint8:
        state[name][index] = value
        return
    signed = quant.signed_state(name)
    values = quant.dequantize_blockwise(state[name], state[name + "_absmax"], signed, BLOCK)
    values[index] = value
    quant.quantize_blockwise(values, signed, BLOCK, codes_out=state[name], absmax_out=state[name + "_absmax"])


def run(family: str, kind: str, backend: str, torch_cls=None):
    """Three steps of ``family`` on ``backend`` (or of ``torch_cls``) with ``KINDS[kind]`` in the
    param (element 5), the grad of the second step (element ``BLOCK + 5``) and the k-th state
    (element ``(2 + k) * BLOCK + 5``). Returns the param and the states after each step."""
    value = KINDS[kind]
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(N, generator=gen)
    kw = _kwargs(family)
    if torch_cls is not None:
        plain = torch_cls is LionPytorch or torch_cls.__name__ == "PytorchLARS"  # no foreach argument
        opt = torch_cls([p], **kw) if plain else torch_cls([p], foreach=False, **kw)
    else:
        opt = getattr(fusedopt, FAMILIES[family][0])([p], backend=backend, **kw)
    history = []
    for step in range(3):
        p.grad = torch.randn(N, generator=gen)
        if step == 1:
            with torch.no_grad():
                p[5] = value
            p.grad[BLOCK + 5] = value
            for k, name in enumerate(_state_names(opt, p)):
                _inject_state(opt, p, name, (2 + k) * BLOCK + 5, value)
        opt.step()
        states = {}
        for name in _state_names(opt, p):
            s = opt.state[p][name]
            if s.dtype == torch.uint8:
                s = quant.dequantize_blockwise(s, opt.state[p][name + "_absmax"], quant.signed_state(name), BLOCK)
            states[name] = s.clone()
        history.append((p.detach().clone(), states))
    return history


def assert_same(got, expected, what: str) -> None:
    for step, ((p, states), (q, ref_states)) in enumerate(zip(got, expected)):
        assert_close(p, q, torch.float32, f"{what} step {step}: param")
        assert sorted(states) == sorted(ref_states), f"{what} step {step}: states {sorted(states)}"
        for name in states:
            assert_close(states[name], ref_states[name], torch.float32, f"{what} step {step}: {name}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f][0] in TORCH or f in ("Lion", "LARS")
                                    or f.startswith("LARS-")])
def test_reference_against_torch(family, kind):
    """Adam / AdamW / SGD / Adagrad / RMSprop against torch.optim, Lion against lion-pytorch
    (whose ``sign`` update and decoupled decay are the reference's formula)."""
    if family == "Lion":
        baseline = LionPytorch
    elif family.startswith("LARS"):
        from bitsandbytes.optim.lars import PytorchLARS as baseline
    else:
        baseline = TORCH[FAMILIES[family][0]]
    assert_same(run(family, kind, "reference"), run(family, kind, None, torch_cls=baseline),
                f"{family} {kind}: reference vs {baseline.__module__}")


def check_backend(family: str, kind: str, backend: str) -> None:
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    cases.skip_unless_backend_has(getattr(fusedopt, FAMILIES[family][0]), backend)
    assert_same(run(family, kind, backend), run(family, kind, "reference"), f"{family} {kind}: {backend}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_against_reference(family, kind):
    check_backend(family, kind, "triton")
