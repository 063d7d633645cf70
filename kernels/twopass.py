"""The per-tensor-norm families (LAMB, LARS) in two passes, each one launch per batch whatever
its tensor count; 32-bit or block-wise 8-bit states.

A family is three ``triton.jit`` functions on fp32 values, passed to the kernels as
compile-time arguments (a jit function given as a ``tl.constexpr`` is a constant: it is
inlined, and each family compiles its own kernels):

* ``UPDATE(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS) -> (s0, s1, u)``:
  the new states and the update direction ``u`` from the old states and the gradient;
* ``DIRECTION(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS) -> u``: ``u``
  again from the new states (``g`` is loaded only when the family says it needs it);
* ``FINISH(p_sq, u_sq, hypers, FLAGS) -> scale``: the tensor's scale from ``||p||^2`` and
  ``||u||^2`` (LAMB's trust ratio, LARS's clip).

``s0``, ``s1``: up to two states (a missing one holds ``p``, and the family never reads it);
``t``: the step count after this step (each program reads its tensor's step); ``bias_correction*``:
``1 - beta*^t``, derived by each program (0 for a family without betas); ``hypers``: the
runtime hyper-parameters as a tuple, ``hypers[0]`` the learning rate; ``FLAGS``: the family's
compile-time switches (a tuple).

Pass 1 (:func:`norms_kernel`, :func:`norms8bit_kernel`): ``UPDATE`` on every chunk; the
chunk's sums of ``p^2`` and ``u^2`` go into its own slot of ``partials``, and the program that
finishes a tensor last adds the tensor's slots in order into ``norms[tensor]``
(:func:`finish_norms`: a fixed order, so the same sum whichever program finishes last). 32-bit
states are written back; 8-bit ones are not. Pass 2 (:func:`apply_kernel`,
:func:`apply8bit_kernel`) computes the tensor's scale, ``FINISH`` of its norms, in every
program, and applies ``p -= (lr * scale) * u``: with 32-bit states ``u`` is ``DIRECTION`` of the
states pass 1 stored (fp32, so exactly pass 1's ``u``); with 8-bit states ``UPDATE`` runs again
from the old codes and the gradient (the same inputs, so the same fp32 states and ``u``), and
the states are requantized after the update. So the norms and the update use this step's fp32
states, never the requantized ones, as the reference computes them. The program that
finishes a tensor in pass 2 advances its step. Sharded params (FSDP2): ``norms`` is summed over
the shards between the passes. Deterministic: the only atomics count finished chunks.

Bytes per element, pass 1 + pass 2 (fp32 params and grads; absmax and partials aside): LAMB
24 + 16 = 40, LAMB8bit 10 + 16 = 26; LARS with momentum 16 + 12 = 28 (nesterov 16 + 16 = 32:
pass 2 reads the grad), without 8 + 12 = 20; LARS8bit 9 + 14 = 23 (without momentum it has no
state and runs the 32-bit kernels: 20).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import launch_table
from . import common, quant, table
from .common import GRAD_MULT, SKIP

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8
FINISH_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_hypers(hyper_values, hypers, HYPER_IN_MEMORY: tl.constexpr):
    """The runtime hyper-parameters: the kernel's ``hypers`` tuple, or as many fp32 values read
    from ``hyper_values`` (see ``table.hyper_args``)."""
    if HYPER_IN_MEMORY:
        loaded = ()
        for i in tl.static_range(len(hypers)):
            loaded = loaded + (tl.load(hyper_values + i),)
    else:
        loaded = hypers
    return loaded


@triton.jit
def step_scalars(row, step_pointers, x0, x1, x2, DERIVE: tl.constexpr, STEP_HYPERS: tl.constexpr,
                 MODES: tl.constexpr):
    """``(t, 1 - beta1^t, 1 - beta2^t)`` of this program's tensor: the step count after this
    step, and the bias corrections ``DERIVE`` gives (fp64, rounded
    once: ``common.derived``; 0 for a family without betas, ``DERIVE`` None)."""
    t = common.tensor_step(row)
    if DERIVE is not None:
        d = common.derived(t, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS, MODES, common.BiasCorrections)
        bias_correction1 = d[0]
        bias_correction2 = d[1]
    else:
        bias_correction1 = 0.0
        bias_correction2 = 0.0
    return t, bias_correction1, bias_correction2


@triton.jit
def state_ptrs(row, start, FIRST: tl.constexpr, STATES: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of the ``STATES`` (0 to 2) streams in columns ``FIRST``,
    ``FIRST + 1`` of a row (the states, or their absmaxes), of ``DTYPE`` (fp32, or uint8
    codes). A missing one is the row itself (a pointer, of the same type, that the kernels never
    dereference: they read a state only below ``STATES``)."""
    s0 = row.to(tl.pointer_type(DTYPE))
    if STATES >= 1:
        s0 = common.load_ptr(row, FIRST, DTYPE, ALIGNED) + start
    s1 = s0
    if STATES >= 2:
        s1 = common.load_ptr(row, FIRST + 1, DTYPE, ALIGNED) + start
    return s0, s1


