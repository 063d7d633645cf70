"""The comparison helpers fail when they should, and say where."""

from __future__ import annotations

import math

import pytest
import torch

from fusedopt.testing import assert_close, assert_identical, tolerance


def test_tolerance_per_dtype():
    assert tolerance(torch.float64) == (1e-12, 1e-12)
    assert tolerance(torch.float32) == (1.3e-6, 1e-5)
    assert tolerance(torch.bfloat16) == (2 * 2.0**-7, 1e-5)
    assert tolerance(torch.float16) == (2 * 2.0**-10, 1e-5)
    with pytest.raises(ValueError, match="int32"):
        tolerance(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_allows_two_ulps_not_three(dtype):
    eps = torch.finfo(dtype).eps
    x = torch.tensor([1.0, 1.5, -3.0], dtype=torch.float64)
    assert_close((x * (1 + 2 * eps)).to(dtype), x, dtype, "two ulps")
    with pytest.raises(AssertionError, match=r"at \(1,\)"):
        assert_close(x * torch.tensor([1.0, 1 + 3 * eps, 1.0], dtype=torch.float64), x, dtype, "three ulps")


def test_report_names_where_and_how_much():
    expected = torch.zeros(3, 4, dtype=torch.float64)
    actual = expected.clone()
    actual[2, 1] = 1e-3
    actual[0, 3] = 2e-5
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, torch.float32, "exp_avg")
    msg = str(info.value)
    assert msg.startswith("exp_avg: 2 of 12 elements differ")
    assert "worst at (2, 1): actual 0.001" in msg and "(100x the allowed)" in msg


@pytest.mark.parametrize(
    "actual,expected,ok",
    [
        (math.nan, math.nan, True),
        (math.inf, math.inf, True),
        (-math.inf, -math.inf, True),
        (1.0, math.nan, False),
        (math.nan, 1.0, False),
        (math.inf, -math.inf, False),
        (1e30, math.inf, False),
        (math.inf, 1e30, False),
    ],
)
def test_non_finite_must_match(actual, expected, ok):
    a, e = torch.tensor([0.5, actual]), torch.tensor([0.5, expected])
    if ok:
        assert_close(a, e, torch.float32, "x")
    else:
        with pytest.raises(AssertionError, match=r"at \(1,\)"):
            assert_close(a, e, torch.float32, "x")


def test_shape_and_dtype_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4), torch.float32, "x")
    with pytest.raises(AssertionError, match="dtype"):
        assert_identical(torch.zeros(3), torch.zeros(3, dtype=torch.float64), "x")
    with pytest.raises(AssertionError, match=r"1 of 3 elements differ; first: at \(2,\)"):
        assert_identical(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0000002]), "x")
    assert_identical(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0]), "nan equals nan")
