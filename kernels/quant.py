"""Block-wise 8-bit states on the device (see :mod:`fusedopt.quant` for the format).

A tile is ``[ROWS, BLOCK_PAD]``: ``ROWS`` whole quantization blocks of ``BLOCK_SIZE``
consecutive elements (``BLOCK_PAD`` is ``BLOCK_SIZE`` rounded up to a power of two; the extra
columns are masked), so a block's absmax is a reduction along one row, in registers.
Requantization finds ``#{midpoints < state / absmax}`` after an IEEE division without a search:
``fusedopt.quant.fast_codes``'s decade from six compares, linear guess and one comparison with
the table's fp32 midpoint (proved equal to the search for every fp32 ratio in [-1, 1], however
the multiply-add rounds): given the same fp32 state, the codes are the reference's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt import quant as _ref

from . import common

# fusedopt.quant.fast_constants: (thresholds D_1..D_6, slopes A_0..A_6, offsets B_0..B_6), exact
# fp32 values, per map (a Python float literal is an fp32 constant in a kernel).
FAST_SIGNED = tl.constexpr(_ref.fast_constants(True))
FAST_UNSIGNED = tl.constexpr(_ref.fast_constants(False))

# Largest quantization block a program keeps in registers; the Triton backend does not run
# larger blocks (one program would need a second pass over the block): fusedopt.backends
# resolves such a step to another backend, or refuses an explicit backend="triton".
MAX_BLOCK = 4096
# Elements per tile, and tiles per work item.
TILE = common.block(2048, 8192)
TILES = 4
NUM_WARPS = 4  # 16 elements a thread: 16-byte accesses for the uint8 codes too


def register_limit(uncapped: bool) -> dict:
    """Launch options of an 8-bit kernel: with ``uncapped``, ptxas may use up to 255 registers a
    thread (``maxnreg``). Left to itself it stops at 168 (three 128-thread blocks an SM) and
    spilled there: 24-28 bytes in SGD8bit's kernel with stochastic rounding (bf16, sm_90) and
    48-56 bytes in LAMB8bit's pass 2 with bf16 params (sm_80 and sm_90), as tests/test_compile.py
    and ``python -m fusedopt static`` compile them; uncapped, they take 178-225 registers and do
    not spill (8 warps an SM at most). The launchers uncap only the elementwise 8-bit kernel
    with stochastic rounding (every family's: Lion8bit's then takes 181 registers, not 123) and
    the two-pass apply with 16-bit params; elsewhere the cap stays, and the occupancy with it."""
    return {"maxnreg": 255} if uncapped else {}


def unsupported_block(block_size: int) -> str | None:
    """Why the 8-bit kernels cannot take ``block_size``, or None."""
    if block_size > MAX_BLOCK:
        return (f"block_size={block_size} is over {MAX_BLOCK}, the largest 8-bit block one Triton program "
                "takes (the cuda and reference backends take any block_size)")
    return None


def check_block(batch) -> None:
    """Raise if ``batch``'s block size is one the kernels do not take (``fusedopt.backends``
    does not resolve such a step to Triton; reaching here is a bug, never a fallback)."""
    reason = unsupported_block(batch.block_size)
    if reason is not None:
        raise RuntimeError(f"the Triton backend cannot run this 8-bit step: {reason}")


def layout(block_size: int) -> dict:
    """The compile-time tile shape for ``block_size`` (a multiple of 32, at most MAX_BLOCK)."""
    block_pad = 1 << (block_size - 1).bit_length()
    rows = max(1, TILE // block_pad)
    return dict(BLOCK_SIZE=block_size, BLOCK_PAD=block_pad, ROWS=rows, TILES=TILES)


def chunk(block_size: int) -> int:
    """Elements per work item (whole blocks)."""
    lay = layout(block_size)
    return lay["TILES"] * lay["ROWS"] * block_size


@triton.jit
def tile_offsets(base, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Offsets (from the chunk start) of the ``[ROWS, BLOCK_PAD]`` tile whose first block
    starts at ``base``."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_PAD)
    return base + r[:, None] * BLOCK_SIZE + c[None, :]


@triton.jit
def tile_masks(base, n, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr,
               MASKED: tl.constexpr):
    """The element and row masks of a tile: its padding columns, and with ``MASKED`` what lies
    past the ``n`` elements left in the chunk."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_PAD)
    if MASKED:
        mask = (c[None, :] < BLOCK_SIZE) & (base + r[:, None] * BLOCK_SIZE + c[None, :] < n)
        row_mask = base + r * BLOCK_SIZE < n
    else:
        mask = (c[None, :] < BLOCK_SIZE) & (r[:, None] >= 0)
        row_mask = r >= 0
    return mask, row_mask


@triton.jit
def load_state(codes_ptr, absmax_ptr, o, blocks, mask, row_mask, values):
    """Dequantize: ``values[code] * absmax[block]`` (``values`` is the codebook row)."""
    codes = tl.load(codes_ptr + o, mask=mask)
    absmax = tl.load(absmax_ptr + blocks, mask=row_mask)
    return tl.load(values + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def fast_code(x, mids, SIGNED: tl.constexpr):
    """``#{mids < x}`` for fp32 ``x`` (not NaN), as ``fusedopt.quant.fast_codes`` computes it:
    the decade by six compares, ``T = a * A + B`` (rounded any way), ``g = trunc(min(T, 255))``
    (mirrored for a negative ``x`` of the signed map), then one midpoint load fixes ``g``."""
    if SIGNED:
        CONST: tl.constexpr = FAST_SIGNED
        a = tl.abs(x)
    else:
        CONST: tl.constexpr = FAST_UNSIGNED
        a = tl.maximum(x, 0.0)
    slope = tl.full(x.shape, CONST[1][0], tl.float32)
    offset = tl.full(x.shape, CONST[2][0], tl.float32)
    for k in tl.static_range(6):
        up = a >= CONST[0][k]
        slope = tl.where(up, CONST[1][k + 1], slope)
        offset = tl.where(up, CONST[2][k + 1], offset)
    f = tl.minimum(a * slope + offset, 255.0).to(tl.int32)  # >= 0: truncation is floor
    if SIGNED:
        g = tl.where(x < 0, tl.maximum(255 - f, 1), f)
    else:
        g = f
    return g - (tl.load(mids + (g - 1)) >= x).to(tl.int32)


@triton.jit
def store_state(state, codes_ptr, absmax_ptr, o, blocks, mask, row_mask, mids, SIGNED: tl.constexpr):
    """Requantize ``state`` (fp32 tile) in place: absmax of each row, then the nearest code of
    ``state / absmax`` (an all-zero block keeps absmax 0 and gets the zero code). ``mids``: the
    midpoints row of the map, ``SIGNED`` whether it is the signed one."""
    magnitude = tl.abs(state)
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0.0)
    # tl.max drops NaNs (compiled and interpreted); a block holding a NaN has a NaN absmax, as
    # the reference's amax (and the CUDA backend's MaxNan) give it
    nans = tl.max((magnitude != magnitude).to(tl.int32), axis=1)
    absmax = tl.where(nans > 0, float("nan"), tl.max(magnitude, axis=1))
    safe = tl.where(absmax > 0, absmax, 1.0)
    x = tl.div_rn(state, safe[:, None])
    x = tl.where(x != x, tl.where(state < 0, -1.0, 1.0), x)  # inf / inf, NaN: see fusedopt.quant
    code = fast_code(x, mids, SIGNED)
    tl.store(codes_ptr + o, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blocks, absmax, mask=row_mask)