@triton.jit
def finish_norms(table, work, counters, partials, norms, p_sq, u_sq, CHUNK: tl.constexpr,
                 FINISH_BLOCK: tl.constexpr):
    """The end of pass 1 in every program: its chunk's ``(sum p^2, sum u^2)`` into its slot of
    ``partials`` (the program's index: a tensor's slots are consecutive, as its work items
    are), then the program that finishes the tensor last (``common.finished_tensor``; its
    acquire makes the other programs' slots visible) adds the tensor's slots in order into
    ``norms[tensor]``: the same sum whichever program it is, and the same as a separate finish
    launch would compute. (The work item is read again here, volatile, as in
    ``common.advance_step_reread``: nothing held across the main loop.)"""
    w = tl.program_id(0)
    tl.store(partials + 2 * w, p_sq)
    tl.store(partials + 2 * w + 1, u_sq)
    tensor = tl.load(work + 2 * w, volatile=True)
    chunk = tl.load(work + 2 * w + 1, volatile=True)
    numel = tl.load(table + tensor.to(tl.int64) * common.ROW_WIDTH + common.NUMEL, volatile=True)
    if common.finished_tensor(counters, tensor, numel, CHUNK):
        begin = w - chunk
        end = begin + tl.maximum((numel + (CHUNK - 1)) // CHUNK, 1).to(tl.int32)
        o = tl.arange(0, FINISH_BLOCK)
        p_acc = tl.zeros([FINISH_BLOCK], tl.float32)
        u_acc = tl.zeros([FINISH_BLOCK], tl.float32)
        for off in range(begin, end, FINISH_BLOCK):
            mask = off + o < end
            p_acc += tl.load(partials + 2 * (off + o), mask=mask, other=0.0, cache_modifier=".cg")
            u_acc += tl.load(partials + 2 * (off + o) + 1, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(norms + 2 * tensor, tl.sum(p_acc, axis=0))
        tl.store(norms + 2 * tensor + 1, tl.sum(u_acc, axis=0))


@triton.jit
def tensor_scale(norms, tensor, hypers, FINISH: tl.constexpr, FLAGS: tl.constexpr):
    """The tensor's scale, ``FINISH`` of its ``||p||^2`` and ``||u||^2`` (pass 2: every program
    of the tensor computes the same)."""
    return FINISH(tl.load(norms + 2 * tensor), tl.load(norms + 2 * tensor + 1), hypers, FLAGS)


@triton.jit
def _squares(p, u, mask):
    """``(p^2, u^2)``, 0 in lanes past the end (which hold garbage)."""
    if mask is not None:
        p = tl.where(mask, p, 0.0)
        u = tl.where(mask, u, 0.0)
    return p * p, u * u


# ---------------------------------------------------------------------------------------------
# 32-bit states
# ---------------------------------------------------------------------------------------------


@triton.jit
def _norms_block(p_ptr, g_ptr, s0_ptr, s1_ptr, mask, grad_mult, t, bias_correction1, bias_correction2, hypers,
                 UPDATE: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    s0 = p
    s1 = p
    if STATES >= 1:
        s0 = tl.load(s0_ptr + o, mask=mask)
    if STATES >= 2:
        s1 = tl.load(s1_ptr + o, mask=mask)
    s0, s1, u = UPDATE(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS)
    if STATES >= 1:
        tl.store(s0_ptr + o, s0, mask=mask)
    if STATES >= 2:
        tl.store(s1_ptr + o, s1, mask=mask)
    return _squares(p, u, mask)


@triton.jit
def norms_kernel(table, work, counters, scalars, hyper_values, partials, norms, hypers, step_pointers,
                 x0: tl.float64, x1: tl.float64, x2: tl.float64, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                 STATES: tl.constexpr, DERIVE: tl.constexpr, STEP_HYPERS: tl.constexpr, MODES: tl.constexpr,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, FINISH_BLOCK: tl.constexpr):
    """Pass 1, 32-bit states. Table row: param, grad, ``STATES`` fp32 states, step. The new
    states are written back; slot ``partials[program]`` gets the chunk's ``(sum p^2, sum u^2)``
    and ``norms[tensor]`` the tensor's (:func:`finish_norms`). The step is not advanced."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t, bias_correction1, bias_correction2 = step_scalars(row, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS,
                                                             MODES)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, common.STATE0, STATES, tl.float32, ALIGNED)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        p_sq = tl.zeros([BLOCK], tl.float32)
        u_sq = tl.zeros([BLOCK], tl.float32)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                pp, uu = _norms_block(p_ptr + off, g_ptr + off, s0_ptr + off, s1_ptr + off, None, grad_mult, t,
                                      bias_correction1, bias_correction2, hypers, UPDATE, FLAGS, STATES, BLOCK)
                p_sq += pp
                u_sq += uu
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                pp, uu = _norms_block(p_ptr + off, g_ptr + off, s0_ptr + off, s1_ptr + off,
                                      tl.arange(0, BLOCK) < tail - off, grad_mult, t, bias_correction1,
                                      bias_correction2, hypers, UPDATE, FLAGS, STATES, BLOCK)
                p_sq += pp
                u_sq += uu
        finish_norms(table, work, counters, partials, norms, tl.sum(p_sq, axis=0), tl.sum(u_sq, axis=0), CHUNK,
                     FINISH_BLOCK)


@triton.jit
def _apply_block(p_ptr, g_ptr, s0_ptr, s1_ptr, mask, index, key, grad_mult, lr_scale, t, bias_correction1,
                 bias_correction2, hypers, DIRECTION: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr,
                 READS_GRAD: tl.constexpr, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = p
    s0 = p
    s1 = p
    if READS_GRAD:
        g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    if STATES >= 1:
        s0 = tl.load(s0_ptr + o, mask=mask)
    if STATES >= 2:
        s1 = tl.load(s1_ptr + o, mask=mask)
    u = DIRECTION(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS)
    p = p - lr_scale * u
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])
def apply_kernel(table, work, counters, scalars, hyper_values, norms, hypers, seed, step_pointers, x0: tl.float64,
                 x1: tl.float64, x2: tl.float64, DIRECTION: tl.constexpr, FINISH: tl.constexpr, FLAGS: tl.constexpr,
                 STATES: tl.constexpr, READS_GRAD: tl.constexpr, DERIVE: tl.constexpr, STEP_HYPERS: tl.constexpr,
                 MODES: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                 HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2, 32-bit states: ``p -= (lr * scale) * u``, ``scale`` the family's ``FINISH`` of
    the tensor's norms, ``u`` its ``DIRECTION`` of the states pass 1 stored (and of the grad,
    ``READS_GRAD``); the program that finishes the tensor advances its step."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t, bias_correction1, bias_correction2 = step_scalars(row, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS,
                                                             MODES)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, common.STATE0, STATES, tl.float32, ALIGNED)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        lr_scale = hypers[0] * tensor_scale(norms, tensor, hypers, FINISH, FLAGS)
        key = common.step_key(seed, t, row, STOCHASTIC)
        first = common.first_index(row, start, STOCHASTIC)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _apply_block(p_ptr + off, g_ptr + off, s0_ptr + off, s1_ptr + off, None, first + off, key, grad_mult,
                             lr_scale, t, bias_correction1, bias_correction2, hypers, DIRECTION, FLAGS, STATES,
                             READS_GRAD, P_DTYPE, STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _apply_block(p_ptr + off, g_ptr + off, s0_ptr + off, s1_ptr + off, tl.arange(0, BLOCK) < tail - off,
                             first + off, key, grad_mult, lr_scale, t, bias_correction1, bias_correction2, hypers,
                             DIRECTION, FLAGS, STATES, READS_GRAD, P_DTYPE, STOCHASTIC, BLOCK)
        common.advance_step(counters, tensor, row, start + n, t, CHUNK)


# ---------------------------------------------------------------------------------------------
# 8-bit states (see :mod:`fusedopt.kernels.quant` for the tiles)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _update_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, o, mask, row_mask, blocks, codebook, grad_mult,
                 t, bias_correction1, bias_correction2, hypers, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                 STATES: tl.constexpr, CODEBOOKS: tl.constexpr):
    """``(p, s0, s1, u)`` of a tile: its param, and ``UPDATE`` of its dequantized states."""
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    s0 = p
    s1 = p
    if STATES >= 1:
        s0 = quant.load_state(s0_ptr, a0_ptr, o, blocks, mask, row_mask,
                              codebook + 256 * (common.SIGNED_VALUES + 1 - CODEBOOKS[0]))
    if STATES >= 2:
        s1 = quant.load_state(s1_ptr, a1_ptr, o, blocks, mask, row_mask,
                              codebook + 256 * (common.SIGNED_VALUES + 1 - CODEBOOKS[1]))
    s0, s1, u = UPDATE(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS)
    return p, s0, s1, u


@triton.jit
def _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, n, first_block, codebook, grad_mult, t,
                bias_correction1, bias_correction2, hypers, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                STATES: tl.constexpr, CODEBOOKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    o = quant.tile_offsets(base, BLOCK_SIZE, BLOCK_PAD, ROWS)
    if MASKED or BLOCK_PAD != BLOCK_SIZE:
        mask, row_mask = quant.tile_masks(base, n, BLOCK_SIZE, BLOCK_PAD, ROWS, MASKED)
    else:
        mask = None
        row_mask = None
    blocks = first_block + base // BLOCK_SIZE + tl.arange(0, ROWS)
    p, s0, s1, u = _update_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, o, mask, row_mask, blocks,
                                codebook, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                FLAGS, STATES, CODEBOOKS)
    pp, uu = _squares(p, u, mask)
    return tl.sum(pp, axis=1), tl.sum(uu, axis=1)


@triton.jit
def norms8bit_kernel(table, work, counters, scalars, hyper_values, partials, norms, codebook, hypers, step_pointers,
                     x0: tl.float64, x1: tl.float64, x2: tl.float64, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                     STATES: tl.constexpr, CODEBOOKS: tl.constexpr, DERIVE: tl.constexpr,
                     STEP_HYPERS: tl.constexpr, MODES: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, FINISH_BLOCK: tl.constexpr):
    """Pass 1, 8-bit states. Table row: param, grad, ``STATES`` uint8 codes, their fp32 absmax,
    step; ``CODEBOOKS[i]``: 1 where state ``i`` is signed (``launch_table.codebook``'s rows).
    Nothing is written but the chunk's slot of ``partials`` and the tensor's ``norms``
    (:func:`finish_norms`): the new states are computed again in pass 2."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t, bias_correction1, bias_correction2 = step_scalars(row, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS,
                                                             MODES)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, common.STATE0, STATES, tl.uint8, ALIGNED)
        a0_ptr, a1_ptr = state_ptrs(row, 0, common.ABSMAX0, STATES, tl.float32, False)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        first_block = chunk * (TILES * ROWS)
        p_sq = tl.zeros([ROWS], tl.float32)
        u_sq = tl.zeros([ROWS], tl.float32)
        if n >= CHUNK:
            for it in range(TILES):
                pp, uu = _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, it * (ROWS * BLOCK_SIZE), n,
                                     first_block, codebook, grad_mult, t, bias_correction1, bias_correction2,
                                     hypers, UPDATE, FLAGS, STATES, CODEBOOKS, BLOCK_SIZE, BLOCK_PAD, ROWS, False)
                p_sq += pp
                u_sq += uu
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                pp, uu = _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, tail, first_block,
                                     codebook, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                     FLAGS, STATES, CODEBOOKS, BLOCK_SIZE, BLOCK_PAD, ROWS, True)
                p_sq += pp
                u_sq += uu
        finish_norms(table, work, counters, partials, norms, tl.sum(p_sq, axis=0), tl.sum(u_sq, axis=0), CHUNK,
                     FINISH_BLOCK)


