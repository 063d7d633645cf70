"""The one hint the Triton kernels give the compiler: ``ALIGNED`` (``common.load_ptr``'s
``tl.multiple_of(ptr, 16)``, which lets full chunks use 16-byte vector accesses).

A false hint is silent in the interpreter (it ignores hints) and wrong on a GPU (misaligned
vector accesses: a fault, or wrong data). A launch passes ``ALIGNED=tab.aligned``, which the
table computes from the columns its launcher names as vector streams; every stream the kernel
reads with ``ALIGNED`` must be among them. Here one stream at a time (param, grad, each state,
8-bit codes) is moved to an address that is not a multiple of 16 bytes: the table must then
say ``aligned=False``, and the step must still match the reference.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import backends
from fusedopt.testing import assert_close

pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu")) is not None,
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1",
)

SIZES = (16384 + 37, 300)  # a full chunk (the vector path) and tails


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


CASES = [
    ("AdamW", dict(amsgrad=True), "adam", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ("Lion", {}, "lion", ["param", "grad", "exp_avg"]),
    ("LAMB", {}, "lamb", ["param", "grad", "exp_avg", "exp_avg_sq"]),
    ("AdamW8bit", dict(min_8bit_size=256, amsgrad=True), "adam8bit",
     ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    ("Lion8bit", dict(min_8bit_size=256), "lion8bit", ["param", "grad", "exp_avg"]),
]


@pytest.mark.parametrize("cls, kwargs, name, stream",
                         [pytest.param(c, k, n, s, id=f"{c}-{s}") for c, k, n, streams in CASES for s in streams])
def test_an_unaligned_stream_turns_the_hint_off(cls, kwargs, name, stream):
    gen = torch.Generator().manual_seed(11)
    base = [torch.randn(n, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(3)]
    runs = {}
    for backend in ("reference", "triton"):
        params = [p.clone() for p in base]
        opt = getattr(fusedopt, cls)(params, backend=backend, **kwargs)
        for step, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            if step == 1:  # after the first step (the states exist): one stream moved
                if stream == "param":
                    params[0].data = _unaligned(params[0].data)
                elif stream == "grad":
                    params[0].grad = _unaligned(params[0].grad)
                else:
                    opt.state[params[0]][stream] = _unaligned(opt.state[params[0]][stream])
                    # A step reuses the last step's batches (and their state lists) while the
                    # grads keep their layout: only a new plan sees a replaced state tensor.
                    opt._plans.clear()
            opt.step()
            if backend == "triton":
                tables = [cache[name][1] for cache in opt._caches.values() if name in cache]
                assert len(tables) == 1, f"expected one {name!r} table, found {len(tables)}"
                # the grad is unaligned at step 1 only (each step brings new grads)
                unaligned = step == 1 if stream == "grad" else step >= 1
                assert tables[0].aligned == (not unaligned), (
                    f"step {step}: table.aligned={tables[0].aligned} with {stream} "
                    f"{'un' if unaligned else ''}aligned")
        runs[backend] = (params, opt)
    (ref, ref_opt), (got, opt) = runs["reference"], runs["triton"]
    for i, (p, r) in enumerate(zip(got, ref)):
        assert_close(p, r, torch.float32, f"param {i}")
        for key, value in ref_opt.state[r].items():
            if value.dtype == torch.uint8:
                assert torch.equal(opt.state[p][key], value), f"param {i} {key} codes"
            else:
                assert_close(opt.state[p][key], value, torch.float32, f"param {i} {key}")


def test_an_unaligned_grad_turns_the_norm_hint_off():
    from fusedopt.kernels import norm

    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, generator=gen) for n in SIZES]
    for unaligned in (False, True):
        tensors = [_unaligned(grads[0]) if unaligned else grads[0], grads[1]]
        got = norm.global_norm(tensors, 2.0)
        (_, tab), = norm._tables(tensors)
        assert tab.aligned == (not unaligned)
        assert_close(got, fusedopt.reference.global_norm([t.double() for t in tensors], 2.0), torch.float32, "norm")
