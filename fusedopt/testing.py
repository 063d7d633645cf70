"""Tolerances, derived per dtype in one place, and comparisons that say where and by how much
they missed. Shared by the tests and ``python -m fusedopt check``.

Every test compares through :func:`assert_close` (or :func:`assert_identical` where the result
must be bit-for-bit the same), so a tolerance is never chosen at a call site (``check`` widens
the 8-bit comparisons explicitly through :func:`compare`, saying why where it does):

- ``float64``: ``1e-12`` relative and absolute. The reference computes in float64 when the
  params are float64, so it agrees with a float64 implementation to a few units in the last
  place even after many steps.
- ``float32``: torch's own defaults (``torch.testing.assert_close``: rtol ``1.3e-6``, atol
  ``1e-5``).
- ``bfloat16`` / ``float16``: ``rtol = 2 * eps`` of the dtype (two units in the last place at
  1; atol ``1e-5`` as torch). A value computed in fp32 and stored once in a 16-bit dtype is off
  from its float64 value by at most half a unit in the last place (``eps/2`` relative); torch's
  own 16-bit kernels, which round intermediate results too, stay within about one unit. Twice
  that is the bound (STYLE rule 7). It holds for one rounding, so a 16-bit result is compared
  against a float64 reference started from the *same* inputs (one step at a time), never
  against a float64 trajectory that has drifted for several steps.

Non-finite values must match exactly: NaN where the expected value is NaN, the same infinity
where it is infinite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FIXED = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1.3e-6, 1e-5),
}
_ATOL_16BIT = 1e-5
_SHOWN = 5  # mismatches listed in a failure message


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a value computed in ``dtype`` with a reference."""
    if dtype in _FIXED:
        return _FIXED[dtype]
    if dtype in (torch.bfloat16, torch.float16):
        return 2 * torch.finfo(dtype).eps, _ATOL_16BIT
    raise ValueError(f"no tolerance for dtype {dtype}")


def _where(index: int, shape: torch.Size) -> tuple[int, ...]:
    if len(shape) == 0:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(index), shape))


def _as_float64(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    return x.detach().to("cpu", torch.float64)


@dataclass
class Comparison:
    """The outcome of :func:`compare`: ``ok``, the largest absolute difference, and a message
    that says where and by how much it missed."""

    name: str
    ok: bool
    max_abs: float
    message: str

    def __str__(self) -> str:
        return self.message


def compare(actual, expected, dtype: torch.dtype, name: str, *, rtol: float | None = None,
            atol: float | None = None) -> Comparison:
    """Compare ``|actual - expected| <= atol + rtol * |expected|`` elementwise, with
    ``(rtol, atol) = tolerance(dtype)`` unless given, and describe the result.

    Args:
        actual: the tensor (or number) under test.
        expected: the reference, any floating dtype (compared in float64).
        dtype: whose tolerance applies: the dtype the value was computed and stored in.
        name: what is compared (shown in the message), e.g. ``"step 3 exp_avg[1]"``.

    A failure's message gives the number of mismatches, the worst one (index, actual, expected,
    difference, allowed difference) and the first few others.
    """
    d_rtol, d_atol = tolerance(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        return Comparison(name, False, float("inf"), f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    shape = e.shape
    a, e = a.reshape(-1), e.reshape(-1)

    nan_e, nan_a = torch.isnan(e), torch.isnan(a)
    inf_e = torch.isinf(e)
    finite = ~(nan_e | inf_e)
    allowed = atol + rtol * e.abs()
    diff = (a - e).abs()
    bad = (nan_e != nan_a) | (inf_e & (a != e)) | (finite & ~(diff <= allowed))
    both_finite = finite & ~nan_a & ~torch.isinf(a)
    max_abs = float(diff[both_finite].max()) if bool(both_finite.any()) else 0.0
    if not bool(bad.any()):
        return Comparison(name, True, max_abs, f"{name}: ok, max |diff| {max_abs:.3g} (rtol={rtol:.3g}, atol={atol:.3g})")

    bad_idx = bad.nonzero().flatten()
    # The worst mismatch: a non-finite one first, else the largest multiple of the tolerance.
    excess = torch.where(finite & ~nan_a, diff / allowed, torch.full_like(diff, float("inf")))
    worst = int(bad_idx[excess[bad_idx].argmax()])

    def describe(i: int) -> str:
        return (f"at {_where(i, shape)}: actual {a[i].item():.10g}, expected "
                f"{e[i].item():.10g}, |diff| {diff[i].item():.3g} > allowed {allowed[i].item():.3g}")

    others = "; ".join(describe(int(i)) for i in bad_idx[:_SHOWN])
    return Comparison(name, False, max(max_abs, float(diff[worst])), (
        f"{name}: {bad_idx.numel()} of {e.numel()} elements differ beyond the {dtype} tolerance "
        f"(rtol={rtol:.3g}, atol={atol:.3g}); worst {describe(worst)} "
        f"({excess[worst].item():.3g}x the allowed); first: {others}"
    ))


def assert_close(actual, expected, dtype: torch.dtype, name: str) -> None:
    """Raise ``AssertionError`` with :func:`compare`'s message unless ``actual`` is within the
    tolerance of ``dtype`` of ``expected``."""
    result = compare(actual, expected, dtype, name)
    if not result.ok:
        raise AssertionError(result.message)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Assert same dtype, shape and bits (NaNs included), reporting where they differ."""
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    same = (a == e) | (torch.isnan(a) & torch.isnan(e)) if a.is_floating_point() else a == e
    if bool(same.all()):
        return
    bad_idx = (~same).nonzero().flatten()
    shown = "; ".join(
        f"at {_where(int(i), actual.shape)}: {a[i].item()!r} != {e[i].item()!r}" for i in bad_idx[:_SHOWN]
    )
    raise AssertionError(f"{name}: {bad_idx.numel()} of {e.numel()} elements differ; first: {shown}")
