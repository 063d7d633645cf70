"""Block-wise 8-bit optimizer states (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022).

A state tensor of ``n`` elements is stored as ``n`` uint8 codes plus one fp32 ``absmax`` per
block of ``block_size`` consecutive elements (the last block may be short): consecutive in
memory, in the layout of the param (row-major for a contiguous param; a ``channels_last``
param's codes are ``channels_last``, see :mod:`fusedopt.layout`). An element's value
is ``codebook[code] * absmax[block]``. The codebook is the *dynamic tree* map: seven decades
``10^-6 .. 10^0``, each split into linearly spaced fractions, plus ``0`` and ``1`` — signed for
the first moment, unsigned (twice as fine) for the second. The 256 values are bit-identical to
bitsandbytes' ``create_dynamic_map(signed)``, so states convert between the two libraries.

Quantization maps ``x = state / absmax`` to the *nearest* code: ``code = #{midpoints < x}``
over the sorted codebook's midpoints (a tie goes to the lower code). Every backend uses the
same fp32 midpoint table, so given the same fp32 state all backends produce the same codes.

One exception to round-to-nearest: in the unsigned map (second moments) the first boundary is
``0`` instead of half the smallest positive code, so a positive state never becomes zero. Adam
divides by ``sqrt(v)``: a ``v`` rounded to zero while its ``m`` is not (``v/absmax`` falls below
``1.6e-7`` whenever ``|m|/absmax(m)`` falls below about ``4e-4``) turns the next step into
``m / (sqrt((1 - beta2) g^2) + eps)``, an update thousands of times ``lr`` when ``g`` is small.
Rounding such a ``v`` up to the smallest code only makes that element's step smaller.

Non-finite states. ``absmax`` is NaN when the block holds a NaN (the whole block then decodes
to NaN, whatever its codes), ``+inf`` when it holds an infinity. There ``x = state / absmax`` is
NaN for the infinite entries (``inf / inf``), and such an ``x`` is taken as ``-1`` if the state
is negative, else ``+1`` (so a NaN state gets the top code, 255, in both maps): ``±inf`` is
``±1 * absmax``, the limit of the ratio, and decodes back to ``±inf``. This is what keeps Adam on
torch's path when ``g^2`` overflows: torch keeps ``exp_avg_sq = inf`` and ``p`` unchanged
(``m / inf = 0``); the code 0 a plain search gives NaN instead decoded to ``0 * inf = NaN`` and
made every param of the block NaN. Every backend applies the same rule before its search, so
the codes agree for non-finite states too. Finite entries of a block whose ``absmax`` is
``inf`` quantize to 0 and decode to ``0 * inf = NaN``: one fp32 scale per block cannot hold
both (torch keeps them finite; the fp32 states of a small tensor do too).
"""

from __future__ import annotations

import functools
import math

import torch

from . import families, layout

__all__ = [
    "dynamic_map",
    "midpoints",
    "num_blocks",
    "quantize_blockwise",
    "dequantize_blockwise",
    "zero_code",
    "signed_state",
    "fast_codes",
    "fast_guess",
    "fast_constants",
]

