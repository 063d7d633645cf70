"""A NaN gradient that is not skipped (no clipping, no GradScaler) in 8-bit states.

The step runs with it, and a state block holds a NaN. The reference's absmax is
``amax(|block|)``, NaN for such a block (the CUDA backend's too: it reduces with ``MaxNan``),
so the whole block dequantizes to NaN at the next step. Triton's ``tl.max`` drops NaNs (on a
GPU and in the interpreter): an absmax taken with it stays finite and the block lives on.
Compared here: params, absmax, and the dequantized states (a NaN block's codes carry nothing:
the reference's ``bucketize`` gives a NaN the last code, the kernels' binary search code 0).
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


@pytest.mark.parametrize("cls, kwargs", [  # (Lion: see the report on torch.sign(NaN) == 0)
    ("AdamW8bit", dict(block_size=96, amsgrad=True)),
    ("Adam8bit", dict(block_size=256)),
])
def test_nan_grad_without_skip(cls, kwargs):
    runs = {}
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(n, generator=gen) for n in (1000, 300)]
        opt = getattr(fusedopt, cls)(params, backend=backend, min_8bit_size=256, **kwargs)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 1:
                params[0].grad[500] = float("nan")
            opt.step()
        runs[backend] = (params, opt)
    (ref, ref_opt), (got, opt) = runs["reference"], runs["triton"]
    block = kwargs["block_size"]
    assert torch.isnan(ref[0][(500 // block) * block]), "the reference's NaN block went NaN"
    for i, (p, r) in enumerate(zip(got, ref)):
        assert_close(p, r, torch.float32, f"param {i}")
        for key, value in ref_opt.state[r].items():
            if value.dtype != torch.uint8:
                assert_close(opt.state[p][key], value, torch.float32, f"param {i} {key}")
                continue
            absmax, ref_absmax = opt.state[p][key + "_absmax"], ref_opt.state[r][key + "_absmax"]
            signed = quant.signed_state(key)
            assert_close(quant.dequantize_blockwise(opt.state[p][key], absmax, signed, block),
                         quant.dequantize_blockwise(value, ref_absmax, signed, block), torch.float32,
                         f"param {i} {key} (dequantized)")
