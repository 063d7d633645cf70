"""The 8-bit block-wise quantizer (fusedopt.quant) against bitsandbytes and a brute-force search."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import create_dynamic_map

from fusedopt import quant
from fusedopt.testing import assert_identical

SIZES = [0, 1, 255, 256, 257, 4097]
BLOCK_SIZES = [32, 96, 256, 2048, 4096]
SIGNED = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])


def _data(n, signed, seed=0):
    """Random values over several decades within each block (never zeros)."""
    gen = torch.Generator().manual_seed(seed + n)
    x = torch.randn(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen))
    return x if signed else x.abs()


def _nearest(normed, signed):
    """Brute force: the index of the codebook value nearest to each of ``normed`` (fp32), and
    whether the two nearest values are (almost) equally near, a tie either answer is right for."""
    code = quant.dynamic_map(signed)
    dist = (normed[:, None] - code[None, :]).abs()
    two = dist.topk(2, dim=1, largest=False)
    tie = (two.values[:, 1] - two.values[:, 0]) <= 1e-6 * two.values[:, 1].clamp_min(1e-30)
    return two.indices[:, 0], tie


@SIGNED
def test_codebook_equals_bitsandbytes(signed):
    code = quant.dynamic_map(signed)
    assert_identical(code, create_dynamic_map(signed=signed), f"dynamic map (signed={signed})")
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert bool((code[1:] > code[:-1]).all()), "codebook not strictly increasing"
    assert float(code[quant.zero_code(signed)]) == 0.0 and float(code[-1]) == 1.0


@SIGNED
def test_midpoints(signed):
    code = quant.dynamic_map(signed)
    mids = quant.midpoints(signed)
    expected = (code[:-1] + code[1:]) * 0.5
    if not signed:
        # A positive second moment never rounds to zero (see fusedopt/quant.py).
        expected[0] = 0.0
    assert_identical(mids, expected, "midpoints")
    assert mids.shape == (255,) and bool((mids[1:] > mids[:-1]).all())


@SIGNED
@pytest.mark.parametrize("block_size", [32, 256, 4096])
def test_codes_are_round_to_nearest(signed, block_size):
    """Each code is the nearest codebook value of x / absmax (computed in fp32), ties aside,
    except that in the unsigned map a positive value never gets the zero code."""
    n = 3 * block_size + 17
    x = _data(n, signed)
    code = quant.dynamic_map(signed)
    codes, absmax = quant.quantize_blockwise(x, signed, block_size)
    blocks = torch.arange(n) // block_size
    normed = x / absmax[blocks]
    nearest, tie = _nearest(normed, signed)
    expected = nearest
    if not signed:
        expected = torch.where((normed > 0) & (nearest == 0), torch.ones_like(nearest), nearest)
    keep = ~tie
    assert int(keep.sum()) > n * 0.99  # ties are rare: this compares (almost) every element
    assert_identical(codes.long()[keep], expected[keep], f"codes (signed={signed}, block_size={block_size})")
    # Where it is a tie, the code is one of the two nearest.
    two = (normed[tie, None] - code[None, :]).abs().topk(2, dim=1, largest=False).indices
    assert bool(((codes.long()[tie, None] == two).any(dim=1)).all())


def test_nonfinite_states():
    """A block holding an infinity has absmax inf, and ``+-inf / inf`` (NaN) counts as ``+-1``:
    +-inf decode back to +-inf (the sign kept in the signed map). A NaN state counts as +1 (the
    top code) and its block's absmax is NaN, so the whole block decodes to NaN."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([inf, -inf, 0.5, -2.0] + [0.25] * 28 + [nan, 1.0, -3.0] + [0.5] * 29)
    codes, absmax = quant.quantize_blockwise(x, signed=True, block_size=32)
    assert codes[0] == 255 and codes[1] == 0 and codes[32] == 255, codes[[0, 1, 32]].tolist()
    assert absmax[0] == inf and torch.isnan(absmax[1])
    y = quant.dequantize_blockwise(codes, absmax, signed=True, block_size=32)
    assert y[0] == inf and y[1] == -inf and bool(torch.isnan(y[32:]).all())
    codes, absmax = quant.quantize_blockwise(x.abs()[:32], signed=False, block_size=32)
    assert codes[0] == codes[1] == 255 and absmax[0] == inf
    assert quant.dequantize_blockwise(codes, absmax, signed=False, block_size=32)[:2].tolist() == [inf, inf]