_DECADES = 7  # 10^-6 .. 10^0


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values: list[float] = []
    for decade in range(_DECADES):
        # Decade ``decade`` holds 2^decade fractions when signed (each used with both signs),
        # 2^(decade+1) when unsigned: the larger the magnitude, the finer the spacing.
        n = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (decade - (_DECADES - 1))
        values += (scale * centres).tolist()
        if signed:
            values += (-scale * centres).tolist()
    values += [0.0, 1.0]
    if len(values) != 256:  # pragma: no cover - a construction error, not an input error
        raise RuntimeError(f"dynamic map has {len(values)} values, expected 256")
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-value dynamic codebook (fp32, sorted ascending).

    Args:
        signed: ``True`` for signed states (first moment), ``False`` for non-negative ones
            (second moment), whose codes cover ``[0, 1]`` twice as finely.
        device: where to put the codebook (default: CPU).

    Example:
        >>> code = dynamic_map(signed=True)
        >>> code.shape, float(code[0]), float(code[-1])
        (torch.Size([256]), -0.9930000305175781, 1.0)
    """
    code = _dynamic_map_cpu(bool(signed))
    return code if device is None else code.to(device)


@functools.lru_cache(maxsize=None)
def _midpoints_cpu(signed: bool) -> torch.Tensor:
    code = _dynamic_map_cpu(signed)
    mids = (code[:-1] + code[1:]) * 0.5
    if not signed:
        mids[0] = 0.0  # a positive second moment never rounds to zero (see the module docstring)
    return mids


def midpoints(signed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """The 255 fp32 decision boundaries between neighbouring codes (round to nearest; the
    unsigned map's first boundary is ``0``, so a positive value never gets the zero code)."""
    mids = _midpoints_cpu(bool(signed))
    return mids if device is None else mids.to(device)


# The kernels' quantizer: the code #{midpoints < x} without a search over the midpoints.
#
# With a = |x| (signed map) or max(x, 0) (unsigned), decade d = #{k = 1..6 : a >= D_k}, where
# D_k = fp32(10^(k-6)) is where decade k-1's values end (its midpoints' linear extension puts the
# boundary midpoint up to 1.5 codes too high: past 10^(k-6) decade k's extension is used, 1.2
# codes off at most). Inside decade d (scale s = 10^(d-6), n values, the first at code o) the
# midpoints are nearly s * (0.1 + 0.9 j / n), so T = a * A_d + B_d with A_d = n / (0.9 s) and
# B_d = o + 0.5 - 0.1 n / 0.9 puts F = trunc(min(T, 255)) at the code or one above it:
# g = F (for x < 0 in the signed map, whose negative half mirrors the positive one,
# g = max(255 - F, 1)), and one comparison with the table's midpoint fixes it exactly:
# code = g - (midpoints[g - 1] >= x). Only fp32 compares, one multiply-add, a truncation and
# one midpoint load per element (the binary search loads eight). T may be rounded any way (fused or
# not): tests/test_quant.py and bench/prove_fast_codes.py prove, for every fp32 x in [-1, 1],
# that every T within 1e-3 of the exact a * A_d + B_d gives the reference's code. They check T
# rounded as here (fp32 multiply, then add) and T -+ FAST_MARGIN: T is at most 3.1e-5 from the
# exact value (T < 256: half an ulp of the product plus one of the sum), the shifted sum
# rounds by at most 1.6e-5 more, and g is monotone in T, so a margin of 1e-3 + 5e-5 covers every
# T within 1e-3 of the exact one.
FAST_MARGIN = 1.05e-3


@functools.lru_cache(maxsize=None)
def _fast_constants(signed: bool) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    thresholds, slopes, offsets = [], [], []
    for d in range(_DECADES):
        n = 2 ** d if signed else 2 ** (d + 1)
        first = (128 + n - 1) if signed else (n - 1)  # code of the decade's smallest positive value
        scale = 10.0 ** (d - (_DECADES - 1))
        slopes.append(float(torch.tensor(n / (0.9 * scale), dtype=torch.float32)))
        offsets.append(float(torch.tensor(first + 0.5 - 0.1 * n / 0.9, dtype=torch.float32)))
        if d > 0:
            thresholds.append(float(torch.tensor(scale / 10.0, dtype=torch.float32)))
    return tuple(thresholds), tuple(slopes), tuple(offsets)


def fast_constants(signed: bool) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(D_1..D_6, A_0..A_6, B_0..B_6)`` of the kernels' quantizer (see :func:`fast_codes`),
    each an exact fp32 value."""
    return _fast_constants(bool(signed))


def fast_guess(x: torch.Tensor, signed: bool, t_shift: float = 0.0) -> torch.Tensor:
    """The kernels' guess ``g`` for each fp32 ratio ``x`` (not NaN), before the one midpoint
    comparison of :func:`fast_codes`: a decade from six compares, ``T = a * A + B``,
    ``g = trunc(min(T, 255))``, mirrored to ``max(255 - g, 1)`` for a negative ``x`` of the
    signed map. ``t_shift`` is added to ``T`` (in fp32): the proof's stand-in for a ``T`` rounded
    another way (a fused multiply-add; see ``FAST_MARGIN``). int32."""
    thresholds, slopes, offsets = _fast_constants(bool(signed))
    x = x.to(torch.float32)
    a = x.abs() if signed else x.clamp_min(0.0)
    # decade = #{k : a >= D_k} (the kernels: six compares and selects of A and B)
    decade = torch.bucketize(a, torch.tensor(thresholds, device=x.device), right=True)
    slope = torch.tensor(slopes, device=x.device)[decade]
    offset = torch.tensor(offsets, device=x.device)[decade]
    t = a * slope + offset
    if t_shift:
        t = t + t_shift
    f = t.clamp_max(255.0).to(torch.int32)  # t >= 0: truncation is floor
    if signed:
        return torch.where(x < 0, (255 - f).clamp_min(1), f)
    return f


def fast_codes(x: torch.Tensor, signed: bool, t_shift: float = 0.0) -> torch.Tensor:
    """The code of each fp32 ratio ``x`` (not NaN) as the kernels compute it:
    ``g - (midpoints[g - 1] >= x)`` with ``g`` = :func:`fast_guess`. With ``c`` the reference's
    code ``#{midpoints < x}``, this is ``c`` exactly when ``g`` is ``c`` or ``c + 1`` (for
    ``g = c + 1``, ``midpoints[c] >= x``; for ``g = c``, ``midpoints[c - 1] < x``; any other ``g``
    gives another code), which ``bench/prove_fast_codes.py`` checks for every fp32 ``x`` in
    [-1, 1]. int32."""
    g = fast_guess(x, signed, t_shift)
    mids = _midpoints_cpu(bool(signed)).to(x.device)
    return g - (mids[(g - 1).long()] >= x.to(torch.float32)).to(torch.int32)


def zero_code(signed: bool) -> int:
    """The code whose value is exactly ``0.0`` (what a fresh state is filled with)."""
    return int((_dynamic_map_cpu(bool(signed)) == 0).nonzero()[0, 0])


def signed_state(name: str) -> bool:
    """Which codebook state ``name`` uses, as its family declares it (``fusedopt.families``):
    signed for moments and momentum buffers, unsigned for squares (``exp_avg_sq``, ``sum``)."""
    return families.signed(name)


def num_blocks(numel: int, block_size: int) -> int:
    """Number of quantization blocks (and absmax entries) of a tensor of ``numel`` elements."""
    return math.ceil(numel / block_size)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened in the memory order of its layout (see :mod:`fusedopt.layout`) and
    zero-padded to whole blocks, as ``[blocks, block_size]``."""
    flat = layout.flat(x)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize_blockwise(
    x: torch.Tensor,
    signed: bool,
    block_size: int = 256,
    codes_out: torch.Tensor | None = None,
    absmax_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to uint8 codes with one fp32 absmax per block.

    ``absmax = max |x|`` over each block; each element gets the nearest code of
    ``x / absmax`` (fp32), except that a positive ``x`` never gets the unsigned map's zero
    code, and an ``x / absmax`` that is NaN (``inf / inf``, a NaN state) counts as ``-1`` for a
    negative ``x``, else ``+1`` (see the module docstring). An all-zero block keeps ``absmax = 0`` and encodes as the zero code:
    nothing divides by zero. Writes into ``codes_out`` / ``absmax_out`` when given.

    Blocks run over the memory order of ``x``'s layout (row-major for a contiguous ``x``; see
    :mod:`fusedopt.layout`): what the kernels see of a state laid out as its param.

    Returns:
        ``(codes, absmax)``: codes shaped and laid out like ``x`` (uint8), absmax of shape
        ``[blocks]``.

    Example:
        >>> x = torch.randn(1000)
        >>> codes, absmax = quantize_blockwise(x, signed=True, block_size=256)
        >>> y = dequantize_blockwise(codes, absmax, signed=True, block_size=256)
        >>> bool((y - x).abs().max() < 0.05 * x.abs().max())
        True
    """
    x32 = x.detach().to(torch.float32)
    blocks = _blocks(x32, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / safe[:, None]).reshape(-1)[: x.numel()]
    # inf / inf (and a NaN state): +-1 by the state's sign (see the module docstring)
    flat = blocks.reshape(-1)[: x.numel()]
    normed = torch.where(torch.isnan(normed), torch.where(flat < 0, -1.0, 1.0), normed)
    codes = torch.bucketize(normed, midpoints(signed, x.device), right=False).to(torch.uint8)
    codes = layout.unflat(codes, x.shape, layout.strides(x))
    if codes_out is not None:
        codes_out.copy_(codes)
        codes = codes_out
    if absmax_out is not None:
        absmax_out.copy_(absmax)
        absmax = absmax_out
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    signed: bool,
    block_size: int = 256,
) -> torch.Tensor:
    """fp32 values ``codebook[codes] * absmax[block]``, shaped and laid out like ``codes``
    (blocks over the memory order of its layout, as :func:`quantize_blockwise` makes them)."""
    values = dynamic_map(signed, codes.device)[layout.flat(codes).long()]
    scale = absmax.to(torch.float32).repeat_interleave(block_size)[: codes.numel()]
    return layout.unflat(values * scale, codes.shape, layout.strides(codes))


def relayout(codes: torch.Tensor, absmax: torch.Tensor, name: str, block_size: int,
             strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit state ``name`` (``codes`` with their ``absmax``, blocks over the codes' own memory
    order) requantized in the layout ``strides``: new codes laid out so, blocked over that
    layout's memory order, and their absmax. Moving codes to another layout element by element
    would put them in other blocks than their absmax (see :func:`fusedopt.layout.settle_states`)."""
    values = dequantize_blockwise(codes, absmax, signed_state(name), block_size)
    return quantize_blockwise(layout.to_layout(values, strides), signed_state(name), block_size)
