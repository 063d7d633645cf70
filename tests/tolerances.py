"""Tolerances per dtype, in one place (a minimal version; the shared helper replaces it).

fp32: torch's own defaults for float32. bf16/fp16: torch's defaults for those dtypes, which
cover one rounding of a stored value (a bf16 ulp is 2**-8 relative, an fp16 ulp 2**-11), the
most two backends that compute in fp32 and round once to nearest can differ by.
"""

from __future__ import annotations

import torch

_TOLERANCES = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
}


def tolerance(dtype: torch.dtype) -> dict:
    return dict(_TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with the tolerance of
    ``dtype``; the message says where and by how much it missed."""
    tol = tolerance(dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = (a - e).abs()
    bad = ~same_nonfinite & ~(err <= tol["atol"] + tol["rtol"] * e.abs())
    if bool(bad.any()):
        idx = bad.nonzero()[:, 0]
        worst = idx[err[idx].nan_to_num(float("inf")).argmax()]
        raise AssertionError(
            f"{name}: {idx.numel()} of {a.numel()} elements differ beyond rtol={tol['rtol']}, atol={tol['atol']} "
            f"({dtype}); worst at flat index {int(worst)}: {float(a[worst])!r} vs expected {float(e[worst])!r}; "
            f"first at {int(idx[0])}"
        )
