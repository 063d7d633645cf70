"""Device helpers shared by every family's kernels.

Every kernel walks a launch table (see :mod:`fusedopt.launch_table`, the CUDA backend's
layout): row ``i`` holds tensor ``i``'s element count and the int64 addresses of its streams
(param, grad, states, absmaxes, step) in fixed columns; a work item, an int32 ``(tensor,
chunk)`` pair, tells a program which chunk of which tensor it owns. Addresses are cast with
``tl.pointer_type``, which also runs under ``TRITON_INTERPRET=1`` on CPU tensors.

There is no step prologue: every program reads its tensor's step, derives the family's
per-step scalars itself, and the program that finishes the tensor last advances the step
(:func:`advance_step`, :func:`advance_step_reread`), as the CUDA kernels do.

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

from .. import launch_table as _lt
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

# Table columns (``fusedopt.launch_table``, csrc/params.h's ``Column``), as constants.
NUMEL: tl.constexpr = tl.constexpr(_lt.NUMEL)
PARAM: tl.constexpr = tl.constexpr(_lt.PARAM)
GRAD: tl.constexpr = tl.constexpr(_lt.GRAD)
STATE0: tl.constexpr = tl.constexpr(_lt.STATE0)
ABSMAX0: tl.constexpr = tl.constexpr(_lt.ABSMAX0)
STEP: tl.constexpr = tl.constexpr(_lt.STEP)
SALT: tl.constexpr = tl.constexpr(_lt.SALT)
OFFSET: tl.constexpr = tl.constexpr(_lt.OFFSET)
ROW_WIDTH: tl.constexpr = tl.constexpr(_lt.ROW_WIDTH)
# Codebook rows (``launch_table.codebook``): values and midpoints of the signed map; the
# unsigned map's are the next row of each.
SIGNED_VALUES: tl.constexpr = tl.constexpr(_lt.SIGNED_VALUES)
SIGNED_MIDS: tl.constexpr = tl.constexpr(_lt.SIGNED_MIDS)


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
def work_item(table, work, CHUNK: tl.constexpr):
    """This program's work item, decoded: ``(tensor, chunk, row, start, n)``, the tensor's
    index, the chunk's index in it, its table row, the chunk's first element (int64), and the elements from there to the end of
    the tensor (``n >= CHUNK`` on every chunk but the last; 0 for a tensor without elements,
    whose one work item only advances its step). A work item is an int32 ``(tensor, chunk)``
    pair (``fusedopt.launch_table``)."""
    item = work + 2 * tl.program_id(0)
    tensor = tl.load(item)
    chunk = tl.load(item + 1)
    start = chunk.to(tl.int64) * CHUNK
    row = table + tensor.to(tl.int64) * ROW_WIDTH
    n = tl.load(row + NUMEL) - start
    return tensor, chunk, row, start, n


@triton.jit
def tensor_step(row):
    """The step count after this step, ``t = step + 1``, of the row's tensor (its fp32 step at
    column ``STEP``). Read before the program counts its chunk done (:func:`advance_step`): the
    program that advances the step is the last to count, so every program reads the step
    before it changes."""
    step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
    return tl.load(step_ptr) + 1.0


@triton.jit
def finished_tensor(counters, tensor, numel, CHUNK: tl.constexpr):
    """Count this program's chunk of ``tensor`` done; True in the program that counts its last
    one (whichever of them finishes last), which resets the counter to 0 for the next launch.

    Memory ordering on the GPU (the interpreter runs the programs one at a time, and
    tests/program_order.py reorders them, but no CPU test can show a race here):

    * Every warp of a program reads the tensor's step at its start (:func:`tensor_step`), and
      a program's warps run unsynchronized through the main loop: the ``debug_barrier``
      (``bar.sync``) makes every warp's step read, and every global store before it (the
      two-pass partials), happen before the one thread that does the atomic.
    * ``tl.atomic_add`` is ``acq_rel`` at GPU scope (Triton's default): it releases what the
      program did before it, and the program that counts the last chunk acquires every earlier
      count's release (an RMW chain). So the step every program read was read before the last
      program writes it, and the partials every program stored are visible to the last
      program, which reads them after counting (through L2: ``.cg`` loads, after Triton's
      barrier that hands the atomic's result to every thread).
    * The last program resets the counter with a plain store: no program of this launch uses
      it again, and the next launch sees it (kernels on a stream are ordered).

    A tensor of one chunk (or none) is finished by its only program, which counts nothing; the
    barrier is still needed there: the thread that stores the new step, or reads the partial,
    must not run ahead of a warp that has not read the step, or stored, yet."""
    chunks = tl.maximum((numel + (CHUNK - 1)) // CHUNK, 1)
    last = chunks == 1
    tl.debug_barrier()
    if chunks > 1:
        done = tl.atomic_add(counters + tensor, 1)
        last = done.to(tl.int64) == chunks - 1
        if last:
            tl.store(counters + tensor, 0)
    return last


@triton.jit
def advance_step(counters, tensor, row, numel, t, CHUNK: tl.constexpr):
    """At the end of a program: count its chunk of ``tensor`` (``numel`` elements) done
    (:func:`finished_tensor`); the last program of the tensor stores its new step ``t`` (from
    :func:`tensor_step` at the start, as every program of the tensor read it). (Kernels return
    before this on a skipped step: steps never advance then.) The step's address is read
    again, by the last program only."""
    if finished_tensor(counters, tensor, numel, CHUNK):
        tl.store(tl.load(row + STEP).to(tl.pointer_type(tl.float32)), t)


@triton.jit
def advance_step_reread(table, work, counters, CHUNK: tl.constexpr):
    """:func:`advance_step` from the work item, the row and the step read again here (volatile
    loads, which the compiler cannot merge with the same loads at the start), not kept across
    the main loop; the step read is the one every program read at its start (no program but
    this one writes it).

    Which values a kernel keeps across its main loop for this matters to ptxas's register
    allocation, not always the same way (tests/test_compile.py, sm_80 and sm_90): keeping
    the tensor, its element count and ``t`` spilled 28 bytes in AdamW's 32-bit kernel (amsgrad,
    bf16, sm_90); reading them again spilled 8 bytes in LAMB8bit's fp16 pass 2 (block 96,
    sm_80) and 20 in SGD8bit's kernel (bf16, sm_90). The 32-bit elementwise kernel reads them
    again (this function), the 8-bit one too unless it rounds stochastically (then it keeps
    them: reading them again, SGD8bit spilled 20 bytes on sm_90; keeping them, Lion8bit without
    stochastic rounding spilled 20 bytes on sm_90 as ``python -m fusedopt static`` compiles
    it); the two-pass kernels keep them (:func:`advance_step`)."""
    tensor = tl.load(work + 2 * tl.program_id(0), volatile=True)
    row = table + tensor.to(tl.int64) * ROW_WIDTH
    if finished_tensor(counters, tensor, tl.load(row + NUMEL, volatile=True), CHUNK):
        step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)


@triton.jit
def step_key(seed, t, row, STOCHASTIC: tl.constexpr):
    """The stochastic-rounding key of this tensor at this step (``rounding_key`` of the seed,
    ``t`` and the row's salt); 0 without ``STOCHASTIC``."""
    if STOCHASTIC:
        key = rounding_key(seed, t, tl.load(row + SALT))
    else:
        key = 0
    return key


@triton.jit
def first_index(row, start, STOCHASTIC: tl.constexpr):
    """The index in the full param of a chunk's first element (``start``): its index in the
    tensor plus the row's offset, where the tensor (a shard) starts in the param (int64; the
    rounding noise's element index). ``start`` without ``STOCHASTIC``."""
    if STOCHASTIC:
        return start + tl.load(row + OFFSET)
    else:
        return start


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
def step_hypers(pointers, x0, x1, x2, MODES: tl.constexpr, HYPERS: tl.constexpr):
    """The per-step derivation's hyper-parameters as the family's ``HYPERS`` struct, in fp64: field
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


@triton.jit
def derived(t, pointers, x0, x1, x2, DERIVE: tl.constexpr, HYPERS: tl.constexpr, MODES: tl.constexpr,
            DERIVED: tl.constexpr):
    """This tensor's per-step scalars as the family's ``DERIVED`` struct (a namedtuple class):
    ``DERIVE(t, h)`` (a ``triton.jit`` function of the step count ``t``, fp32 and exact, and the
    fp64 ``HYPERS`` struct, see :func:`step_hypers`; None: no scalars), each computed in fp64
    and rounded once to fp32, as the reference computes it (and torch's for-loop, on the host).
    Every program of a tensor computes the same values from the same ``t``."""
    out = ()
    if DERIVE is not None:
        d = DERIVE(t, step_hypers(pointers, x0, x1, x2, MODES, HYPERS))
        for k in tl.static_range(len(d)):
            out = out + (d[k].to(tl.float32),)
    return DERIVED(*out)


@triton.jit
def bias_corrections_derive(t, h):
    """``(1 - beta1^t, 1 - beta2^t)``, from ``h.log_beta1``, ``h.log_beta2`` (LAMB's per-step
    scalars)."""
    return one_minus_power(h.log_beta1, t), one_minus_power(h.log_beta2, t)


#: The step struct of :func:`bias_corrections_derive` (``table.log_of`` of each beta).
BiasCorrections = namedtuple("BiasCorrections", ["log_beta1", "log_beta2"])