@triton.jit
def _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, n, first_block, index, key, codebook,
                grad_mult, lr_scale, t, bias_correction1, bias_correction2, hypers,
                UPDATE: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, CODEBOOKS: tl.constexpr,
                P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    o = quant.tile_offsets(base, BLOCK_SIZE, BLOCK_PAD, ROWS)
    if MASKED or BLOCK_PAD != BLOCK_SIZE:
        mask, row_mask = quant.tile_masks(base, n, BLOCK_SIZE, BLOCK_PAD, ROWS, MASKED)
    else:
        mask = None
        row_mask = None
    blocks = first_block + base // BLOCK_SIZE + tl.arange(0, ROWS)
    p, s0, s1, u = _update_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, o, mask, row_mask, blocks,
                                codebook, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                FLAGS, STATES, CODEBOOKS)
    p = p - lr_scale * u
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    if STATES >= 1:
        quant.store_state(s0, s0_ptr, a0_ptr, o, blocks, mask, row_mask,
                          codebook + 256 * (common.SIGNED_MIDS + 1 - CODEBOOKS[0]), CODEBOOKS[0])
    if STATES >= 2:
        quant.store_state(s1, s1_ptr, a1_ptr, o, blocks, mask, row_mask,
                          codebook + 256 * (common.SIGNED_MIDS + 1 - CODEBOOKS[1]), CODEBOOKS[1])


