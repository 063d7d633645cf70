"""Distributed training on CPU with gloo and 2 processes: DDP, FSDP2 (``fully_shard``, DTensor
params), the global norm across ranks, 8-bit eligibility on the full size, and optimizer state
through ``torch.distributed.checkpoint``.

FSDP2 runs are compared with the same optimizer on an unsharded copy of the model fed the same
data: sharding must not change the result. The layers are sized so that every rank's shard of
each weight is a whole number of 256-element quantization blocks; then even 8-bit states are
blocked identically in both runs.

The cuda backend is not run here: FSDP2 on CUDA tensors needs NCCL (gloo has no all_gather on
GPUs), which needs one GPU per rank. ``tests/test_cuda_gpu.py`` checks its sharded LAMB path on
one GPU, with threads standing in for the ranks.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt
from fusedopt.testing import assert_close, assert_identical

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args):
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, args), nprocs=WORLD, join=True)


def _entry(rank, fn, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()  # both ranks have finished their collectives
    except BaseException:
        dist.destroy_process_group()
        raise  # mp.spawn reports it
    # Passed: leave without tearing gloo down. Its teardown (destroy_process_group, or the
    # destructors at exit) sometimes aborts a rank with "terminate called without an active
    # exception" after everything passed, even behind the barrier (about 1 run in 3 of this
    # file on 2 busy cores). The OS closes the sockets; exit code 0 is what mp.spawn checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _shard(module) -> None:
    """FSDP2 over a CPU mesh of the ranks. fully_shard's default mesh is the accelerator's: on a
    GPU machine a CUDA mesh, where gloo has no all_gather and the ranks would share one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=init_device_mesh("cpu", (WORLD,)))


def _model(seed=0):
    torch.manual_seed(seed)
    # Weight shards: [48, 64] = 3072 and [24, 96] = 2304 elements per rank, 12 and 9 blocks of
    # 256. The second weight's shard is below min_8bit_size=4096 but the weight (4608) is not.
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48))


def _batches(steps=STEPS):
    gen = torch.Generator().manual_seed(123)  # the same data on every rank
    return [(torch.randn(16, 64, generator=gen), torch.randn(16, 48, generator=gen)) for _ in range(steps)]


def _train(model, opt, batches):
    dtype = next(model.parameters()).dtype
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
        loss.backward()
        opt.step()
        opt.zero_grad()


_OPTIMIZERS = {
    "AdamW+clip": lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "LAMB": lambda ps: fusedopt.LAMB(ps, lr=1e-2),
    "AdamW8bit": lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, min_8bit_size=4096),
    # The Triton kernels under TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU and
    # inherited by the workers): LAMB sums its per-tensor norms over the shards between passes.
    "LAMB-triton": lambda ps: fusedopt.LAMB(ps, lr=1e-2, backend="triton"),
    # bf16 params with sharded fp32 master copies (DTensors, like the states).
    "AdamW8bit+master-bf16": lambda ps: fusedopt.AdamW8bit(ps, lr=1e-2, min_8bit_size=4096, master_weights=True,
                                                           max_grad_norm=0.5),
    "Lion8bit+clip": lambda ps: fusedopt.Lion8bit(ps, lr=1e-3, weight_decay=0.1, min_8bit_size=4096, max_grad_norm=0.5),
    # LARS's trust clip needs the norms of the whole param: summed over the shards as LAMB's.
    "LARS": lambda ps: fusedopt.LARS(ps, lr=0.5, momentum=0.9, max_unorm=0.01),
    "LARS8bit+clip": lambda ps: fusedopt.LARS8bit(ps, lr=0.5, momentum=0.9, max_unorm=0.01, min_8bit_size=4096,
                                                   max_grad_norm=0.5),
    "SGD8bit": lambda ps: fusedopt.SGD8bit(ps, lr=0.1, momentum=0.9, nesterov=True, min_8bit_size=4096),
    "Adagrad8bit": lambda ps: fusedopt.Adagrad8bit(ps, lr=0.1, initial_accumulator_value=0.1, min_8bit_size=4096),
    "RMSprop+clip": lambda ps: fusedopt.RMSprop(ps, lr=1e-2, centered=True, momentum=0.5, max_grad_norm=0.5),
}


