"""The per-tensor-norm families (LAMB, LARS) in two passes, each one launch per batch whatever
its tensor count, after the step prologue; 32-bit or block-wise 8-bit states.

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
``t``: the step count after this step; ``bias_correction*``: ``1 - beta*^t`` from the step
prologue (0 for a family without betas); ``hypers``: the runtime hyper-parameters as a tuple,
``hypers[0]`` the learning rate; ``FLAGS``: the family's compile-time switches (a tuple).

Pass 1 (:func:`norms_kernel`): ``UPDATE`` on every chunk; the chunk's sums of ``p^2`` and
``u^2`` go into its own slot of ``partials``. 32-bit states are written back; 8-bit ones are
not. The finish (:func:`finish_kernel`, one program per tensor) adds each tensor's slots in
order and calls ``FINISH``. Pass 2 (:func:`apply_kernel`, :func:`apply8bit_kernel`) applies
``p -= (lr * scale) * u``: with 32-bit states ``u`` is ``DIRECTION`` of the states pass 1 stored
(fp32, so exactly pass 1's ``u``); with 8-bit states ``UPDATE`` runs again from the old codes
and the gradient (the same inputs, so the same fp32 states and ``u``), and the states are
requantized after the update. So the norms and the update use this step's fp32 states, never
the requantized ones, as the reference computes them. Deterministic: no atomics.

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

from . import common, quant, table
from .common import GRAD_MULT, SKIP, STEP_WIDTH, T_COL

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
def tensor_steps(steps, tensor):
    """``(t, 1 - beta1^t, 1 - beta2^t)`` of this tensor, from the step prologue."""
    t = tl.load(steps + tensor * STEP_WIDTH + T_COL)
    bias_correction1, bias_correction2 = common.bias_corrections(steps, tensor)
    return t, bias_correction1, bias_correction2


@triton.jit
def state_ptrs(row, start, STATES: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of the ``STATES`` (0 to 2) states in columns 2, 3 of a row,
    of ``DTYPE`` (fp32, or uint8 codes). A missing one is the row itself (a pointer, of the same
    type, that the kernels never dereference: they read a state only below ``STATES``)."""
    s0 = row.to(tl.pointer_type(DTYPE))
    if STATES >= 1:
        s0 = common.load_ptr(row, 2, DTYPE, ALIGNED) + start
    s1 = s0
    if STATES >= 2:
        s1 = common.load_ptr(row, 3, DTYPE, ALIGNED) + start
    return s0, s1


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
def norms_kernel(table, work, steps, scalars, hyper_values, partials, hypers,
                 UPDATE: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, WIDTH: tl.constexpr,
                 P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1, 32-bit states. Table row: param, grad, ``STATES`` fp32 states, step, numel, salt,
    offset. The new states are written back; slot ``partials[program]`` gets the chunk's
    ``(sum p^2, sum u^2)``."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, STATES, tl.float32, ALIGNED)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        t, bias_correction1, bias_correction2 = tensor_steps(steps, tensor)
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
        w = tl.program_id(0)
        tl.store(partials + 2 * w, tl.sum(p_sq, axis=0))
        tl.store(partials + 2 * w + 1, tl.sum(u_sq, axis=0))


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
def apply_kernel(table, work, steps, scalars, hyper_values, scales, hypers, seed,
                 DIRECTION: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, READS_GRAD: tl.constexpr,
                 WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                 HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2, 32-bit states: ``p -= (lr * scale) * u``, ``u`` the family's ``DIRECTION`` of the
    states pass 1 stored (and of the grad, ``READS_GRAD``)."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, STATES, tl.float32, ALIGNED)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        t, bias_correction1, bias_correction2 = tensor_steps(steps, tensor)
        lr_scale = hypers[0] * tl.load(scales + tensor)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
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


# ---------------------------------------------------------------------------------------------
# The per-tensor finish
# ---------------------------------------------------------------------------------------------


@triton.jit
def finish_kernel(first, partials, scales, hyper_values, hypers, FINISH: tl.constexpr, FLAGS: tl.constexpr,
                  HYPER_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    """One program per tensor: its slots ``first[tensor]`` to ``first[tensor + 1]`` of
    ``partials``, added in order, give ``||p||^2`` and ``||u||^2``, and ``FINISH`` its scale."""
    tensor = tl.program_id(0)
    begin = tl.load(first + tensor)
    end = tl.load(first + tensor + 1)
    hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
    o = tl.arange(0, BLOCK)
    p_sq = tl.zeros([BLOCK], tl.float32)
    u_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(begin, end, BLOCK):
        mask = off + o < end
        p_sq += tl.load(partials + 2 * (off + o), mask=mask, other=0.0)
        u_sq += tl.load(partials + 2 * (off + o) + 1, mask=mask, other=0.0)
    scale = FINISH(tl.sum(p_sq, axis=0), tl.sum(u_sq, axis=0), hypers, FLAGS)
    tl.store(scales + tensor, scale)


# ---------------------------------------------------------------------------------------------
# 8-bit states (see :mod:`fusedopt.kernels.quant` for the tiles)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _update_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, o, mask, row_mask, blocks, code_values, grad_mult,
                 t, bias_correction1, bias_correction2, hypers, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
                 STATES: tl.constexpr, CODEBOOKS: tl.constexpr):
    """``(p, s0, s1, u)`` of a tile: its param, and ``UPDATE`` of its dequantized states."""
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    s0 = p
    s1 = p
    if STATES >= 1:
        s0 = quant.load_state(s0_ptr, a0_ptr, o, blocks, mask, row_mask, code_values + 256 * CODEBOOKS[0])
    if STATES >= 2:
        s1 = quant.load_state(s1_ptr, a1_ptr, o, blocks, mask, row_mask, code_values + 256 * CODEBOOKS[1])
    s0, s1, u = UPDATE(p, g, s0, s1, t, bias_correction1, bias_correction2, hypers, FLAGS)
    return p, s0, s1, u


@triton.jit
def _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, n, first_block, code_values, grad_mult, t,
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
                                code_values, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                FLAGS, STATES, CODEBOOKS)
    pp, uu = _squares(p, u, mask)
    return tl.sum(pp, axis=1), tl.sum(uu, axis=1)


@triton.jit
def norms8bit_kernel(table, work, steps, scalars, hyper_values, partials, code_values, hypers,
                     UPDATE: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, CODEBOOKS: tl.constexpr,
                     WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Pass 1, 8-bit states. Table row: param, grad, ``STATES`` uint8 codes, their fp32 absmax,
    step, numel, salt, offset; ``CODEBOOKS[i]``: 1 where state ``i`` is signed (row 1 of
    ``code_values``, see ``table.codebooks``). Nothing is written but the chunk's slot of
    ``partials``: the new states are computed again in pass 2."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, STATES, tl.uint8, ALIGNED)
        a0_ptr, a1_ptr = state_ptrs(row + STATES, 0, STATES, tl.float32, False)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        t, bias_correction1, bias_correction2 = tensor_steps(steps, tensor)
        first_block = chunk * (TILES * ROWS)
        p_sq = tl.zeros([ROWS], tl.float32)
        u_sq = tl.zeros([ROWS], tl.float32)
        if n >= CHUNK:
            for it in range(TILES):
                pp, uu = _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, it * (ROWS * BLOCK_SIZE), n,
                                     first_block, code_values, grad_mult, t, bias_correction1, bias_correction2,
                                     hypers, UPDATE, FLAGS, STATES, CODEBOOKS, BLOCK_SIZE, BLOCK_PAD, ROWS, False)
                p_sq += pp
                u_sq += uu
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                pp, uu = _norms_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, tail, first_block,
                                     code_values, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                     FLAGS, STATES, CODEBOOKS, BLOCK_SIZE, BLOCK_PAD, ROWS, True)
                p_sq += pp
                u_sq += uu
        w = tl.program_id(0)
        tl.store(partials + 2 * w, tl.sum(p_sq, axis=0))
        tl.store(partials + 2 * w + 1, tl.sum(u_sq, axis=0))