@triton.jit(do_not_specialize=["seed"])
def apply8bit_kernel(table, work, counters, scalars, hyper_values, norms, codebook, hypers, seed, step_pointers,
                     x0: tl.float64, x1: tl.float64, x2: tl.float64, UPDATE: tl.constexpr, FINISH: tl.constexpr,
                     FLAGS: tl.constexpr, STATES: tl.constexpr, CODEBOOKS: tl.constexpr, DERIVE: tl.constexpr,
                     STEP_HYPERS: tl.constexpr, MODES: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Pass 2, 8-bit states: the states again from the old codes and the grad (``UPDATE``, as in
    pass 1), ``p -= (lr * scale) * u``, then the states requantized; the program that finishes
    the tensor advances its step."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t, bias_correction1, bias_correction2 = step_scalars(row, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS,
                                                             MODES)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, common.STATE0, STATES, tl.uint8, ALIGNED)
        a0_ptr, a1_ptr = state_ptrs(row, 0, common.ABSMAX0, STATES, tl.float32, False)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        lr_scale = hypers[0] * tensor_scale(norms, tensor, hypers, FINISH, FLAGS)
        key = common.step_key(seed, t, row, STOCHASTIC)
        first = common.first_index(row, start, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, it * (ROWS * BLOCK_SIZE), n, first_block,
                            first, key, codebook, grad_mult, lr_scale, t, bias_correction1, bias_correction2, hypers,
                            UPDATE, FLAGS, STATES, CODEBOOKS, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, tail, first_block, first, key,
                            codebook, grad_mult, lr_scale, t, bias_correction1, bias_correction2, hypers, UPDATE,
                            FLAGS, STATES, CODEBOOKS, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, True)
        common.advance_step(counters, tensor, row, start + n, t, CHUNK)