def _fsdp_matches_unsharded(rank, name):
    make = _OPTIMIZERS[name]
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    sharded, plain = _model().to(dtype), _model().to(dtype)
    _shard(sharded)
    opt_s, opt_p = make(sharded.parameters()), make(plain.parameters())
    _train(sharded, opt_s, _batches())
    _train(plain, opt_p, _batches())
    for (pname, ps), pp in zip(sharded.named_parameters(), plain.parameters()):
        assert_close(ps.full_tensor(), pp, dtype, f"rank {rank} {name} {pname}")
        state = opt_s.state[ps]
        if "master" in name:
            master = state["master_param"]
            assert master.dtype == torch.float32 and master.shape == ps.shape, f"{pname}: master {master}"
            assert_close(master.full_tensor(), opt_p.state[pp]["master_param"], torch.float32, f"{pname} master")
        if "8bit" in name and "weight" in pname:
            # Eligibility is decided on the full size, not the shard.
            first = opt_s._spec.states[0].name
            assert state[first].dtype == torch.uint8, f"{pname}: {state[first].dtype}"
    if opt_p.max_grad_norm is not None:
        assert_close(opt_s.last_grad_norm, opt_p.last_grad_norm, torch.float32, f"rank {rank} last_grad_norm")


# The default tier: one optimizer of each family (LAMB on the triton backend); the rest are `full`.
@pytest.mark.parametrize("name", [n if n in ("AdamW+clip", "LAMB-triton", "Lion8bit+clip", "LARS8bit+clip")
                                  else pytest.param(n, marks=pytest.mark.full) for n in _OPTIMIZERS])
def test_fsdp2_matches_unsharded(name):
    if name.endswith("-triton") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend takes CPU tensors only under TRITON_INTERPRET=1 (set without a GPU)")
    _spawn(_fsdp_matches_unsharded, name)


# Stochastic rounding draws each element's noise from its index in the FULL param: a param
# sharded on dim 0 (FSDP2's Shard(0)) rounds exactly as the unsharded one, bit for bit. Shapes
# with a dim 0 that 2 does not divide: 37 rows are 19 + 18, 5 are 3 + 2, and the last rank
# holds none of the single row of [1, 300]. The grads are set directly (the same full tensor,
# sharded as the param is), so only the optimizer is compared.
_SR_SHAPES = [(37, 24), (1, 300), (5,), (64, 40)]
_SR_OPTIMIZERS = {
    "AdamW": lambda ps, backend: fusedopt.AdamW([{"params": ps, "seed": 3}], lr=1e-2, weight_decay=0.1,
                                                backend=backend, stochastic_rounding=True),
    "Lion": lambda ps, backend: fusedopt.Lion(ps, lr=1e-3, weight_decay=0.1, backend=backend,
                                              stochastic_rounding=True),
}


def _sr_params(sharded: bool):
    torch.manual_seed(0)
    module = torch.nn.Module()
    for k, shape in enumerate(_SR_SHAPES):
        module.register_parameter(f"p{k}", torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16)))
    if sharded:
        _shard(module)
    return list(module.parameters())


