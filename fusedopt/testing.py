"""Tolerances and comparisons shared by the tests and ``python -m fusedopt check``.

One place derives how close two results must be, per dtype (STYLE.md rule 7):

- float64: what the reference gets against torch.optim in float64 (1e-12);
- float32: ``torch.testing.assert_close``'s defaults (rtol 1.3e-6, atol 1e-5);
- bfloat16 / float16: twice the dtype's machine epsilon relative, i.e. a one-ulp rounding
  difference of a 16-bit param in either direction, which is what two correct fp32
  computations of the same update can disagree by once they are rounded to 16 bits.

``compare`` reports where and by how much a comparison missed, instead of a bare False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (2 * torch.finfo(torch.bfloat16).eps, 1e-5),
    torch.float16: (2 * torch.finfo(torch.float16).eps, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for values stored in ``dtype``."""
    return _TOLERANCES[dtype]


@dataclass
class Mismatch:
    """The outcome of a comparison: ``ok``, and where the worst element missed by how much."""

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    worst_index: tuple
    actual: float
    expected: float
    rtol: float
    atol: float
    count: int

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"{self.count} elements out of tolerance"
        return (
            f"{self.name}: {verdict}; max |diff| {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
            f"(rtol {self.rtol:.3g}, atol {self.atol:.3g}); worst at {self.worst_index}: "
            f"{self.actual!r} vs {self.expected!r}"
        )


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
            name: str = "tensor", rtol: float | None = None, atol: float | None = None) -> Mismatch:
    """Compare ``actual`` with ``expected`` at the tolerance of ``dtype`` (default: the
    dtype of ``actual``). NaNs must match NaNs; shapes must match exactly."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerance(dtype or actual.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return Mismatch(name, True, 0.0, 0.0, (), 0.0, 0.0, rtol, atol, 0)
    diff = (a - e).abs()
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    bad = diff > atol + rtol * e.abs()
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    return Mismatch(
        name=name,
        ok=not bool(bad.any()),
        max_abs=float(diff.max()),
        max_rel=float(rel.max()),
        worst_index=index,
        actual=float(a.reshape(-1)[flat]),
        expected=float(e.reshape(-1)[flat]),
        rtol=rtol,
        atol=atol,
        count=int(bad.sum()),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "tensor", rtol: float | None = None, atol: float | None = None) -> None:
    """Raise ``AssertionError`` describing the worst miss when ``actual`` is not close."""
    result = compare(actual, expected, dtype, name, rtol, atol)
    if not result.ok:
        raise AssertionError(str(result))
