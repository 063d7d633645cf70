"""Whether a backend can run a step is decided in ``fusedopt.backends.resolve``: an explicit
backend that cannot (an 8-bit block size, a norm order, a dtype) raises there with the reason,
before anything changes; ``auto`` picks one that can; no backend hands a step to another.

``auto`` on CPU tensors always picks the reference, so its choice on a CUDA device is tested
by calling ``resolve`` with a ``cuda`` device and the backends' ``available`` patched: the
resolution logic runs without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedopt
from fusedopt import backends, cuda_backend
from fusedopt.testing import assert_close

triton_backend = pytest.importorskip("fusedopt.kernels.backend")

CUDA = torch.device("cuda", 0)
needs_interpreter = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")


@pytest.fixture
def on_cuda(monkeypatch):
    """Both fused backends 'available' on CUDA devices, ``auto`` trying Triton, then cuda."""
    for module in (triton_backend, cuda_backend):
        monkeypatch.setattr(module, "available", lambda device: None)
    monkeypatch.setitem(backends.AUTO_ORDER, "adam8bit", ("triton", "cuda", "reference"))
    monkeypatch.setitem(backends.AUTO_ORDER, "norm", ("triton", "cuda", "reference"))


@needs_interpreter
@pytest.mark.parametrize("cls", [fusedopt.AdamW8bit, fusedopt.Lion8bit], ids=lambda c: c.__name__)
def test_explicit_triton_refuses_a_block_over_its_largest_before_anything_changes(cls):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen) for n in (300, 8193)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in params]
    opt = cls([{"params": params[:1]}, {"params": params[1:], "block_size": 8192}], min_8bit_size=256,
              backend="triton")
    refused = r"backend 'triton' cannot run this \w+8bit step: block_size=8192 is over 4096"
    with pytest.raises(RuntimeError, match=refused):
        opt.step()
    assert not opt.state, "states were made before the step was refused"
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    # the same optimizer on the reference runs (the refusal was the backend's, not the input's)
    opt.backend = "reference"
    opt.step()
    assert not torch.equal(params[1], before[1])


def test_auto_picks_a_backend_that_takes_the_block_size(on_cuda):
    def pick(block_size, kind="adam8bit"):
        return backends.resolve("auto", CUDA, kind=kind, block_size=block_size).NAME

    assert pick(4096) == "triton"
    assert pick(8192) == "cuda"  # the cuda kernels take any block size
    backends.AUTO_ORDER["adam8bit"] = ("triton", "reference")
    assert pick(8192) == "reference"
    assert pick(8192, "adam") == "triton"  # the block size concerns 8-bit steps only
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run this lion8bit step: block_size=8192"):
        backends.resolve("triton", CUDA, kind="lion8bit", block_size=8192)


def test_auto_picks_a_backend_that_takes_the_norm(on_cuda):
    def pick(norm_type, dtype=torch.float32):
        tensors = [torch.zeros(3, dtype=dtype, device="meta")]
        return backends.resolve("auto", CUDA, tensors, "norm", norm_type=norm_type).NAME

    assert pick(2.0) == pick(1.0) == pick(math.inf) == "triton"
    assert pick(3.0) == "reference"  # neither fused backend takes norm_type 3
    assert pick(2.0, torch.float64) == "reference"
    for name in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=rf"backend '{name}' cannot run this norm step: .*not 3\.0"):
            backends.resolve(name, CUDA, kind="norm", norm_type=3.0)


@needs_interpreter
@pytest.mark.parametrize("norm_type, dtype, reason", [(3.0, torch.float32, "norm_type 1, 2 or inf, not 3.0"),
                                                      (2.0, torch.float64, "not torch.float64")],
                         ids=["p3", "float64"])
def test_explicit_triton_clip_refuses_what_it_cannot_compute(norm_type, dtype, reason):
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=gen, dtype=dtype, requires_grad=True) for n in (5, 257)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 10
    grads = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match=rf"backend 'triton' cannot run .*{reason}"):
        fusedopt.clip_grad_norm_(params, 1.0, norm_type, backend="triton")
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    # auto (the reference on CPU) computes it, as torch does
    theirs = [p.detach().clone().requires_grad_() for p in params]
    for t, g in zip(theirs, grads):
        t.grad = g.clone()
    norm = fusedopt.clip_grad_norm_(params, 1.0, norm_type)
    assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type), dtype, "norm")
    for p, t in zip(params, theirs):
        assert_close(p.grad, t.grad, dtype, "clipped grad")


@pytest.mark.parametrize("module, norm_type, dtype", [(triton_backend, 3.0, torch.float32),
                                                     (triton_backend, 2.0, torch.float64),
                                                     (cuda_backend, 3.0, torch.float32)],
                         ids=["triton-p3", "triton-float64", "cuda-p3"])
def test_a_backend_reached_with_a_norm_it_cannot_compute_raises(module, norm_type, dtype):
    """Resolution never sends these here; reached anyway, the backend raises (no fallback to
    the reference). The cuda op refuses float64 tensors itself (test_cuda_backend.py)."""
    tensors = [torch.randn(7, generator=torch.Generator().manual_seed(5), dtype=dtype)]
    with pytest.raises(RuntimeError, match="cannot compute this norm"):
        module.global_norm(tensors, norm_type)


@needs_interpreter
def test_a_clipping_step_asks_for_the_norm(monkeypatch):
    """``max_grad_norm`` makes the step compute the 2-norm on the batch's backend: resolution
    asks for it, and an explicit backend that cannot compute it raises at the step."""
    real = triton_backend.unsupported_step

    def no_norms(kind, *, block_size=None, norm_type=None):
        return "no norms here" if norm_type is not None else real(kind, block_size=block_size)

    monkeypatch.setattr(triton_backend, "unsupported_step", no_norms)
    p = torch.randn(33, generator=torch.Generator().manual_seed(6))
    p.grad = torch.randn_like(p)
    before = p.clone()
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this adam step: no norms here"):
        fusedopt.AdamW([p], max_grad_norm=1.0, backend="triton").step()
    assert torch.equal(p, before)
    fusedopt.AdamW([p], backend="triton").step()  # no clipping, no norm asked for
    assert not torch.equal(p, before)


@needs_interpreter
def test_clipping_takes_each_backends_norm_of_its_own_batches(monkeypatch):
    """``auto`` on a GPU puts an fp32 batch on Triton and a float64 batch of the same device on
    the reference; the clip's global norm must ask each backend for the norm of the grads it was
    resolved for (it used to hand every grad of the device to the first batch's backend, and
    Triton refused the float64 ones). ``auto`` on a GPU is stood in for on CPU tensors by a
    resolve that tries Triton, then the reference, as ``AUTO_ORDER`` does."""
    resolve = backends.resolve

    def auto_like_cuda(backend, device, tensors=(), kind="adam", **needs):
        tensors = list(tensors)
        try:
            return resolve("triton", device, tensors, kind, **needs)
        except RuntimeError:
            return resolve("reference", device, tensors, kind, **needs)

    monkeypatch.setattr(backends, "resolve", auto_like_cuda)
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(100, generator=gen))
    b = torch.nn.Parameter(torch.randn(100, generator=gen, dtype=torch.float64))
    ta, tb = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    opt = fusedopt.AdamW([a, b], lr=1e-2, max_grad_norm=1.0)
    ref = fusedopt.AdamW([ta, tb], lr=1e-2, max_grad_norm=1.0, backend="reference")
    for _ in range(3):
        ga, gb = torch.randn(100, generator=gen) * 10, torch.randn(100, generator=gen, dtype=torch.float64) * 10
        a.grad, b.grad, ta.grad, tb.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        ref.step()
    kinds = sorted(backend.NAME for _, _, backend in opt._plans[0].entries)
    assert kinds == ["reference", "triton"]
    assert_close(opt.last_grad_norm, ref.last_grad_norm, torch.float32, "last_grad_norm")
    assert_close(a, ta, torch.float32, "fp32 param")
    # The clip coefficient is an fp32 device scalar (fusedopt.scalars) in both runs, and the
    # partial norms are summed in fp32 here: the float64 param's update is good to fp32.
    assert_close(b, tb, torch.float32, "float64 param")