def _sr_sharded_matches_unsharded(rank, backend):
    from torch.distributed.tensor import distribute_tensor

    for name, make in _SR_OPTIMIZERS.items():
        sharded, plain = _sr_params(True), _sr_params(False)
        opt_s, opt_p = make(sharded, backend), make(plain, backend)
        gen = torch.Generator().manual_seed(9)  # the same grads on every rank
        for step in range(4):
            for ps, pp in zip(sharded, plain):
                g = torch.randn(pp.shape, generator=gen).to(torch.bfloat16)
                pp.grad = g
                ps.grad = distribute_tensor(g, ps.device_mesh, ps.placements)
                assert ps.grad.to_local().shape == ps.to_local().shape
            opt_s.step()
            opt_p.step()
            for k, (ps, pp) in enumerate(zip(sharded, plain)):
                full = ps.full_tensor()
                where = f"rank {rank} {backend} {name} step {step + 1} param {k} {tuple(pp.shape)}"
                assert torch.equal(full.view(torch.int16), pp.detach().view(torch.int16)), (
                    f"{where}: {int((full != pp).sum())} of {pp.numel()} elements differ from the unsharded run")
        assert sharded[1].to_local().numel() == (300 if rank == 0 else 0)  # the empty shard took part


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.full), "triton"])
def test_fsdp2_stochastic_rounding_matches_unsharded_bit_for_bit(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend takes CPU tensors only under TRITON_INTERPRET=1 (set without a GPU)")
    _spawn(_sr_sharded_matches_unsharded, backend)


def _clip_matches(rank, norm_type):
    sharded, plain = _model(), _model()
    _shard(sharded)
    x, y = _batches(1)[0]
    for m in (sharded, plain):
        (torch.nn.functional.mse_loss(m(x), y) * 100).backward()
    n_t = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, norm_type) for p in plain.parameters()]), norm_type)
    n_s = fusedopt.clip_grad_norm_(sharded.parameters(), 0.1, norm_type)
    n_p = fusedopt.clip_grad_norm_(plain.parameters(), 0.1, norm_type)
    assert_close(n_s, n_p, torch.float32, f"rank {rank} norm")
    assert_close(n_p, n_t, torch.float32, f"rank {rank} norm vs torch")
    for ps, pp in zip(sharded.parameters(), plain.parameters()):
        assert_close(ps.grad.full_tensor(), pp.grad, torch.float32, f"rank {rank} clipped grad")


@pytest.mark.parametrize("norm_type", [2.0, pytest.param(float("inf"), marks=pytest.mark.full)])
def test_clip_grad_norm_across_shards(norm_type):
    _spawn(_clip_matches, norm_type)


def _dcp_round_trip(rank, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    batches = _batches(STEPS + 3)
    # Uninterrupted run.
    ref = _model()
    _shard(ref)
    opt_ref = fusedopt.AdamW8bit(ref.parameters(), lr=1e-2, min_8bit_size=4096)
    _train(ref, opt_ref, batches)
    # Run, save, restore into a fresh model and optimizer, continue.
    first = _model()
    _shard(first)
    opt_first = fusedopt.AdamW8bit(first.parameters(), lr=1e-2, min_8bit_size=4096)
    _train(first, opt_first, batches[:STEPS])
    dcp.save({"model": first.state_dict(), "optim": get_optimizer_state_dict(first, opt_first)}, checkpoint_id=path)

    second = _model(seed=7)  # different init: everything must come from the checkpoint
    _shard(second)
    opt_second = fusedopt.AdamW8bit(second.parameters(), lr=1e-2, min_8bit_size=4096)
    state = {"model": second.state_dict(), "optim": get_optimizer_state_dict(second, opt_second)}
    dcp.load(state, checkpoint_id=path)
    second.load_state_dict(state["model"])
    set_optimizer_state_dict(second, opt_second, state["optim"])
    _train(second, opt_second, batches[STEPS:])
    for (name, a), b in zip(ref.named_parameters(), second.parameters()):
        assert_identical(a.to_local(), b.to_local(), f"rank {rank} {name}")
        for key, value in opt_ref.state[a].items():
            other = opt_second.state[b][key]
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t
            assert_identical(local(other), local(value), f"rank {rank} {name} {key}")


def test_distributed_checkpoint_round_trip_is_exact(tmp_path):
    _spawn(_dcp_round_trip, str(tmp_path / "ckpt"))


def _ddp_matches_torch(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ours, theirs = DDP(_model()), DDP(_model())
    opt_a = fusedopt.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    gen = torch.Generator().manual_seed(rank)  # different data per rank: DDP averages the grads
    batches = [(torch.randn(8, 64, generator=gen), torch.randn(8, 48, generator=gen)) for _ in range(STEPS)]
    _train(ours, opt_a, batches)
    _train(theirs, opt_b, batches)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_close(a, b, torch.float32, f"rank {rank} param")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close(opt_a.state[a][key], opt_b.state[b][key], torch.float32, f"rank {rank} {key}")


def test_ddp_matches_torch_adamw():
    _spawn(_ddp_matches_torch)
