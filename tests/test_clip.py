"""fusedopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt.testing import assert_close, assert_identical

SHAPES = [(255,), (16, 17), (1,), (4097,), (3, 5, 7)]
NORMS = [2.0, math.inf, 1.0, 3.0]


def _pair(dtype, shapes=SHAPES, seed=0, grad_scale=1.0, no_grad=()):
    """Two identical lists of params with the same random grads (None at ``no_grad``)."""
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = [], []
    for i, s in enumerate(shapes):
        p = torch.randn(s, generator=gen).to(dtype)
        g = None if i in no_grad else (torch.randn(s, generator=gen) * grad_scale).to(dtype)
        for out in (ours, theirs):
            q = p.clone().requires_grad_()
            q.grad = None if g is None else g.clone()
            out.append(q)
    return ours, theirs


def _assert_same_clip(ours, theirs, norm, tnorm, dtype, what):
    assert norm.dtype == tnorm.dtype, f"{what}: returned dtype {norm.dtype}, torch {tnorm.dtype}"
    assert norm.shape == tnorm.shape == ()
    assert_close(norm, tnorm, dtype, f"{what}: total norm")
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if q.grad is None:
            assert p.grad is None
            continue
        assert p.grad.dtype == q.grad.dtype
        assert_close(p.grad, q.grad, dtype, f"{what}: grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", NORMS, ids=lambda n: f"p{n}")
@pytest.mark.parametrize("foreach", [None, True, False], ids=lambda f: f"foreach{f}")
@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clips", "no-clip"])
def test_matches_torch(dtype, norm_type, foreach, max_norm):
    ours, theirs = _pair(dtype, grad_scale=3.0, no_grad=(2,))
    norm = fusedopt.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert (float(tnorm) > max_norm) == (max_norm == 1.0)  # the two cases do what they say
    _assert_same_clip(ours, theirs, norm, tnorm, dtype, f"p={norm_type}")
    if max_norm > float(tnorm):
        # No clipping: the grads are untouched (multiplied by exactly 1).
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if p.grad is not None:
                assert_identical(p.grad, q.grad, f"unclipped grad {i}")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0], ids=lambda n: f"p{n}")
def test_empty_tensor_in_list(norm_type):
    ours, theirs = _pair(torch.float32, shapes=[(10,), (0,), (4, 3)], grad_scale=5.0)
    norm = fusedopt.clip_grad_norm_(ours, 1.0, norm_type)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, "with an empty tensor")


def test_single_tensor_and_generator():
    ours, theirs = _pair(torch.float32, shapes=[(300,)], grad_scale=2.0)
    norm = fusedopt.clip_grad_norm_(ours[0], 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs[0], 0.5)
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, "single tensor")
    ours, theirs = _pair(torch.float32, grad_scale=2.0)
    norm = fusedopt.clip_grad_norm_((p for p in ours), 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_((p for p in theirs), 0.5)
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, "generator")


def test_no_grads_returns_zero_like_torch():
    ours, theirs = _pair(torch.float32, no_grad=range(len(SHAPES)))
    norm = fusedopt.clip_grad_norm_(ours, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert_identical(norm, tnorm, "norm without grads")


def test_mixed_dtypes_return_the_promoted_dtype():
    ours, theirs = _pair(torch.float32, shapes=[(10,), (20,)], grad_scale=4.0)
    for out in (ours, theirs):
        p = torch.randn(7, dtype=torch.float64, requires_grad=True)
        p.grad = torch.linspace(-3, 3, 7, dtype=torch.float64)
        out.append(p)
    norm = fusedopt.clip_grad_norm_(ours, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.dtype == tnorm.dtype == torch.float64
    # Accumulated in float64 (one grad is float64), the fp32 grads then scaled in fp32.
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, "float32 + float64")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0], ids=lambda n: f"p{n}")
def test_nonfinite_grads_like_torch(bad, norm_type):
    """Without error_if_nonfinite, the same non-finite norm and the same grads as torch."""
    ours, theirs = _pair(torch.float32)
    for out in (ours, theirs):
        out[3].grad[17] = bad
    norm = fusedopt.clip_grad_norm_(ours, 1.0, norm_type)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not math.isfinite(float(tnorm))
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, f"grad with {bad}")


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("foreach", [None, False], ids=lambda f: f"foreach{f}")
def test_error_if_nonfinite_raises_and_leaves_grads(bad, foreach):
    ours, theirs = _pair(torch.float32, grad_scale=3.0)
    ours[1].grad[0, 0] = bad
    theirs[1].grad[0, 0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True, foreach=foreach)
    before = [p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError, match=r"total norm of order 2.0 .* non-finite"):
        fusedopt.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, foreach=foreach)
    for i, (p, g) in enumerate(zip(ours, before)):
        assert_identical(p.grad, g, f"grad {i} after the error")
    # A finite norm with error_if_nonfinite=True clips as usual.
    ours, theirs = _pair(torch.float32, grad_scale=3.0)
    norm = fusedopt.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    _assert_same_clip(ours, theirs, norm, tnorm, torch.float32, "finite with error_if_nonfinite")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=lambda n: f"p{n}")
def test_foreach_true_and_false_agree(dtype, norm_type):
    a, b = _pair(dtype, grad_scale=3.0)
    na = fusedopt.clip_grad_norm_(a, 1.0, norm_type, foreach=True)
    nb = fusedopt.clip_grad_norm_(b, 1.0, norm_type, foreach=False)
    assert_identical(na, nb, "norm")
    for i, (p, q) in enumerate(zip(a, b)):
        assert_identical(p.grad, q.grad, f"grad {i}")


def test_bad_arguments():
    ours, _ = _pair(torch.float32)
    before = [p.grad.clone() for p in ours]
    with pytest.raises(ValueError, match="max_norm: -1.0"):
        fusedopt.clip_grad_norm_(ours, -1.0)
    with pytest.raises(TypeError, match="foreach: 'yes'"):
        fusedopt.clip_grad_norm_(ours, 1.0, foreach="yes")
    with pytest.raises(ValueError, match="backend: 'gpu'"):
        fusedopt.clip_grad_norm_(ours, 1.0, backend="gpu")
    for i, (p, g) in enumerate(zip(ours, before)):
        assert_identical(p.grad, g, f"grad {i}")


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_empty_gradient_adds_nothing_even_to_the_inf_norm(norm_type):
    # torch refuses the inf-norm of a list holding an empty tensor (max has no identity);
    # an empty tensor's norm is 0, so fusedopt skips it: the result is the others' norm.
    torch.manual_seed(0)
    empty = torch.zeros(0, requires_grad=True)
    full = torch.randn(37, requires_grad=True)
    empty.grad, full.grad = torch.zeros(0), torch.randn(37) * 3
    unclipped = full.grad.clone()
    norm = fusedopt.clip_grad_norm_([empty, full], 1.0, norm_type, backend="reference")
    assert_close(norm, torch.linalg.vector_norm(unclipped, norm_type), torch.float32, "norm")
    assert_close(full.grad, unclipped * (1.0 / (float(norm) + 1e-6)), torch.float32, "clipped grad")
    assert float(fusedopt.clip_grad_norm_([empty], 1.0, norm_type, backend="reference")) == 0.0
