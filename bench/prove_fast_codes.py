"""Exhaustive proof that the kernels' quantizer (``fusedopt.quant.fast_codes``) gives
``quantize_blockwise``'s codes, ``#{midpoints < x}`` (``torch.bucketize``), for every fp32 ``x``
in [-1, 1] (every ratio ``state / absmax`` there is), both maps: each positive fp32 value up to
1.0 (1,065,353,216 of them) with both signs, and +-0.

``fast_codes`` is ``g - (midpoints[g - 1] >= x)`` with ``g = fast_guess(x)``, which is the
reference's code ``c`` exactly when ``g - c`` is 0 or 1 (see ``fast_codes``). So this checks
``fast_guess(x) - c`` in {0, 1} for every ``x`` (``guesses``: fast_guess's operations on a\nsorted chunk), three ways: ``T`` rounded as the reference and
the ``-fmad=false`` CUDA build round it (fp32 multiply, then add), and that ``T`` moved by
``-FAST_MARGIN`` and ``+FAST_MARGIN``: ``g`` is monotone in ``T``, so every ``T`` within 1e-3 of
the exact ``a * A + B`` (a fused multiply-add, any rounding) passes too (see fusedopt/quant.py). ``--codes`` also runs
``fast_codes`` itself on every value (three times slower).

    python bench/prove_fast_codes.py [--chunk-log2 24] [--threads 1] [--codes]

Prints the count checked and the time; exits 1 on the first mismatch. (906 s with one thread on
a busy two-core machine, 2026-12-08: "all 4261412868 values (x 3 roundings of T) equal the
reference"; tests/test_quant.py checks every value within 64 ulps of each midpoint, decade
threshold and codebook value plus a million random ones in the default tier.)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fusedopt import quant


def guesses(a: torch.Tensor, signed: bool, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fast_guess`` of ``+a`` and of ``-a`` for an ascending chunk ``a`` of positive fp32
    values: the same operations, with the decade's A and B as scalars over each run of one decade
    (the chunk is sorted, so a decade is a run) instead of gathered per element.
    tests/test_quant.py checks that this is ``fast_guess``."""
    thresholds, slopes, offsets = quant.fast_constants(signed)
    cuts = [0] + torch.searchsorted(a, torch.tensor(thresholds), right=False).tolist() + [a.numel()]
    t = torch.empty_like(a)
    for d in range(len(slopes)):  # a >= D_k from cuts[k] on: decade d on [cuts[d], cuts[d + 1])
        lo, hi = cuts[d], cuts[d + 1]
        if hi > lo:
            torch.mul(a[lo:hi], slopes[d], out=t[lo:hi])
            t[lo:hi] += offsets[d]
    if shift:
        t += shift
    f = t.clamp_max_(255.0).to(torch.int32)
    if signed:
        return f, (255 - f).clamp_min_(1)
    return f, f  # the unsigned map: max(-a, 0) is 0 (a == 0 there)


def check(a: torch.Tensor, signed: bool, mids: torch.Tensor, codes: bool) -> None:
    """Every x in ``a`` and ``-a``: the guess is the reference's code or one above (three roundings
    of T), and with ``codes`` fast_codes is the reference's code."""
    refs = (torch.bucketize(a, mids).to(torch.int32), torch.bucketize(-a, mids).to(torch.int32))
    for shift in (0.0, -quant.FAST_MARGIN, quant.FAST_MARGIN):
        if signed:
            pos, neg = guesses(a, signed, shift)
        else:
            pos, _ = guesses(a, signed, shift)
            neg = guesses(torch.zeros(1), signed, shift)[0].expand_as(pos)  # every -a: max(-a, 0) = 0
        for sign, g, ref in ((1, pos, refs[0]), (-1, neg, refs[1])):
            off = g - ref
            bad = (off < 0) | (off > 1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise SystemExit(f"MISMATCH signed={signed} shift={shift}: x={sign * float(a[i])!r} "
                                 f"guess={int(g[i])} reference={int(ref[i])}")
    if codes:
        for x, ref in ((a, refs[0]), (-a, refs[1])):
            got = quant.fast_codes(x, signed)
            if not torch.equal(got, ref):
                i = int((got != ref).nonzero()[0, 0])
                raise SystemExit(f"MISMATCH signed={signed}: x={float(x[i])!r} fast={int(got[i])} "
                                 f"reference={int(ref[i])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-log2", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--codes", action="store_true", help="also run fast_codes on every value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    top = int(torch.tensor([1.0]).view(torch.int32))  # 0x3f800000
    chunk = 1 << args.chunk_log2
    start = time.perf_counter()
    checked = 0
    for signed in (True, False):
        mids = quant.midpoints(signed)
        zeros = torch.tensor([0.0, -0.0])
        if not torch.equal(quant.fast_codes(zeros, signed), torch.bucketize(zeros, mids).to(torch.int32)):
            raise SystemExit(f"MISMATCH signed={signed} at +-0")
        checked += 2
        for lo in range(1, top + 1, chunk):
            bits = torch.arange(lo, min(lo + chunk, top + 1), dtype=torch.int32)
            x = bits.view(torch.float32)
            check(x, signed, mids, args.codes)
            checked += 2 * x.numel()
        print(f"signed={signed}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print(f"all {checked} values (x 3 roundings of T) equal the reference in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
