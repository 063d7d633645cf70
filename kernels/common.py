"""Device helpers shared by every family's kernels.

Every kernel walks a launch table (see :mod:`fusedopt.kernels.table`): row ``i`` holds the
int64 addresses of tensor ``i``'s streams (param, grad, states, ...) followed by its element
count; a work item ``(tensor << 32) | chunk`` tells a program which chunk of which tensor it
owns. Addresses are cast with ``tl.pointer_type``, which also runs under ``TRITON_INTERPRET=1``
on CPU tensors.

Arithmetic mirrors the reference backend operation by operation in fp32 (IEEE division and
square root: Triton's ``/`` and ``tl.sqrt`` are approximate on GPUs; kernels are launched
with FMA contraction off), so that given the same inputs both backends produce the same fp32
states, and hence the same 8-bit codes.
"""

from __future__ import annotations

import os
from collections import namedtuple

import triton
import triton.language as tl

from ..scalars import GRAD_MULT as _GRAD_MULT
from ..scalars import SKIP as _SKIP

#: Whether ``triton.jit`` decorates for the interpreter (decided at import, as triton decides).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block(gpu: int, interpreter: int) -> int:
    """A tile size: ``gpu`` compiled, ``interpreter`` under TRITON_INTERPRET. The interpreter
    costs about the same per operation whatever the tile, so it runs the same code on bigger
    tiles (the compiled shapes are checked by tests/test_compile.py and the GPU tests)."""
    return interpreter if INTERPRET else gpu


GRAD_MULT: tl.constexpr = tl.constexpr(_GRAD_MULT)
SKIP: tl.constexpr = tl.constexpr(_SKIP)

# The per-tensor step buffer written by ``step_kernel`` (fp32 each): ``t``, the step count
# after this step, then up to three scalars a family derives from it (``step_kernel``'s DERIVE).
T_COL: tl.constexpr = tl.constexpr(0)
STEP_WIDTH: tl.constexpr = tl.constexpr(4)