def test_unsigned_positive_never_rounds_to_zero():
    x = torch.tensor([1.0, 1e-9, 1e-12, 0.0, 1.6e-7, 1e-30])
    codes, absmax = quant.quantize_blockwise(x, signed=False, block_size=32)
    assert codes.tolist() == [255, 1, 1, 0, 1, 1]
    assert_identical(absmax, torch.tensor([1.0]), "absmax")
    # The signed map rounds to nearest, zero included.
    codes, _ = quant.quantize_blockwise(torch.tensor([1.0, 1e-9, -1e-9, 0.0]), signed=True, block_size=32)
    zero = quant.zero_code(True)
    assert codes.tolist()[1:] == [zero, zero, zero]


@SIGNED
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_round_trip(signed, n, block_size):
    """Shapes, dtypes, absmax per block (short tail included) and the round-trip error: at most
    half the gap between the two codebook values around each element, times its absmax."""
    x = _data(n, signed)
    codes, absmax = quant.quantize_blockwise(x, signed, block_size)
    blocks = quant.num_blocks(n, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (blocks,)
    expected_absmax = torch.stack([x[i : i + block_size].abs().max() for i in range(0, n, block_size)]) if n else absmax
    assert_identical(absmax, expected_absmax, "absmax")

    y = quant.dequantize_blockwise(codes, absmax, signed, block_size)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if n == 0:
        return
    code = quant.dynamic_map(signed).double()
    scale = absmax.double().repeat_interleave(block_size)[:n]
    normed = x.double() / scale
    upper = torch.bucketize(normed, code).clamp(1, 255)  # code[upper - 1] < normed <= code[upper]
    half_gap = (code[upper] - code[upper - 1]) / 2
    if not signed:
        # Below the smallest positive code, the value rounds up to it: a full gap.
        half_gap = torch.where(upper == 1, 2 * half_gap, half_gap)
    # Plus the fp32 rounding of x / absmax (which picks the code) and of code * absmax.
    bound = half_gap * scale + torch.finfo(torch.float32).eps * (x.double().abs() + y.double().abs())
    err = (y.double() - x.double()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"round trip error {err[worst]:.6g} > bound {bound[worst]:.6g} at {worst} (x={x[worst]:.6g})"
    )
    # Each block's largest element maps to the end of the codebook: exact when positive (1.0),
    # -0.993 * absmax when negative (the dynamic map has no -1, as in bitsandbytes).
    for i in range(0, n, block_size):
        j = i + int(x[i : i + block_size].abs().argmax())
        end = code[-1] if x[j] > 0 else code[0]
        assert float(y[j]) == float((end * scale[j]).float())


@SIGNED
@pytest.mark.parametrize("block_size", [32, 256])
def test_all_zero_blocks(signed, block_size):
    """An all-zero block keeps absmax 0, gets the zero code and dequantizes to 0, no NaN."""
    n = 4 * block_size + 5
    x = _data(n, signed)
    x[block_size : 3 * block_size] = 0.0
    x[4 * block_size :] = 0.0  # the short tail block too
    codes, absmax = quant.quantize_blockwise(x, signed, block_size)
    assert absmax.tolist()[1:3] == [0.0, 0.0] and absmax.tolist()[4] == 0.0
    zero = quant.zero_code(signed)
    assert bool((codes[block_size : 3 * block_size] == zero).all()) and bool((codes[4 * block_size :] == zero).all())
    y = quant.dequantize_blockwise(codes, absmax, signed, block_size)
    assert not bool(torch.isnan(y).any())
    assert bool((y[block_size : 3 * block_size] == 0).all()) and bool((y[4 * block_size :] == 0).all())
    # An entirely zero tensor, as a fresh state.
    codes, absmax = quant.quantize_blockwise(torch.zeros(n), signed, block_size)
    assert bool((codes == zero).all()) and bool((absmax == 0).all())


@SIGNED
def test_2d_and_out_arguments(signed):
    x = _data(16 * 40, signed).view(16, 40)
    codes, absmax = quant.quantize_blockwise(x, signed, 64)
    flat_codes, flat_absmax = quant.quantize_blockwise(x.reshape(-1), signed, 64)
    assert codes.shape == (16, 40)
    assert_identical(codes.reshape(-1), flat_codes, "2-D codes")
    assert_identical(absmax, flat_absmax, "2-D absmax")
    codes_out = torch.full((16, 40), 7, dtype=torch.uint8)
    absmax_out = torch.full((10,), -1.0)
    c, a = quant.quantize_blockwise(x, signed, 64, codes_out=codes_out, absmax_out=absmax_out)
    assert c is codes_out and a is absmax_out
    assert_identical(codes_out, codes, "codes_out")
    assert_identical(absmax_out, absmax, "absmax_out")
    assert_identical(quant.dequantize_blockwise(codes, absmax, signed, 64).reshape(-1),
                     quant.dequantize_blockwise(flat_codes, flat_absmax, signed, 64), "2-D dequantize")


@SIGNED
@pytest.mark.parametrize("n", [255, 256, 4097])
def test_interchangeable_with_bitsandbytes(signed, n):
    """Same codes and absmax format: bitsandbytes dequantizes ours to the same values, and ours
    is no less accurate than bitsandbytes' CPU quantizer on the same input, element by element."""
    import bitsandbytes.functional as F

    code = create_dynamic_map(signed=signed)
    x = _data(n, signed)
    codes, absmax = quant.quantize_blockwise(x, signed, 256)
    ours = quant.dequantize_blockwise(codes, absmax, signed, 256)
    assert_identical(F.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256), ours, "bnb dequantize")
    bcodes, bstate = F.quantize_blockwise(x, code=code, blocksize=256)
    assert_identical(bstate.absmax, absmax, "absmax against bitsandbytes'")
    theirs = quant.dequantize_blockwise(bcodes, bstate.absmax, signed, 256)
    err_ours, err_theirs = (ours - x).abs(), (theirs - x).abs()
    worse = err_ours > err_theirs
    assert not bool(worse.any()), f"{int(worse.sum())} elements quantized less accurately than by bitsandbytes"


