"""A NaN gradient that is not skipped (no clipping, no GradScaler), every backend like the reference.

The step runs with it. Adam's param and states go NaN. In 8-bit states a block holding a NaN
gets a NaN absmax (the reference's ``amax(|block|)``; the CUDA backend reduces with ``MaxNan``;
Triton's ``tl.max`` drops NaNs, so its kernels count them), and the whole block dequantizes to
NaN at the next step. Lion's update is ``sign(c)``, and ``torch.sign(nan)`` is 0: the param
stays finite while the moment goes NaN. Compared: params, every fp32 state, absmax, and the
dequantized 8-bit states (a NaN block's codes carry nothing; every backend gives a NaN the
top code, see ``fusedopt.quant``). And a second moment that overflows to inf (grads near 1e30):
kept inf, as torch keeps it, with the params finite. ``test_cuda_emulated.py`` runs the same
checks on the CUDA backend.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import backends, quant
from fusedopt.testing import assert_close

pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1",
)


CASES = [
    ("AdamW8bit", dict(block_size=96, amsgrad=True, min_8bit_size=256)),
    ("Adam8bit", dict(block_size=256, min_8bit_size=256)),
    ("Lion8bit", dict(block_size=128, min_8bit_size=256)),
    ("Lion", dict(weight_decay=0.1)),  # sign(NaN) is 0, as torch.sign: the param stays finite
    ("AdamW", dict(amsgrad=True)),
]


def check_nan_grad_without_skip(cls, kwargs, backend):
    """Three steps on ``backend`` and on the reference; a NaN in one grad at the second step."""
    runs = {}
    for name in ("reference", backend):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(n, generator=gen) for n in (1000, 300)]
        opt = getattr(fusedopt, cls)(params, backend=name, **kwargs)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 1:
                params[0].grad[500] = float("nan")
            opt.step()
        runs[name] = (params, opt)
    (ref, ref_opt), (got, opt) = runs["reference"], runs[backend]
    block = kwargs.get("block_size", 256)
    if cls.startswith("Lion"):
        assert not torch.isnan(ref[0]).any(), "Lion's reference params stay finite (torch.sign(nan) == 0)"
    else:
        at = (500 // block) * block if "8bit" in cls else 500
        assert torch.isnan(ref[0][at]), "the reference's NaN reached the param"
    for i, (p, r) in enumerate(zip(got, ref)):
        assert_close(p, r, torch.float32, f"param {i}")
        for key, value in ref_opt.state[r].items():
            if key.endswith("_absmax"):
                continue
            if value.dtype != torch.uint8:
                assert_close(opt.state[p][key], value, torch.float32, f"param {i} {key}")
                continue
            absmax, ref_absmax = opt.state[p][key + "_absmax"], ref_opt.state[r][key + "_absmax"]
            assert_close(absmax, ref_absmax, torch.float32, f"param {i} {key}_absmax")
            signed = quant.signed_state(key)
            assert_close(quant.dequantize_blockwise(opt.state[p][key], absmax, signed, block),
                         quant.dequantize_blockwise(value, ref_absmax, signed, block), torch.float32,
                         f"param {i} {key} (dequantized)")


@pytest.mark.parametrize("cls, kwargs", CASES, ids=[c for c, _ in CASES])
def test_nan_grad_without_skip(cls, kwargs):
    check_nan_grad_without_skip(cls, kwargs, "triton")


def run_overflow(cls, backend):
    """Three steps of grads near 1e30 (``g^2`` overflows fp32) on 5,000 params: the param and
    the dequantized (or fp32) ``exp_avg_sq`` after each."""
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(5000, generator=gen)
    if backend == "torch":
        opt = getattr(torch.optim, cls.replace("8bit", ""))([p], foreach=False)
    else:
        opt = getattr(fusedopt, cls)([p], backend=backend, min_8bit_size=256)
    out = []
    for _ in range(3):
        p.grad = torch.randn(5000, generator=gen) * 1e30
        opt.step()
        state = opt.state[p]
        v = state["exp_avg_sq"]
        if v.dtype == torch.uint8:
            v = quant.dequantize_blockwise(v, state["exp_avg_sq_absmax"], False, 256)
        out.append((p.detach().clone(), v.clone()))
    return out


def check_second_moment_overflow(cls, backend):
    """``exp_avg_sq`` overflows to inf: torch keeps it inf and the param finite (``m / inf`` is
    0: Adam leaves p, AdamW only decays it). The 8-bit states keep ``inf`` too (``inf / absmax``
    with absmax inf counts as 1: see fusedopt.quant), on every backend; before, the kernels'
    code 0 decoded to ``0 * inf = NaN`` and every param went NaN at the second step."""
    for step, ((p, v), (q, w)) in enumerate(zip(run_overflow(cls, backend), run_overflow(cls, "reference"))):
        assert bool(torch.isinf(w).all()) and bool(torch.isfinite(q).all()), "the reference keeps torch's values"
        assert_close(p, q, torch.float32, f"{backend} step {step}: param")
        assert_close(v, w, torch.float32, f"{backend} step {step}: exp_avg_sq")


@pytest.mark.parametrize("cls", ["Adam8bit", "AdamW8bit"])
def test_second_moment_overflow_reference_is_torch(cls):
    for step, ((p, v), (q, w)) in enumerate(zip(run_overflow(cls, "reference"), run_overflow(cls, "torch"))):
        assert_close(p, q, torch.float32, f"step {step}: param")
        assert_close(v, w, torch.float32, f"step {step}: exp_avg_sq")


@pytest.mark.parametrize("cls", ["Adam8bit", "AdamW8bit"])
def test_second_moment_overflow(cls):
    check_second_moment_overflow(cls, "triton")