# ---------------------------------------------------------------------------------------------
# The host side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A per-tensor-norm family's device functions (see the module docstring)."""

    name: str  # its launch tables' name in ``batch.cache``
    update: object  # triton.jit UPDATE
    direction: object  # triton.jit DIRECTION
    finish: object  # triton.jit FINISH


def step(batch, family: Family, states, signed, hypers, flags, reads_grad: bool, beta_indices=(None, None)) -> None:
    """Pass 1 and pass 2 of ``family`` over ``batch``: two launches whatever the tensor count
    (sharded params: the tensors' norms summed over the shards between them).

    ``states``: the names of the batch's states the family updates (at most two, in its
    ``s0, s1`` order), ``signed`` their 8-bit codebooks; ``hypers``: the runtime
    hyper-parameters (``table.group_value`` each; the lr first, the betas at ``beta_indices``
    for the bias corrections each program derives); ``flags``: the compile-time switches (a
    tuple); ``reads_grad``: whether ``DIRECTION`` uses the grad (then pass 2 of 32-bit states
    reads it)."""
    quantized = batch.quantized and len(states) > 0  # no state: nothing to quantize
    if quantized:
        quant.check_block(batch)
    cols = launch_table.columns(batch.params, batch.grads, [batch.state[n] for n in states],
                                [batch.state[n + "_absmax"] for n in states] if quantized else (), batch.steps)
    stochastic = table.stochastic(batch)
    name = family.name + ("8bit" if quantized else "")
    chunk = quant.chunk(batch.block_size) if quantized else table.CHUNK
    tab = launch_table.lookup(batch.cache, name, cols, chunk, extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    step_values = None
    if beta_indices[0] is not None and beta_indices[1] is not None:
        step_values = common.BiasCorrections(table.log_of(hypers[beta_indices[0]]), table.log_of(hypers[beta_indices[1]]))
    pointers, numbers, modes = table.step_args(step_values, batch.scalars)
    step_args = (pointers, *numbers)
    values, in_memory, values_tensor = table.hyper_args(hypers, device)
    hyper_tensor = values_tensor if in_memory else batch.scalars  # never read when no value is a tensor
    scratch = tab.scratch.get(name)
    if scratch is None:
        scratch = (torch.empty((tab.n_work, 2), dtype=torch.float32, device=device),
                   torch.empty((tab.n_tensors, 2), dtype=torch.float32, device=device))
        tab.scratch[name] = scratch
    partials, norms = scratch
    scalars = batch.scalars
    values = tuple(values)
    flags = tuple(flags)
    common_args = dict(FLAGS=flags, STATES=len(states), HYPER_IN_MEMORY=in_memory, ALIGNED=tab.aligned,
                       P_DTYPE=table.tl_dtype(batch.params[0].dtype), G_DTYPE=table.tl_dtype(batch.grads[0].dtype),
                       DERIVE=common.bias_corrections_derive if step_values is not None else None,
                       STEP_HYPERS=common.BiasCorrections if step_values is not None else None, MODES=modes)
    if quantized:
        codebook = launch_table.codebook(device)
        layout = dict(CODEBOOKS=tuple(int(s) for s in signed), **quant.layout(batch.block_size))
        norms8bit_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.counters, scalars, hyper_tensor, partials, norms, codebook, values, *step_args,
            UPDATE=family.update, **common_args, **layout, FINISH_BLOCK=FINISH_BLOCK, num_warps=quant.NUM_WARPS,
            enable_fp_fusion=False,
        )
    else:
        norms_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.counters, scalars, hyper_tensor, partials, norms, values, *step_args,
            UPDATE=family.update, **common_args, CHUNK=table.CHUNK, BLOCK=BLOCK, FINISH_BLOCK=FINISH_BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
    if batch.all_reduce is not None:
        batch.all_reduce(norms)  # sharded params (FSDP2): each tensor's norms over its shards
    seed = table.seed(batch.group)
    if quantized:
        apply8bit_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.counters, scalars, hyper_tensor, norms, codebook, values, seed, *step_args,
            UPDATE=family.update, FINISH=family.finish, **common_args, **layout, STOCHASTIC=stochastic,
            num_warps=quant.NUM_WARPS, enable_fp_fusion=False,
            **quant.register_limit(batch.params[0].element_size() == 2),
        )
    else:
        apply_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.counters, scalars, hyper_tensor, norms, values, seed, *step_args,
            DIRECTION=family.direction, FINISH=family.finish, **common_args, READS_GRAD=reads_grad,
            STOCHASTIC=stochastic, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