@triton.jit
def load_ptr(row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Column ``col`` of a table row as a pointer to ``DTYPE``. ``ALIGNED`` tells the compiler
    the address is a multiple of 16 bytes (the host checked), which is what lets full chunks
    use 16-byte vector accesses."""
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def work_item(table, work, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """This program's work item, decoded: ``(tensor, chunk, row, start, n)``, the tensor's
    index, the chunk's index in it, the tensor's table row, the chunk's first element, and the
    elements from there to the end of the tensor (``n >= CHUNK`` on every chunk but the last).
    A row is ``WIDTH`` columns, of which the last three are the element count, the salt and
    the offset (see ``table.rounding``)."""
    item = tl.load(work + tl.program_id(0))
    tensor = (item >> 32).to(tl.int32)
    chunk = item & 0xFFFFFFFF
    row = table + tensor * WIDTH
    start = chunk * CHUNK
    n = tl.load(row + WIDTH - 3) - start
    return tensor, chunk, row, start, n


@triton.jit
def column_ptrs(row, start, FIRST: tl.constexpr, COUNT: tl.constexpr, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of the ``COUNT`` (1 to 3) streams in columns ``FIRST``,
    ``FIRST + 1``, ... of a row, all of ``DTYPE``: always three, those past ``COUNT`` repeating
    the last one (a kernel without the stream never touches them)."""
    a = load_ptr(row, FIRST, DTYPE, ALIGNED) + start
    if COUNT >= 2:
        b = load_ptr(row, FIRST + 1, DTYPE, ALIGNED) + start
    else:
        b = a
    if COUNT >= 3:
        c = load_ptr(row, FIRST + 2, DTYPE, ALIGNED) + start
    else:
        c = b
    return a, b, c


@triton.jit
def stream_ptrs(row, start, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                STATES: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of an update row's streams: ``(p, g, s0, s1, s2)``, the
    param (column 0), the grad (column 1) and ``STATES`` states of ``S_DTYPE`` (columns 2..; fp32,
    or uint8 codes), the states past ``STATES`` repeating the last one."""
    p_ptr = load_ptr(row, 0, P_DTYPE, ALIGNED) + start
    g_ptr = load_ptr(row, 1, G_DTYPE, ALIGNED) + start
    s0, s1, s2 = column_ptrs(row, start, 2, STATES, S_DTYPE, ALIGNED)
    return p_ptr, g_ptr, s0, s1, s2


@triton.jit
def absmax_ptrs(row, STATES: tl.constexpr):
    """The fp32 absmax pointers of an 8-bit row's ``STATES`` states (the columns after the
    codes; whole tensors, read at block indices), as :func:`column_ptrs` returns them."""
    return column_ptrs(row, 0, 2 + STATES, STATES, tl.float32, False)


@triton.jit
def step_key(seed, steps, tensor, row, WIDTH: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The stochastic-rounding key of this tensor at this step (``rounding_key`` of the seed,
    ``t`` and the row's salt); 0 without ``STOCHASTIC``."""
    if STOCHASTIC:
        t = tl.load(steps + tensor * STEP_WIDTH + T_COL)
        key = rounding_key(seed, t, tl.load(row + WIDTH - 2))
    else:
        key = 0
    return key


@triton.jit
def first_index(row, start, WIDTH: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The index in the full param of a chunk's first element (``start``): its index in the
    tensor plus the row's offset, where the tensor (a shard) starts in the param (int64; the
    rounding noise's element index). ``start`` without ``STOCHASTIC``."""
    if STOCHASTIC:
        return start + tl.load(row + WIDTH - 1)
    else:
        return start


@triton.jit
def bias_corrections(steps, tensor):
    """``(1 - beta1^t, 1 - beta2^t)`` of this tensor, from the step buffer (written by
    :func:`bias_corrections_derive`)."""
    bias_correction1 = tl.load(steps + tensor * STEP_WIDTH + 1)
    bias_correction2 = tl.load(steps + tensor * STEP_WIDTH + 2)
    return bias_correction1, bias_correction2


@triton.jit
def mix32(x):
    """A 32-bit integer finaliser (``lowbias32``): every output bit depends on every input bit.
    ``fusedopt.reference.mix32`` is the same function on int64 tensors."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def rounding_key(seed, t, salt):
    """Per-tensor, per-step key of the stochastic-rounding noise (uint32)."""
    k = mix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    k = mix32(k ^ t.to(tl.uint32))
    return mix32(k ^ salt.to(tl.uint32))


@triton.jit
def to_dtype(x, index, key, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """fp32 ``x`` stored as ``DTYPE``: round to nearest even, or, with ``STOCHASTIC`` (bf16),
    round up with probability equal to the discarded fraction, the 16 random bits being
    ``mix32(key ^ mix32(low32(index) ^ mix32(high32(index))))``.

    bf16 is rounded by hand on the bit pattern (torch's rule, NaN kept quiet): the
    interpreter truncates fp32 -> bf16, and the bit version costs nothing in a memory-bound
    kernel."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            i = index.to(tl.int64)
            noise = mix32(key ^ mix32((i & 0xFFFFFFFF).to(tl.uint32) ^ mix32((i >> 32).to(tl.uint32))))
            rounded = bits + (noise & 0xFFFF)
        else:
            rounded = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = tl.where(x != x, 0x7FC00000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def store_param(p_ptr, o, p, mask, index, key, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store fp32 ``p`` at ``p_ptr + o`` in the param's dtype (see :func:`to_dtype`); ``index``
    is the position of ``p_ptr``'s element in its full param (see :func:`first_index`; with
    ``key``, what salts stochastic rounding)."""
    if P_DTYPE == tl.float32:
        tl.store(p_ptr + o, p, mask=mask)
    else:
        tl.store(p_ptr + o, to_dtype(p, index + o, key, P_DTYPE, STOCHASTIC), mask=mask)


@triton.jit
def lerp(a, b, w):
    """``torch.lerp(a, b, w)`` of fp32 tensors and an fp32 scalar weight, as torch computes it:
    ``a + w * (b - a)`` for ``|w| < 0.5``, else ``b - (b - a) * (1 - w)``, each a fused
    multiply-add (torch's CPU kernel fuses it: the plain fp32 formula differs from it in 25% of
    elements at ``w = 0.7``). Here the product is exact in fp64 and the sum rounded to fp64,
    then to fp32 (the same on the GPU and in the interpreter, whose ``tl.fma`` does not fuse);
    this matched torch's CPU ``lerp`` on 3 x 10^6 random elements."""
    w = tl.zeros_like(a) + w  # fp32 in the interpreter too, where a scalar argument is a double
    d = (b - a).to(tl.float64)
    small = a.to(tl.float64) + w.to(tl.float64) * d
    large = b.to(tl.float64) - d * (1.0 - w).to(tl.float64)
    return tl.where(tl.abs(w) < 0.5, small, large).to(tl.float32)


@triton.jit
def neg_expm1(x):
    """``-expm1(x) = 1 - e^x`` for fp64 ``x <= 0``, accurate to a few ulp (Kahan's
    ``(u - 1) * x / log(u)`` with ``u = e^x``: the rounding error of ``u`` cancels in the
    ratio). libdevice's ``expm1`` is not available in the interpreter; this is the same code
    on the GPU and in it."""
    u = tl.exp(x)
    d = u - 1.0
    exact = (u == 1.0) | (d == -1.0)  # |x| below an ulp of 1 (then expm1(x) = x), or e^x < ulp
    ratio = d * x / tl.log(tl.where(exact, 2.0, u))
    return -tl.where(exact, tl.where(u == 1.0, x, d), ratio)


@triton.jit
def one_minus_power(log_beta, t):
    """``1 - beta^t`` as ``-expm1(t * log(beta))`` in fp64 from fp64 ``log_beta`` and fp32 ``t``
    (``fusedopt.reference.one_minus_power``): no cancellation, whatever ``beta``."""
    return neg_expm1(t.to(tl.float64) * log_beta)


@triton.jit
def hypers(values, IN_MEMORY: tl.constexpr, HYPERS: tl.constexpr):
    """A family's runtime hyper-parameters as its ``HYPERS`` struct (a namedtuple class), from
    ``values`` (the same fields): each a kernel argument, or with ``IN_MEMORY[i]`` a pointer to
    an fp32 device scalar read here (a tensor-valued hyper-parameter, see ``table.hyper_struct``)."""
    out = ()
    for i in tl.static_range(len(values)):
        if IN_MEMORY[i]:
            out = out + (tl.load(values[i]),)
        else:
            out = out + (values[i],)
    return HYPERS(*out)


@triton.jit
def derived(steps, tensor, DERIVED: tl.constexpr):
    """This tensor's per-step scalars as the family's ``DERIVED`` struct (a namedtuple class),
    from the step buffer where :func:`step_kernel` wrote them (columns 1, 2, ...)."""
    out = ()
    for i in tl.static_range(len(DERIVED._fields)):
        out = out + (tl.load(steps + tensor * STEP_WIDTH + 1 + i),)
    return DERIVED(*out)


@triton.jit
def step_hypers(pointers, x0, x1, x2, MODES: tl.constexpr, HYPERS: tl.constexpr):
    """The step prologue's hyper-parameters as the family's ``HYPERS`` struct, in fp64: field
    ``i`` is ``x<i>`` (a float64 argument: a Python number, exact) with ``MODES[i] == 0``, or
    read from ``pointers[i]`` (an fp32 device scalar) with ``MODES[i] == 1``, or its ``log`` in
    fp64 with ``MODES[i] == 2`` (a beta the derivation takes the log of; a number's log is taken
    on the host, see ``table.step_args``)."""
    numbers = (x0, x1, x2)
    out = ()
    for i in tl.static_range(len(MODES)):
        if MODES[i] == 0:
            out = out + (numbers[i],)
        elif MODES[i] == 1:
            out = out + (tl.load(pointers[i]).to(tl.float64),)
        else:
            out = out + (tl.log(tl.load(pointers[i]).to(tl.float64)),)
    return HYPERS(*out)


@triton.jit(do_not_specialize=["n"])
def step_kernel(table, out, n, scalars, pointers, x0: tl.float64, x1: tl.float64, x2: tl.float64,
                DERIVE: tl.constexpr, HYPERS: tl.constexpr, MODES: tl.constexpr, WIDTH: tl.constexpr,
                STEP_COL: tl.constexpr, BLOCK: tl.constexpr):
    """Before a family pass: ``t = step + 1`` of every tensor and the family's per-step scalars,
    ``DERIVE(t, h)`` (a ``triton.jit`` function of the step count, fp32 and exact, and the fp64
    ``HYPERS`` struct, see :func:`step_hypers`; None: ``t`` only), into ``out`` (read by the pass), and
    each step advanced unless the step is skipped. Each scalar is computed in fp64 and rounded
    once to fp32, as the reference computes it (and torch's for-loop, on the host).

    Doing this in its own launch keeps the family kernels free of the race between the
    programs that read a tensor's step and the one that would advance it. (The stores follow the
    derivation: storing ``t`` first costs ptxas 17 registers more, and spills on sm_90.)"""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    skip = tl.load(scalars + SKIP)
    step_ptr = tl.load(table + i.to(tl.int64) * WIDTH + STEP_COL, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=mask, other=0.0)
    t = step + 1.0
    if DERIVE is not None:
        d = DERIVE(t, step_hypers(pointers, x0, x1, x2, MODES, HYPERS))
    tl.store(out + i * STEP_WIDTH + T_COL, t, mask=mask)
    if DERIVE is not None:
        for k in tl.static_range(len(d)):
            tl.store(out + i * STEP_WIDTH + 1 + k, d[k].to(tl.float32), mask=mask)
    tl.store(step_ptr, t, mask=i < tl.where(skip == 0, n, 0))


@triton.jit
def bias_corrections_derive(t, h):
    """``(1 - beta1^t, 1 - beta2^t)``, from ``h.log_beta1``, ``h.log_beta2`` (LAMB's per-step
    scalars; :func:`bias_corrections` reads them back)."""
    return one_minus_power(h.log_beta1, t), one_minus_power(h.log_beta2, t)


#: The step struct of :func:`bias_corrections_derive` (``table.log_of`` of each beta).
BiasCorrections = namedtuple("BiasCorrections", ["log_beta1", "log_beta2"])
