"""Stochastic rounding of bf16 params: unbiased, reproducible, the same in every backend.

With round-to-nearest, an update smaller than half a bf16 ulp is lost: a bf16 param of 1.0
stepped down by 2**-10 stays 1.0 forever. With ``stochastic_rounding=True`` it rounds down to
``1 - 2**-8`` with probability 1/4, so the mean over many elements follows the fp32 value.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import backends, quant, reference
from fusedopt.step import Batch

BACKENDS = ("reference", "triton", "cuda")
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))

N = 1 << 16
LR = 2.0**-10  # a quarter of the bf16 spacing just below 1.0
STEPS = 8


def _skip_unavailable(backend, device):
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")


def _lion_run(backend, device, stochastic_rounding=True, seed=None, steps=STEPS):
    """Lion (wd 0) moves every element by exactly -lr per step when the grads are positive."""
    p = torch.ones(N, dtype=torch.bfloat16, device=device)
    group = {"params": [p]}
    if seed is not None:
        group["seed"] = seed
    opt = fusedopt.Lion([group], lr=LR, backend=backend, stochastic_rounding=stochastic_rounding)
    p.grad = torch.ones(N, dtype=torch.bfloat16, device=device)
    history = []
    for _ in range(steps):
        opt.step()
        history.append(p.detach().clone())
    return history


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_unbiased(device, backend):
    _skip_unavailable(backend, device)
    nearest = _lion_run(backend, device, stochastic_rounding=False)
    assert torch.equal(nearest[-1], torch.ones_like(nearest[-1])), "round-to-nearest should lose every update"
    history = _lion_run(backend, device)
    spacing = 2.0**-8  # of bf16 in [0.5, 1], where every value stays
    previous = torch.ones(N, dtype=torch.float64)
    for k, p in enumerate(history, start=1):
        values = p.double().cpu()
        exact = previous - LR  # this step's fp32 value (exact: a multiple of 2**-10)
        # each element goes to one of the two bf16 values around its own fp32 value
        assert bool(((values - exact).abs() < spacing).all()), f"step {k}: an element left its bf16 neighbours"
        # the mean follows the fp32 trajectory: within 5 standard deviations of a sum of k
        # Bernoulli roundings, each of variance at most spacing**2 / 4
        expected = 1.0 - k * LR
        sigma = spacing * (k / 4 / N) ** 0.5
        mean = float(values.mean())
        assert abs(mean - expected) < 5 * sigma, f"step {k}: mean {mean} vs {expected} (sigma {sigma:.2e})"
        previous = values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_reproducible(device, backend):
    _skip_unavailable(backend, device)
    first = _lion_run(backend, device, steps=2)
    again = _lion_run(backend, device, steps=2)
    other = _lion_run(backend, device, seed=1, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "same seed, same steps: different bits"
    assert not torch.equal(first[0], other[0]), "another seed drew the same noise"
    # the noise changes from step to step: step 2 is not step 1 shifted
    assert not torch.equal(first[1] - first[0], first[0] - 1.0)


@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("device", DEVICES)
def test_same_noise_as_reference(device, backend):
    _skip_unavailable(backend, device)
    expected = _lion_run("reference", device, seed=3, steps=3)
    got = _lion_run(backend, device, seed=3, steps=3)
    for k, (a, b) in enumerate(zip(got, expected), start=1):
        assert torch.equal(a, b), f"step {k}: {int((a != b).sum())} elements rounded differently"


def test_checks():
    with pytest.raises(ValueError, match="float16"):
        fusedopt.AdamW([torch.zeros(3, dtype=torch.float16)], stochastic_rounding=True)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        fusedopt.Lion([torch.zeros(3)], stochastic_rounding="yes")
    with pytest.raises(ValueError, match="seed"):
        fusedopt.LAMB([{"params": [torch.zeros(3)], "seed": 2**32}], stochastic_rounding=True)
    with pytest.raises(TypeError, match="seed"):
        fusedopt.Adam([{"params": [torch.zeros(3)], "seed": 1.5}])


# --------------------------------------------------------------------------------------------
# Shards: element j of a tensor that starts at element ``offset`` of its full param (a dim-0
# shard under FSDP2, ``Batch.offsets``) draws the noise of full-param element ``offset + j``.
# --------------------------------------------------------------------------------------------


def test_a_shard_draws_the_noise_of_its_elements_in_the_full_param():
    t = torch.tensor(5.0)
    full = reference.rounding_noise(7, t, 3, 1000)
    assert torch.equal(reference.rounding_noise(7, t, 3, 600, 400), full[400:])
    assert torch.equal(reference.rounding_noise(7, t, 3, 1000, 0), full)
    high = 2**32 + 17  # the index's high word counts
    assert not torch.equal(reference.rounding_noise(7, t, 3, 100, high), full[17:117])


SHARD_SIZES = (20_011, 4_099, 255)
SHARD_OFFSETS = (3, 2**32 + 8_005, 123_457)  # where each tensor starts in its full param


def lion_shard_batch(block_size: int, offsets):
    """A Lion batch (8-bit states when ``block_size``) of bf16 shards at ``offsets`` in their
    params, one step from fixed random values, as the optimizer would build it."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SHARD_SIZES]
    grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in SHARD_SIZES]
    if block_size:
        m = [torch.full((n,), quant.zero_code(True), dtype=torch.uint8) for n in SHARD_SIZES]
        state = {"exp_avg": m, "exp_avg_absmax": [torch.zeros(quant.num_blocks(n, block_size)) for n in SHARD_SIZES]}
    else:
        state = {"exp_avg": [torch.zeros(n) for n in SHARD_SIZES]}
    group = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, stochastic_rounding=True, seed=5)
    return Batch(params, grads, state, [torch.full((), 2.0) for _ in SHARD_SIZES], group,
                 torch.tensor([1.0, 0.0, 0.0]), quantized=bool(block_size), block_size=block_size or 256,
                 positions=[0, 2, 3], offsets=list(offsets))


def check_shard_offsets(backend: str, block_size: int) -> None:
    """One Lion step over a batch of shards: ``backend`` stores the reference's bits (Lion's
    fp32 values are exact, so the stored bf16 bits are too when the noise is the same), and
    other bits than with the shards' own indices (the check can fail)."""
    module = backends.load(backend)[0]
    out = {}
    for name, offsets in (("reference", SHARD_OFFSETS), (backend, SHARD_OFFSETS), ("local", (0, 0, 0))):
        batch = lion_shard_batch(block_size, offsets)
        (reference if name == "reference" else module).lion(batch)
        out[name] = batch.params
    for i, (got, ref, local) in enumerate(zip(out[backend], out["reference"], out["local"])):
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (
            f"{backend} param {i}: {int((got != ref).sum())} of {got.numel()} elements have other bits")
        assert not torch.equal(got, local), f"{backend} param {i}: the bits of offset 0"


@pytest.mark.parametrize("block_size", [0, 256], ids=["32bit", "8bit"])
def test_shard_offsets_triton(block_size):
    _skip_unavailable("triton", "cpu")
    check_shard_offsets("triton", block_size)
