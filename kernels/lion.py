"""Lion with a 32-bit or block-wise 8-bit state: one launch per batch (after the step
prologue, which only advances the steps).

The math is :func:`lion_math`, named as in DESIGN.md; the kernels only move bytes around it
(see :mod:`fusedopt.kernels.adam` for the layout of a launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common, quant, table
from .common import GRAD_MULT, SKIP

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8


@triton.jit
def lion_math(p, g, m, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay):
    """One Lion step on fp32 values; returns ``(p, m)``. ``decay = 1 - lr * weight_decay``;
    the order of operations is the reference's (``fusedopt.reference.lion_math``)."""
    p = p * decay
    c = beta1 * m + one_minus_beta1 * g
    sign = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)  # torch.sign: 0 for 0 and for NaN
    p = p - lr * sign
    m = beta2 * m + one_minus_beta2 * g
    return p, m


@triton.jit
def _hyper(hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, HYPER_IN_MEMORY: tl.constexpr):
    """The runtime hyper-parameters: the kernel's arguments, or read from ``hyper_values`` (see
    table.hyper_args)."""
    if HYPER_IN_MEMORY:
        lr = tl.load(hyper_values + 0)
        beta1 = tl.load(hyper_values + 1)
        one_minus_beta1 = tl.load(hyper_values + 2)
        beta2 = tl.load(hyper_values + 3)
        one_minus_beta2 = tl.load(hyper_values + 4)
        decay = tl.load(hyper_values + 5)
    return lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay


@triton.jit
def _lion_block(p_ptr, g_ptr, m_ptr, mask, index, key, grad_mult, lr, beta1, one_minus_beta1, beta2,
                one_minus_beta2, decay, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    m = tl.load(m_ptr + o, mask=mask)
    p, m = lion_math(p, g, m, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    tl.store(m_ptr + o, m, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def lion_kernel(table, work, steps, scalars, hyper_values,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, seed,
                WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Table row: param, grad, exp_avg, step, numel, salt, offset."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, g_ptr, m_ptr, _, _ = common.stream_ptrs(row, start, P_DTYPE, G_DTYPE, tl.float32, 1, ALIGNED)
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = _hyper(
            hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _lion_block(p_ptr + off, g_ptr + off, m_ptr + off, None, first + off, key, grad_mult, lr,
                            beta1, one_minus_beta1, beta2, one_minus_beta2, decay, P_DTYPE, STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _lion_block(p_ptr + off, g_ptr + off, m_ptr + off, tl.arange(0, BLOCK) < tail - off, first + off,
                            key, grad_mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, P_DTYPE,
                            STOCHASTIC, BLOCK)


@triton.jit
def _lion8bit_tile(p_ptr, g_ptr, m_ptr, m_absmax_ptr, base, n, first_block, index, key, code_values, code_mids,
                   grad_mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
                   P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    o = quant.tile_offsets(base, BLOCK_SIZE, BLOCK_PAD, ROWS)
    if MASKED or BLOCK_PAD != BLOCK_SIZE:
        mask, row_mask = quant.tile_masks(base, n, BLOCK_SIZE, BLOCK_PAD, ROWS, MASKED)
    else:
        mask = None
        row_mask = None
    blocks = first_block + base // BLOCK_SIZE + tl.arange(0, ROWS)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    m = quant.load_state(m_ptr, m_absmax_ptr, o, blocks, mask, row_mask, code_values + 256)
    p, m = lion_math(p, g, m, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    quant.store_state(m, m_ptr, m_absmax_ptr, o, blocks, mask, row_mask, code_mids + 256)


@triton.jit(do_not_specialize=["seed"])
def lion8bit_kernel(table, work, steps, scalars, hyper_values, code_values, code_mids,
                    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, seed,
                    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                    STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr,
                    TILES: tl.constexpr):
    """Table row: param, grad, exp_avg (uint8 codes), exp_avg_absmax, step, numel, salt, offset."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, g_ptr, m_ptr, _, _ = common.stream_ptrs(row, start, P_DTYPE, G_DTYPE, tl.uint8, 1, ALIGNED)
        m_absmax_ptr, _, _ = common.absmax_ptrs(row, 1)
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = _hyper(
            hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _lion8bit_tile(p_ptr, g_ptr, m_ptr, m_absmax_ptr, it * (ROWS * BLOCK_SIZE), n, first_block, first,
                               key, code_values, code_mids, grad_mult, lr, beta1, one_minus_beta1, beta2,
                               one_minus_beta2, decay, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _lion8bit_tile(p_ptr, g_ptr, m_ptr, m_absmax_ptr, base, tail, first_block, first, key, code_values,
                               code_mids, grad_mult, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
                               P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, True)


def hyper_values(group, device):
    """Lion's runtime hyper-parameters in the kernel's order, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    weight_decay = table.group_value(group["weight_decay"], device)
    return [lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay]


def step(batch) -> None:
    """Launch the step prologue and the Lion kernel over ``batch``."""
    if batch.quantized:
        return step8bit(batch)
    group = batch.group
    streams = [batch.params, batch.grads, batch.state["exp_avg"], batch.steps]
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, "lion", streams, vector_streams=3, chunk=table.CHUNK,
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hyper_values(group, device))
    scalars = batch.scalars
    if tab.n_work == 0:
        return
    lion_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, *values, table.seed(group),
        WIDTH=tab.width, P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), STOCHASTIC=stochastic, HYPER_IN_MEMORY=in_memory,
        ALIGNED=tab.aligned, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def step8bit(batch) -> None:
    """Launch the step prologue and the 8-bit Lion kernel over ``batch``. Blocks over
    ``quant.MAX_BLOCK`` elements do not fit one program: ``fusedopt.backends`` does not
    resolve such a step here (see ``fusedopt.kernels.backend.unsupported_step``)."""
    quant.check_block(batch)
    group = batch.group
    streams = [batch.params, batch.grads, batch.state["exp_avg"], batch.state["exp_avg_absmax"], batch.steps]
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, "lion8bit", streams, vector_streams=3, chunk=quant.chunk(batch.block_size),
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hyper_values(group, device))
    scalars = batch.scalars
    if tab.n_work == 0:
        return
    code_values, code_mids = table.codebooks(device)
    lion8bit_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, code_values, code_mids, *values, table.seed(group),
        WIDTH=tab.width, P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), STOCHASTIC=stochastic, HYPER_IN_MEMORY=in_memory,
        ALIGNED=tab.aligned, **quant.layout(batch.block_size), num_warps=quant.NUM_WARPS,
        enable_fp_fusion=False,
    )
