"""The cuda backend on a GPU (every test is marked ``gpu`` and skips without one).

The grid against the reference (dtypes x odd sizes x flags x groups, 8 steps, every state) is
``test_backends.py``, which runs each case for every backend, ``cuda`` included. Here are the
checks that only this backend needs, most of them exact (bit for bit), so that they need no
tolerance: the stand-alone quantizer against ``fusedopt.quant``; 8-bit steps in lockstep with the
reference (codes identical); a step as one launch for 20,000 tensors and equal to the same
bytes in one tensor; no host sync; CUDA-graph capture and replay; a tensor of more than 2**31
elements; compute-sanitizer's memcheck and racecheck over small cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedopt.testing import assert_close

import fusedopt
from fusedopt import backends, build, cuda_backend, quant, testing

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device():
    reason = backends.unavailable_reason("cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"backend 'cuda' on cuda: {reason}")
    return torch.device("cuda")


def _all_state(opt, params):
    return [(i, k, v) for i, p in enumerate(params) for k, v in sorted(opt.state[p].items())]


def assert_identical(opt_a, params_a, opt_b, params_b, what=""):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"{what}param {i} differs"
    for (i, k, a), (_, _, b) in zip(_all_state(opt_a, params_a), _all_state(opt_b, params_b)):
        assert torch.equal(a, b), f"{what}param {i} {k} differs"


# --------------------------------------------------------------------------------------------
# 8-bit: the quantizer, and steps in lockstep with the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [32, 64, 96, 256, 2048, 4096, 4128, 8192])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_codes_are_the_reference_codes(device, block_size, signed):
    gen = torch.Generator().manual_seed(block_size)
    n = 3 * block_size + 37
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 0, n).flip(0)
    if not signed:
        x = x.abs()
    x[block_size: 2 * block_size] = 0  # an all-zero block: absmax 0, the zero code
    # values exactly on the midpoints (absmax 1 in that block): a tie goes to the lower code
    mids = quant.midpoints(signed)
    x[2 * block_size] = 1.0
    x[2 * block_size + 1: 2 * block_size + 1 + min(block_size - 1, 255)] = mids[: min(block_size - 1, 255)]
    # non-finite states (see fusedopt.quant): +-inf in the last block (absmax inf, +-inf / inf
    # counts as +-1), a NaN in the first (absmax NaN)
    x[-3], x[-1], x[5] = float("inf"), -float("inf") if signed else float("inf"), float("nan")
    x = x.to(device)
    codes, absmax = cuda_backend._ops().quantize_blockwise(x, cuda_backend.codebook(device), signed, block_size)
    ref_codes, ref_absmax = quant.quantize_blockwise(x, signed, block_size)
    testing.assert_identical(absmax, ref_absmax, "absmax")
    diff = (codes.long() - ref_codes.long()).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} codes differ, first at {diff[:5].flatten().tolist()}"


EIGHT_BIT = [
    ("AdamW8bit", torch.float32, dict(block_size=256)),
    ("AdamW8bit", torch.bfloat16, dict(block_size=256, amsgrad=True)),
    ("Adam8bit", torch.float16, dict(block_size=96, weight_decay=0.1)),
    ("Adam8bit", torch.float32, dict(block_size=4096, maximize=True)),
    ("Lion8bit", torch.bfloat16, dict(block_size=256, weight_decay=0.1)),
    ("Lion8bit", torch.float32, dict(block_size=32)),
    # blocks wider than a thread block's span (4096), swept twice: one of 4096 + 32 elements
    ("AdamW8bit", torch.bfloat16, dict(block_size=4128, weight_decay=0.1, amsgrad=True)),
    ("Lion8bit", torch.float16, dict(block_size=8192)),
    ("SGD8bit", torch.float32, dict(block_size=256, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD8bit", torch.bfloat16, dict(block_size=64, lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adagrad8bit", torch.float16, dict(block_size=96, lr_decay=0.01, initial_accumulator_value=0.1, maximize=True)),
    ("Adagrad8bit", torch.float32, dict(block_size=4128, weight_decay=0.01)),
    ("RMSprop8bit", torch.float32, dict(block_size=256, centered=True, momentum=0.9, weight_decay=0.01)),
    ("RMSprop8bit", torch.bfloat16, dict(block_size=4128, momentum=0.5, maximize=True)),
    ("RMSprop8bit", torch.float16, dict(block_size=32, centered=True, alpha=0.9)),
    # the two-pass families (no weight decay in LARS: then the params do not enter the buffer)
    ("LAMB8bit", torch.float32, dict(block_size=256, weight_decay=0.1)),
    ("LAMB8bit", torch.bfloat16, dict(block_size=4128)),
    ("LARS8bit", torch.float32, dict(lr=0.1, momentum=0.9, block_size=64)),
    ("LARS8bit", torch.float16, dict(lr=0.1, momentum=0.9, nesterov=True, block_size=8192)),
]
# (No max_grad_norm here: the clip coefficient comes from each backend's own norm, which may
# differ in the last bit, and so would every gradient. The grid covers clipping.)


@pytest.mark.parametrize("cls, dtype, kwargs", EIGHT_BIT, ids=lambda v: getattr(v, "__name__", str(v)))
def test_8bit_steps_in_lockstep_with_the_reference(device, cls, dtype, kwargs):
    """Each of 8 steps starts both backends from the same params and states: the fp32 states,
    hence the codes and absmaxes, come out bit-identical (-fmad=false, the reference's operation
    order); the params within the dtype's tolerance; the step counts equal."""
    sizes = (0, 1, 255, 257, 4097, 65537, 3 * 4096 + 5)
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    params = {b: [p.clone().to(device) for p in init] for b in ("reference", "cuda")}
    opts = {b: getattr(fusedopt, cls)(params[b], backend=b, min_8bit_size=256, **kwargs) for b in params}
    for step in range(8):
        grads = [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]
        for b in params:
            for p, g in zip(params[b], grads):
                p.grad = g.clone()
            opts[b].step()
        ref, got = opts["reference"], opts["cuda"]
        for i, (p, r) in enumerate(zip(params["cuda"], params["reference"])):
            assert_close(p, r, dtype, f"step {step} param {i}")
            for key, value in ref.state[r].items():
                assert torch.equal(got.state[p][key], value), f"step {step} param {i} {key} differs"
        # the next step starts from the same params (states are already equal)
        for p, r in zip(params["cuda"], params["reference"]):
            p.data.copy_(r.data)