def _ulp_neighbourhood(points: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every fp32 value within ``ulps`` representable steps of each positive value of ``points``
    (as bit patterns: consecutive positive floats are consecutive integers), clamped to (0, 1]."""
    bits = points[points > 0].to(torch.float32).view(torch.int32).to(torch.int64)
    near = (bits[:, None] + torch.arange(-ulps, ulps + 1)[None, :]).reshape(-1)
    top = int(torch.tensor([1.0]).view(torch.int32))
    near = near[(near >= 1) & (near <= top)].unique().to(torch.int32)
    return near.view(torch.float32)


@SIGNED
def test_fast_codes_equal_the_search(signed):
    """The kernels' quantizer (a decade from six compares, a linear guess, one midpoint
    comparison: fusedopt.quant.fast_codes) gives the searchsorted codes for every fp32 value
    within 64 ulps of each midpoint, each decade threshold, 1 and the smallest normal, every
    subnormal power of two, and a million random values, with both signs, +-0 and +-1; for ``T``
    rounded the reference's way and for the exact ``T`` moved by -+FAST_MARGIN (what a fused
    multiply-add may round to). bench/prove_fast_codes.py checks every fp32 value in [-1, 1]."""
    thresholds, _, _ = quant.fast_constants(signed)
    mids = quant.midpoints(signed)
    tiny = torch.finfo(torch.float32).tiny
    subnormals = torch.tensor([2.0 ** -k for k in range(127, 150)])
    points = torch.cat([mids, torch.tensor(thresholds), torch.tensor([1.0, tiny]), subnormals,
                        quant.dynamic_map(signed)])
    gen = torch.Generator().manual_seed(18)
    rand = torch.rand(10 ** 6, generator=gen) ** 8  # every decade, the small ones too
    x = torch.cat([_ulp_neighbourhood(points, 64), rand, subnormals])
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    assert x.numel() > 10 ** 6 + 2 * 64 * 255
    ref = torch.bucketize(x, mids).to(torch.int32)
    for shift in (0.0, -quant.FAST_MARGIN, quant.FAST_MARGIN):
        got = quant.fast_codes(x, signed, shift)
        bad = (got != ref).nonzero()
        assert bad.numel() == 0, (f"shift {shift}: x={x[bad[:4, 0]].tolist()} fast={got[bad[:4, 0]].tolist()} "
                                  f"reference={ref[bad[:4, 0]].tolist()}")


@SIGNED
def test_fast_codes_can_fail(signed, monkeypatch):
    """The check above can fail: the top threshold moved from 10^-1 up to the midpoint between
    decades 5 and 6 (where decade 5's linear guess runs 2 codes high) gives other codes."""
    thresholds, slopes, offsets = quant.fast_constants(signed)
    mids = quant.midpoints(signed)
    boundary = float(mids[(128 + 64 - 2) if signed else (128 - 2)])  # decade 5 | decade 6
    assert 0.1 < boundary < 0.103
    x = torch.linspace(0.1, boundary, 1000)
    ref = torch.bucketize(x, mids).to(torch.int32)
    assert torch.equal(quant.fast_codes(x, signed), ref)
    monkeypatch.setattr(quant, "_fast_constants", lambda s: (thresholds[:5] + (boundary,), slopes, offsets))
    assert not torch.equal(quant.fast_codes(x, signed), ref)


def test_kernel_constants_are_the_proved_ones():
    """The CUDA quantizer's constants (csrc/quant8.cuh, hex floats) and the Triton one's
    (kernels/quant.py) are fusedopt.quant.fast_constants', the ones the proof covers."""
    import re
    from pathlib import Path

    from fusedopt.kernels import quant as kquant

    assert tuple(kquant.FAST_SIGNED.value) == quant.fast_constants(True)
    assert tuple(kquant.FAST_UNSIGNED.value) == quant.fast_constants(False)
    header = (Path(__file__).resolve().parents[1] / "csrc" / "quant8.cuh").read_text()
    body = header[header.index("constexpr FastConstants fast_constants(bool is_signed)"):]
    arrays = re.findall(r"\{([^{}]*)\}", body[: body.index("\n}\n")])
    values = [tuple(float.fromhex(v.strip().rstrip("f")) for v in a.split(",")) for a in arrays]
    assert len(values) == 6, values
    assert tuple(values[:3]) == quant.fast_constants(True)
    assert tuple(values[3:]) == quant.fast_constants(False)


@SIGNED
def test_the_exhaustive_proof_evaluates_fast_guess(signed):
    """bench/prove_fast_codes.py's chunked evaluation (decade runs of a sorted chunk) is
    fusedopt.quant.fast_guess, for both signs and the three roundings of T it checks; and its
    check fails on a wrong guess."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "prove_fast_codes.py"
    spec = importlib.util.spec_from_file_location("prove_fast_codes", path)
    prove = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prove)
    bits = torch.cat([torch.arange(1, 4000, dtype=torch.int32),
                      torch.randint(1, int(torch.tensor([1.0]).view(torch.int32)) + 1, (200000,),
                                    generator=torch.Generator().manual_seed(2), dtype=torch.int32)])
    a = bits.unique().view(torch.float32)  # ascending positive values, subnormals and 1.0 included
    for shift in (0.0, -quant.FAST_MARGIN, quant.FAST_MARGIN):
        pos, neg = prove.guesses(a, signed, shift)
        assert torch.equal(pos, quant.fast_guess(a, signed, shift))
        if signed:
            assert torch.equal(neg, quant.fast_guess(-a, signed, shift))
    prove.check(a, signed, quant.midpoints(signed), codes=True)
    with pytest.raises(SystemExit, match="MISMATCH"):
        mids = quant.midpoints(signed)
        prove.check(a, signed, torch.cat([mids[1:], mids[-1:]]), codes=False)  # each one the next one