@triton.jit
def _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, n, first_block, index, key, code_values,
                code_mids, grad_mult, lr_scale, t, bias_correction1, bias_correction2, hypers,
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
                                code_values, grad_mult, t, bias_correction1, bias_correction2, hypers, UPDATE,
                                FLAGS, STATES, CODEBOOKS)
    p = p - lr_scale * u
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    if STATES >= 1:
        quant.store_state(s0, s0_ptr, a0_ptr, o, blocks, mask, row_mask, code_mids + 256 * CODEBOOKS[0],
                          CODEBOOKS[0])
    if STATES >= 2:
        quant.store_state(s1, s1_ptr, a1_ptr, o, blocks, mask, row_mask, code_mids + 256 * CODEBOOKS[1],
                          CODEBOOKS[1])


@triton.jit(do_not_specialize=["seed"])
def apply8bit_kernel(table, work, steps, scalars, hyper_values, scales, code_values, code_mids, hypers, seed,
                     UPDATE: tl.constexpr, FLAGS: tl.constexpr, STATES: tl.constexpr, CODEBOOKS: tl.constexpr,
                     WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                     HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Pass 2, 8-bit states: the states again from the old codes and the grad (``UPDATE``, as in
    pass 1), ``p -= (lr * scale) * u``, then the states requantized."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s0_ptr, s1_ptr = state_ptrs(row, start, STATES, tl.uint8, ALIGNED)
        a0_ptr, a1_ptr = state_ptrs(row + STATES, 0, STATES, tl.float32, False)
        hypers = load_hypers(hyper_values, hypers, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        t, bias_correction1, bias_correction2 = tensor_steps(steps, tensor)
        lr_scale = hypers[0] * tl.load(scales + tensor)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, it * (ROWS * BLOCK_SIZE), n, first_block,
                            first, key, code_values, code_mids, grad_mult, lr_scale, t, bias_correction1,
                            bias_correction2, hypers, UPDATE, FLAGS, STATES, CODEBOOKS, P_DTYPE, STOCHASTIC,
                            BLOCK_SIZE, BLOCK_PAD, ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _apply_tile(p_ptr, g_ptr, s0_ptr, s1_ptr, a0_ptr, a1_ptr, base, tail, first_block, first, key,
                            code_values, code_mids, grad_mult, lr_scale, t, bias_correction1, bias_correction2,
                            hypers, UPDATE, FLAGS, STATES, CODEBOOKS, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD,
                            ROWS, True)


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
    """The step prologue, pass 1, the per-tensor finish and pass 2 of ``family`` over ``batch``:
    four launches whatever the tensor count (sharded params: the finish after a sum over the
    shards, :func:`_sharded_partials`).

    ``states``: the names of the batch's states the family updates (at most two, in its
    ``s0, s1`` order), ``signed`` their 8-bit codebooks; ``hypers``: the runtime
    hyper-parameters (``table.group_value`` each; the lr first, the betas at ``beta_indices``
    for the prologue's bias corrections); ``flags``: the compile-time switches (a tuple);
    ``reads_grad``: whether ``DIRECTION`` uses the grad (then pass 2 of 32-bit states reads it)."""
    quantized = batch.quantized and len(states) > 0  # no state: nothing to quantize
    if quantized:
        quant.check_block(batch)
    streams = [batch.params, batch.grads] + [batch.state[n] for n in states]
    if quantized:
        streams += [batch.state[n + "_absmax"] for n in states]
    streams.append(batch.steps)
    stochastic = table.stochastic(batch)
    name = family.name + ("8bit" if quantized else "")
    tab = table.lookup(batch.cache, name, streams, vector_streams=2 + len(states),
                       chunk=quant.chunk(batch.block_size) if quantized else table.CHUNK,
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hypers, beta1_index=beta_indices[0],
                                                     beta2_index=beta_indices[1])
    scratch = tab.scratch.get(name)
    if scratch is None:
        scratch = (torch.empty((max(tab.n_work, 1), 2), dtype=torch.float32, device=device),
                   torch.empty(tab.n_tensors, dtype=torch.float32, device=device))
        tab.scratch[name] = scratch
    partials, scales = scratch
    if tab.n_work == 0:
        return
    scalars = batch.scalars
    values = tuple(values)
    flags = tuple(flags)
    dtypes = dict(P_DTYPE=table.tl_dtype(batch.params[0].dtype), G_DTYPE=table.tl_dtype(batch.grads[0].dtype))
    common_args = dict(FLAGS=flags, STATES=len(states), WIDTH=tab.width, HYPER_IN_MEMORY=in_memory,
                       ALIGNED=tab.aligned, **dtypes)
    if quantized:
        code_values, code_mids = table.codebooks(device)
        layout = dict(CODEBOOKS=tuple(int(s) for s in signed), **quant.layout(batch.block_size))
        norms8bit_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.steps, scalars, hyper_tensor, partials, code_values, values,
            UPDATE=family.update, **common_args, **layout, num_warps=quant.NUM_WARPS, enable_fp_fusion=False,
        )
    else:
        norms_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.steps, scalars, hyper_tensor, partials, values,
            UPDATE=family.update, **common_args, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    first = tab.first
    if batch.all_reduce is not None:
        partials, first = _sharded_partials(tab, partials, batch.all_reduce)
    finish_kernel[(tab.n_tensors,)](first, partials, scales, hyper_tensor, values, FINISH=family.finish, FLAGS=flags,
                                    HYPER_IN_MEMORY=in_memory, BLOCK=FINISH_BLOCK, num_warps=4,
                                    enable_fp_fusion=False)
    seed = table.seed(batch.group)
    if quantized:
        apply8bit_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.steps, scalars, hyper_tensor, scales, code_values, code_mids, values, seed,
            UPDATE=family.update, **common_args, **layout, STOCHASTIC=stochastic, num_warps=quant.NUM_WARPS,
            enable_fp_fusion=False,
        )
    else:
        apply_kernel[(tab.n_work,)](
            tab.rows, tab.work, tab.steps, scalars, hyper_tensor, scales, values, seed,
            DIRECTION=family.direction, **common_args, READS_GRAD=reads_grad,
            STOCHASTIC=stochastic, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )


def _sharded_partials(tab, partials, all_reduce):
    """Sharded params (FSDP2): each tensor's ``||p||^2`` and ``||u||^2`` partials summed on this
    rank, then over the shards; returned as one slot per tensor (with its ``first`` index), for
    the finish to turn into scales as it does unsharded ones."""
    sharded = tab.scratch.get("sharded")
    if sharded is None:
        first = tab.first.to(torch.int64)
        owner = torch.repeat_interleave(torch.arange(tab.n_tensors, device=first.device), first[1:] - first[:-1])
        one_each = torch.arange(tab.n_tensors + 1, dtype=torch.int32, device=first.device)
        sharded = tab.scratch["sharded"] = (owner, one_each)
    owner, one_each = sharded
    squares = torch.zeros((tab.n_tensors, 2), dtype=torch.float32, device=partials.device)
    squares.index_add_(0, owner, partials[: tab.n_work])
    all_reduce(squares)
    return squares, one_each