# --------------------------------------------------------------------------------------------
# Many tensors, one launch; the same result as the same bytes in one tensor
# --------------------------------------------------------------------------------------------


def _kernel_launches(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for event in prof.events():
        if "fusedopt::" in event.name and "_kernel" in event.name:
            kind = event.name.split("fusedopt::")[1].split("<")[0].split("(")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("cls", ["AdamW", "Lion", "LAMB", "AdamW8bit", "LAMB8bit"])
def test_20000_tensors_step_in_one_launch_as_one_tensor(device, cls):
    count, size = 20_000, 4096
    gen = torch.Generator(device=device).manual_seed(0)
    flat = torch.randn(count * size, device=device, generator=gen)
    grad = torch.randn(count * size, device=device, generator=gen)
    many = [p.clone() for p in flat.view(count, size)]
    one = [flat.clone()]
    opts = [getattr(fusedopt, cls)(ps, backend="cuda") for ps in (many, one)]
    for ps, g in ((many, list(grad.view(count, size))), (one, [grad])):
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
    for _ in range(2):
        for opt in opts:
            opt.step()  # the first step builds the tables
    launches = _kernel_launches(opts[0].step)
    expected = {"LAMB": {"two_pass_norms_kernel": 1, "two_pass_apply_kernel": 1},
                "LAMB8bit": {"two_pass_norms_only_kernel": 1, "quant8_kernel": 1}}.get(
        cls, {"quant8_kernel" if cls.endswith("8bit") else "elementwise_kernel": 1})
    assert launches == expected, launches
    opts[1].step()
    # LAMB's trust ratio is per tensor: there only the moments are the same
    if not cls.startswith("LAMB"):
        assert torch.equal(torch.cat(many), one[0]), "params of 20,000 tensors differ from one tensor's"
    for key, value in opts[1].state[one[0]].items():
        if key != "step":  # 4096-element tensors hold whole 256-element blocks: absmaxes agree too
            assert torch.equal(torch.cat([opts[0].state[p][key] for p in many]), value), key
    assert all(float(opts[0].state[p]["step"]) == 3 for p in many[::997])


# --------------------------------------------------------------------------------------------
# No host sync; CUDA graphs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs", [
    ("AdamW", dict(max_grad_norm=1.0)),
    ("Adam", dict(amsgrad=True, lr=torch.tensor(1e-3))),
    ("Lion", dict(max_grad_norm=1.0)),
    ("LAMB", {}),
    ("AdamW8bit", dict(max_grad_norm=1.0, min_8bit_size=256)),
    ("LARS", dict(lr=0.1, momentum=0.9, max_grad_norm=1.0)),
    ("LAMB8bit", dict(min_8bit_size=256)),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_steps_never_wait_for_the_gpu(device, cls, kwargs):
    if "lr" in kwargs:
        kwargs = {**kwargs, "lr": kwargs["lr"].to(device)}
    params = [torch.randn(n, device=device) for n in (7, 4097, 65537)]
    opt = getattr(fusedopt, cls)(params, backend="cuda", **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the tables (a pinned, asynchronous copy)
    opt.grad_scale = torch.tensor(4.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls, kwargs", [
    ("AdamW", dict(max_grad_norm=1.0)),
    ("LAMB", {}),
    ("Lion8bit", dict(min_8bit_size=256)),
    ("LARS8bit", dict(lr=0.1, momentum=0.9, nesterov=True, min_8bit_size=256)),
])
def test_a_captured_step_replays_as_eager_steps(device, cls, kwargs):
    gen = torch.Generator(device=device).manual_seed(1)
    sizes = (5, 4097, 65537)
    init = [torch.randn(n, device=device, generator=gen) for n in sizes]
    grads = [[torch.randn(n, device=device, generator=gen) for n in sizes] for _ in range(6)]
    runs = {}
    for mode in ("eager", "graph"):
        params = [p.clone() for p in init]
        grad_buffers = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, grad_buffers):
            p.grad = g
        opt = getattr(fusedopt, cls)(params, backend="cuda", **kwargs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(3):  # warm-up: tables built
                for b, g in zip(grad_buffers, grads[k]):
                    b.copy_(g)
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = None
        if mode == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for k in range(3, 6):
            for b, g in zip(grad_buffers, grads[k]):
                b.copy_(g)
            graph.replay() if graph is not None else opt.step()
        torch.cuda.synchronize()
        runs[mode] = (opt, params)
    assert_identical(*runs["graph"], *runs["eager"], what="replayed vs eager: ")


# --------------------------------------------------------------------------------------------
# int64 offsets
# --------------------------------------------------------------------------------------------


@pytest.mark.large
def test_a_tensor_over_2_31_elements_is_updated_to_its_last_element(device):
    n = 2**31 + 4096 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free device memory")
    big = torch.randn(n, device=device, dtype=torch.bfloat16)
    big.grad = torch.randn(n, device=device, dtype=torch.bfloat16)
    tail = 8192 + 3
    small = big[-tail:].clone()
    small.grad = big.grad[-tail:].clone()
    head = big[:tail].clone()
    head.grad = big.grad[:tail].clone()
    opts = [fusedopt.Lion(ps, backend="cuda", weight_decay=0.1) for ps in ([big], [small], [head])]
    for _ in range(2):
        for opt in opts:
            opt.step()
    # elementwise math: each element's result depends on nothing but its own inputs
    assert torch.equal(big[-tail:], small) and torch.equal(big[:tail], head)
    assert torch.equal(opts[0].state[big]["exp_avg"][-tail:], opts[1].state[small]["exp_avg"])


# --------------------------------------------------------------------------------------------
# Sharded LAMB (FSDP2's path) without a process group
# --------------------------------------------------------------------------------------------


def _sharded_lamb_lockstep(device, dtype, sizes, steps, shards, check, cls="LAMB", align=1, **kwargs):
    """LAMB (or another two-pass class ``cls``) over ``shards`` shards of every param (contiguous
    slices, each in its own optimizer and thread, as ranks hold them; each cut rounded down to a
    multiple of ``align``) with an all-reduce that sums each tensor's norms over the threads, and
    the reference over the whole params, in lockstep: each step runs on every rank, then on the
    reference, then ``check(step, opts, pieces, ref, ref_params)`` compares them, and the next
    step starts every rank from the reference's params (re-synced: a last-bit difference of the
    trust ratio, whose sums run in another order than the reference's, may round a 16-bit param
    to its neighbour, and each step is compared on its own)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fusedopt import distributed

    gen = torch.Generator().manual_seed(11)
    whole = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(steps)]
    cuts = [[n * r // shards // align * align if r < shards else n for r in range(shards + 1)] for n in sizes]
    pieces = [[w[c[r]:c[r + 1]].clone().to(device) for w, c in zip(whole, cuts)] for r in range(shards)]
    ref_params = [w.clone().to(device) for w in whole]
    ref = getattr(fusedopt, cls)(ref_params, backend="reference", **kwargs)
    opts = [getattr(fusedopt, cls)(pieces[r], backend="cuda", **kwargs) for r in range(shards)]

    rank = threading.local()
    barrier = threading.Barrier(shards, timeout=120)
    deposited: list = [None] * shards
    calls = [0] * shards

    def all_reduce(x):  # an in-place sum over the "ranks", as dist.all_reduce(SUM) makes it
        calls[rank.r] += 1
        deposited[rank.r] = x
        barrier.wait()  # every rank's moments pass is enqueued before its norms are read
        total = sum(deposited[1:], deposited[0].clone())
        barrier.wait()  # every rank has enqueued its sum before any x is overwritten
        x.copy_(total)

    def rank_step(r, k):
        rank.r = r
        for p, g, c in zip(pieces[r], grads[k], cuts):
            p.grad = None if (k == 2 and p is pieces[r][1]) else g[c[r]:c[r + 1]].clone().to(device)
        opts[r].step()
        torch.cuda.synchronize()

    original = distributed.all_reduce_sum
    with ThreadPoolExecutor(shards) as pool:  # every rank of a step runs at once (the barrier)
        for k in range(steps):
            distributed.all_reduce_sum = lambda groups: all_reduce  # the ranks' steps only
            try:
                for f in [pool.submit(rank_step, r, k) for r in range(shards)]:
                    f.result()
            finally:
                distributed.all_reduce_sum = original
            for i, (p, g) in enumerate(zip(ref_params, grads[k])):
                p.grad = None if (k == 2 and i == 1) else g.to(device)
            ref.step()
            check(k, opts, pieces, ref, ref_params)
            for r in range(shards):
                for p, w, c in zip(pieces[r], ref_params, cuts):
                    p.data.copy_(w.data[c[r]:c[r + 1]])
    # one all-reduce per batch and step on every rank (8-bit: the 8-bit batch and the fp32 one)
    batches = 2 if cls.endswith("8bit") else 1
    assert calls == [steps * batches] * shards, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shards", [1, 2])
def test_sharded_lamb_sums_norms_over_the_shards(device, dtype, shards):
    """The cuda backend's sharded path (lamb_moments_, the all-reduce, lamb_apply_) against the
    reference on the whole tensors, step by step from the same params: the trust ratio is the
    whole tensor's, not the shard's (a shard's would move the params far beyond the tolerance).
    One shard runs the split path with an all-reduce that changes nothing."""
    sizes = (1, 255, 257, 4097, 65537 + 3 * 4096, 2 * 65536 + 5)  # one param a shard cannot split evenly

    def check(step, opts, pieces, ref, ref_params):
        for i, r in enumerate(ref_params):
            what = f"step {step} param {i}"
            assert_close(torch.cat([pieces[k][i] for k in range(shards)]), r, dtype, what)
            for key in ("exp_avg", "exp_avg_sq"):
                got = torch.cat([opts[k].state[pieces[k][i]][key] for k in range(shards)])
                assert_close(got, ref.state[r][key], torch.float32, f"{what} {key}")
            for k in range(shards):
                assert float(opts[k].state[pieces[k][i]]["step"]) == float(ref.state[r]["step"]), f"{what} step"

    _sharded_lamb_lockstep(device, dtype, sizes, 7, shards, check, weight_decay=0.1)


SHARDED_TWO_PASS = [
    ("LARS", torch.float32, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("LARS", torch.bfloat16, dict(lr=0.1, weight_decay=1e-2)),  # no momentum: u = d
    ("LARS8bit", torch.float32, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("LAMB8bit", torch.bfloat16, dict(weight_decay=0.1)),
]


@pytest.mark.parametrize("cls, dtype, kwargs", SHARDED_TWO_PASS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("shards", [1, 2])
def test_sharded_two_pass_sums_norms_over_the_shards(device, cls, dtype, kwargs, shards):
    """LARS and the 8-bit two-pass classes on the sharded path (the norms pass, the all-reduce,
    the apply pass) against the reference on the whole tensors, as the LAMB test above. 8-bit:
    the shards are cut at whole 64-element blocks (block_size 64), so the shards' blocks are the
    whole tensor's and the codes and absmaxes must be equal (each step starts from the same
    params: the same fp32 states are quantized)."""
    sizes = (1, 255, 257, 4097, 65537 + 3 * 4096, 2 * 65536 + 5)
    eight_bit = cls.endswith("8bit")
    if eight_bit:
        kwargs = dict(kwargs, block_size=64, min_8bit_size=64)

    def check(step, opts, pieces, ref, ref_params):
        for i, r in enumerate(ref_params):
            what = f"step {step} param {i}"
            assert_close(torch.cat([pieces[k][i] for k in range(shards)]), r, dtype, what)
            for key, value in ref.state[r].items():
                shard_values = [opts[k].state[pieces[k][i]][key] for k in range(shards)]
                if key == "step":
                    assert all(float(v) == float(value) for v in shard_values), f"{what} step"
                    continue
                got = torch.cat([v.reshape(-1) for v in shard_values])
                if eight_bit and value.numel() and (value.dtype == torch.uint8 or key.endswith("_absmax")):
                    assert torch.equal(got, value.reshape(-1)), f"{what} {key} differs"
                else:
                    assert_close(got, value.reshape(-1), torch.float32, f"{what} {key}")

    _sharded_lamb_lockstep(device, dtype, sizes, 7, shards, check, cls=cls, align=64 if eight_bit else 1, **kwargs)


# --------------------------------------------------------------------------------------------
# compute-sanitizer
# --------------------------------------------------------------------------------------------


def _sanitizer() -> str | None:
    home = build.find_cuda_home()
    candidates = [home / "bin" / "compute-sanitizer", home / "compute-sanitizer" / "compute-sanitizer"] if home else []
    found = shutil.which("compute-sanitizer")
    candidates += [Path(found)] if found else []
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(device, tool):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    cuda_backend.library_path()  # built before the sanitized run, which only loads it
    script = Path(__file__).with_name("cuda_small_cases.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR SUMMARY: 0 errors" in out, out[-6000:]
