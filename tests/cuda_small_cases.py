"""Small steps of every cuda kernel, for compute-sanitizer (tests/test_cuda_gpu.py runs this file
under memcheck and racecheck; tests/test_cuda_emulated.py on the emulator): odd sizes, every
family (SGD, Adagrad, RMSprop in their variants too), 8-bit states with both absmax reductions
(block_size 256: warp shuffles; 96: shared memory) and blocks wider than a thread block's span
(4128: swept twice, with stochastic rounding of bf16 params), LAMB over several chunks, LARS with
and without its buffer, LAMB8bit and LARS8bit, the two-pass families also on their sharded path
(two passes apart, the norms summed over the shards in between), clipping and a skipped step,
the norms and the stand-alone quantizer.

Run directly: ``python tests/cuda_small_cases.py`` (needs a GPU).
"""

import math

import torch

import fusedopt
from fusedopt import cuda_backend, distributed

SIZES = (0, 1, 255, 257, 4097, 65537)


def _steps(cls, dtype, kwargs, device) -> None:
    params = [torch.randn(n, device=device, dtype=dtype) for n in SIZES]
    opt = cls(params, backend="cuda", **kwargs)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 1:
            opt.grad_scale = torch.tensor(2.0, device=device)
            opt.found_inf = torch.tensor(1.0, device=device)  # skipped
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        opt.__dict__.pop("found_inf", None)


def run(device: torch.device = torch.device("cuda")) -> None:
    """Every case on ``device`` (CPU tensors: the emulated backend, tests/test_cuda_emulated.py)."""
    torch.manual_seed(0)
    cases = [
        (fusedopt.AdamW, torch.float32, {}),
        (fusedopt.Adam, torch.bfloat16, dict(amsgrad=True, weight_decay=0.1, max_grad_norm=1.0)),
        (fusedopt.Lion, torch.float16, dict(weight_decay=0.1)),
        (fusedopt.LAMB, torch.float32, dict(max_grad_norm=1.0)),
        (fusedopt.AdamW8bit, torch.bfloat16, dict(amsgrad=True, min_8bit_size=256)),
        (fusedopt.Adam8bit, torch.float32, dict(block_size=96, min_8bit_size=256)),
        (fusedopt.Lion8bit, torch.float32, dict(block_size=4096, min_8bit_size=256)),
        (fusedopt.AdamW8bit, torch.bfloat16, dict(block_size=4128, min_8bit_size=256, stochastic_rounding=True)),
        (fusedopt.SGD, torch.float32, dict(lr=0.1)),
        (fusedopt.SGD, torch.bfloat16, dict(lr=0.1, momentum=0.9, nesterov=True, max_grad_norm=1.0)),
        (fusedopt.Adagrad, torch.float16, dict(lr_decay=0.01, weight_decay=0.1)),
        (fusedopt.RMSprop, torch.float32, dict(centered=True, momentum=0.9)),
        (fusedopt.RMSprop, torch.bfloat16, dict(stochastic_rounding=True)),
        (fusedopt.SGD8bit, torch.float32, dict(lr=0.1, momentum=0.9, block_size=96, min_8bit_size=256)),
        (fusedopt.Adagrad8bit, torch.bfloat16, dict(min_8bit_size=256)),
        (fusedopt.RMSprop8bit, torch.float32, dict(centered=True, momentum=0.9, block_size=4128, min_8bit_size=256)),
        # the two-pass families (csrc/two_pass.cuh): LARS with and without its buffer, nesterov
        # (the apply pass reads the grad), the 8-bit forms with narrow and wide blocks
        (fusedopt.LARS, torch.float32, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
        (fusedopt.LARS, torch.bfloat16, dict(lr=0.1, max_grad_norm=1.0, stochastic_rounding=True)),
        (fusedopt.LARS8bit, torch.float16, dict(lr=0.1, momentum=0.9, block_size=96, min_8bit_size=256)),
        (fusedopt.LARS8bit, torch.bfloat16, dict(lr=0.1, momentum=0.9, block_size=4128, min_8bit_size=256,
                                                 stochastic_rounding=True)),
        (fusedopt.LAMB8bit, torch.float32, dict(block_size=256, min_8bit_size=256, max_grad_norm=1.0)),
        (fusedopt.LAMB8bit, torch.bfloat16, dict(block_size=8192, min_8bit_size=256)),
    ]
    for cls, dtype, kwargs in cases:
        _steps(cls, dtype, kwargs, device)
    # the two-pass families' sharded path with one shard (the all-reduce has nothing to add)
    original = distributed.all_reduce_sum
    distributed.all_reduce_sum = lambda groups: lambda x: None
    try:
        _steps(fusedopt.LAMB, torch.bfloat16, {}, device)
        _steps(fusedopt.LARS, torch.float32, dict(lr=0.1, momentum=0.9), device)
        _steps(fusedopt.LAMB8bit, torch.float16, dict(block_size=64, min_8bit_size=256), device)
    finally:
        distributed.all_reduce_sum = original
    tensors = [torch.randn(n, device=device, dtype=d) for n, d in zip(SIZES, (torch.float32, torch.bfloat16) * 3)]
    for norm_type in (1.0, 2.0, math.inf):
        cuda_backend.global_norm(tensors, norm_type)
    ops = cuda_backend._ops()
    book = cuda_backend.codebook(device)
    for block_size in (32, 96, 256, 4096, 8192):
        ops.quantize_blockwise(torch.randn(5000, device=device), book, True, block_size)
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    run()
    print("ok")
