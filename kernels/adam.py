"""Adam / AdamW (weight decay, amsgrad, maximize) with 32-bit or block-wise 8-bit states:
one launch per batch (after the step prologue).

The math is :func:`adam_math`, named as in DESIGN.md; the kernels only move bytes around it.
A program owns one chunk of one tensor: full chunks run an unmasked loop of 16-byte vector
accesses, the last chunk of a tensor a masked one. In the 8-bit kernel a chunk is a run of
whole quantization blocks (see :mod:`fusedopt.kernels.quant`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import common, quant, table
from .common import GRAD_MULT, SKIP

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8


@triton.jit
def adam_math(p, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
              decay, step_size, bias_correction2_sqrt, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
              DECOUPLED: tl.constexpr):
    """One Adam/AdamW step on fp32 values; returns ``(p, m, v, v_max)``.

    ``decay = 1 - lr * weight_decay``, ``step_size = lr / (1 - beta1^t)``,
    ``bias_correction2_sqrt = sqrt(1 - beta2^t)``; the order of operations is the
    reference's (``fusedopt.reference.adam_math``)."""
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * decay
    elif weight_decay != 0.0:  # a runtime branch, as torch's: 0 * inf would make a NaN
        g = g + weight_decay * p
    # torch updates m by lerp, m + w * (g - m) for w = 1 - beta1 < 0.5, else g - (g - m) * (1 - w):
    # NaN where m is infinite in the first form, where g is in the second
    lerp_from = tl.where(beta1 > 0.5, m, g)
    m = tl.where(tl.abs(lerp_from) == float("inf"), float("nan"), beta1 * m + one_minus_beta1 * g)
    v = beta2 * v + one_minus_beta2 * g * g
    if AMSGRAD:
        v_max = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
        v_hat = v_max
    else:
        v_hat = v
    denom = tl.div_rn(tl.sqrt_rn(v_hat), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    return p, m, v, v_max


@triton.jit
def _tensor_scalars(steps, tensor, hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                    weight_decay, decay, HYPER_IN_MEMORY: tl.constexpr):
    """A tensor's runtime hyper-parameters (the kernel's arguments, or read from ``hyper_values``:
    see table.hyper_args) and its ``step_size``, ``bias_correction2_sqrt`` (from the step prologue,
    which derives them as the reference does): ``(beta1, one_minus_beta1, beta2, one_minus_beta2,
    eps, weight_decay, decay, step_size, bias_correction2_sqrt)``."""
    if HYPER_IN_MEMORY:
        beta1 = tl.load(hyper_values + 1)
        one_minus_beta1 = tl.load(hyper_values + 2)
        beta2 = tl.load(hyper_values + 3)
        one_minus_beta2 = tl.load(hyper_values + 4)
        eps = tl.load(hyper_values + 5)
        weight_decay = tl.load(hyper_values + 6)
        decay = tl.load(hyper_values + 7)
    step_size, bias_correction2_sqrt = common.bias_corrections(steps, tensor)
    return (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
            bias_correction2_sqrt)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, mask, index, key, grad_mult,
                beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                bias_correction2_sqrt, P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, STOCHASTIC: tl.constexpr,
                BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    m = tl.load(m_ptr + o, mask=mask)
    v = tl.load(v_ptr + o, mask=mask)
    if AMSGRAD:
        v_max = tl.load(v_max_ptr + o, mask=mask)
    else:
        v_max = v
    p, m, v, v_max = adam_math(p, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                               weight_decay, decay, step_size, bias_correction2_sqrt, AMSGRAD, MAXIMIZE,
                               DECOUPLED)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    tl.store(m_ptr + o, m, mask=mask)
    tl.store(v_ptr + o, v, mask=mask)
    if AMSGRAD:
        tl.store(v_max_ptr + o, v_max, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def adam_kernel(table, work, steps, scalars, hyper_values,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, seed,
                WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Table row: param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq], step, numel, salt, offset."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr = common.stream_ptrs(row, start, P_DTYPE, G_DTYPE, tl.float32,
                                                                   3 if AMSGRAD else 2, ALIGNED)
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bias_correction2_sqrt = \
            _tensor_scalars(steps, tensor, hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                            weight_decay, decay, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)

        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _adam_block(p_ptr + off, g_ptr + off, m_ptr + off, v_ptr + off, v_max_ptr + off, None,
                            first + off, key, grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2,
                            eps, weight_decay, decay, step_size, bias_correction2_sqrt, P_DTYPE, AMSGRAD,
                            MAXIMIZE, DECOUPLED, STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _adam_block(p_ptr + off, g_ptr + off, m_ptr + off, v_ptr + off, v_max_ptr + off,
                            tl.arange(0, BLOCK) < tail - off, first + off, key, grad_mult, beta1,
                            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                            bias_correction2_sqrt, P_DTYPE, AMSGRAD, MAXIMIZE, DECOUPLED, STOCHASTIC, BLOCK)


@triton.jit
def _adam8bit_tile(p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, m_absmax_ptr, v_absmax_ptr, v_max_absmax_ptr,
                   base, n, first_block, index, key, code_values, code_mids, grad_mult, beta1,
                   one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                   bias_correction2_sqrt, P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                   MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, STOCHASTIC: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr,
                   MASKED: tl.constexpr):
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
    v = quant.load_state(v_ptr, v_absmax_ptr, o, blocks, mask, row_mask, code_values)
    if AMSGRAD:
        v_max = quant.load_state(v_max_ptr, v_max_absmax_ptr, o, blocks, mask, row_mask, code_values)
    else:
        v_max = v
    p, m, v, v_max = adam_math(p, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                               weight_decay, decay, step_size, bias_correction2_sqrt, AMSGRAD, MAXIMIZE,
                               DECOUPLED)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    quant.store_state(m, m_ptr, m_absmax_ptr, o, blocks, mask, row_mask, code_mids + 256)
    quant.store_state(v, v_ptr, v_absmax_ptr, o, blocks, mask, row_mask, code_mids)
    if AMSGRAD:
        quant.store_state(v_max, v_max_ptr, v_max_absmax_ptr, o, blocks, mask, row_mask, code_mids)


@triton.jit(do_not_specialize=["seed"])
def adam8bit_kernel(table, work, steps, scalars, hyper_values, code_values, code_mids,
                    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, seed,
                    WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                    STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr,
                    TILES: tl.constexpr):
    """Table row: param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq] (uint8 codes), their
    absmax, step, numel, salt, offset. ``code_values`` / ``code_mids``: see ``table.codebooks``."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        STATES: tl.constexpr = 3 if AMSGRAD else 2
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr = common.stream_ptrs(row, start, P_DTYPE, G_DTYPE, tl.uint8,
                                                                   STATES, ALIGNED)
        m_absmax_ptr, v_absmax_ptr, v_max_absmax_ptr = common.absmax_ptrs(row, STATES)
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bias_correction2_sqrt = \
            _tensor_scalars(steps, tensor, hyper_values, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                            weight_decay, decay, HYPER_IN_MEMORY)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _adam8bit_tile(p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, m_absmax_ptr, v_absmax_ptr,
                               v_max_absmax_ptr, it * (ROWS * BLOCK_SIZE), n, first_block, first, key,
                               code_values, code_mids, grad_mult, beta1, one_minus_beta1, beta2,
                               one_minus_beta2, eps, weight_decay, decay, step_size, bias_correction2_sqrt,
                               P_DTYPE, AMSGRAD, MAXIMIZE, DECOUPLED, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD,
                               ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _adam8bit_tile(p_ptr, g_ptr, m_ptr, v_ptr, v_max_ptr, m_absmax_ptr, v_absmax_ptr,
                               v_max_absmax_ptr, base, tail, first_block, first, key, code_values, code_mids,
                               grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                               decay, step_size, bias_correction2_sqrt, P_DTYPE, AMSGRAD, MAXIMIZE,
                               DECOUPLED, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, True)


def hyper_values(group, device):
    """Adam's runtime hyper-parameters in the kernel's order, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    eps = table.group_value(group["eps"], device)
    weight_decay = table.group_value(group["weight_decay"], device)
    return [lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay]


def step(batch) -> None:
    """Launch the step prologue and the Adam kernel over ``batch``."""
    if batch.quantized:
        return step8bit(batch)
    group = batch.group
    amsgrad = group["amsgrad"]
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    streams = [batch.params, batch.grads] + [batch.state[n] for n in names] + [batch.steps]
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, "adam", streams, vector_streams=len(streams) - 1, chunk=table.CHUNK,
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hyper_values(group, device), beta1_index=1, beta2_index=3,
                                                     adam=True)
    scalars = batch.scalars
    if tab.n_work == 0:
        return
    adam_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, *values, table.seed(group),
        WIDTH=tab.width, P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), AMSGRAD=amsgrad, MAXIMIZE=group["maximize"],
        DECOUPLED=group["decoupled_weight_decay"], STOCHASTIC=stochastic, HYPER_IN_MEMORY=in_memory,
        ALIGNED=tab.aligned, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def step8bit(batch) -> None:
    """Launch the step prologue and the 8-bit Adam kernel over ``batch``. Blocks over
    ``quant.MAX_BLOCK`` elements do not fit one program: ``fusedopt.backends`` does not
    resolve such a step here (see ``fusedopt.kernels.backend.unsupported_step``)."""
    quant.check_block(batch)
    group = batch.group
    amsgrad = group["amsgrad"]
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    streams = ([batch.params, batch.grads] + [batch.state[n] for n in names]
               + [batch.state[n + "_absmax"] for n in names] + [batch.steps])
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, "adam8bit", streams, vector_streams=2 + len(names),
                       chunk=quant.chunk(batch.block_size), extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hyper_values(group, device), beta1_index=1, beta2_index=3,
                                                     adam=True)
    scalars = batch.scalars
    if tab.n_work == 0:
        return
    code_values, code_mids = table.codebooks(device)
    adam8bit_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, code_values, code_mids, *values,
        table.seed(group), WIDTH=tab.width, P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), AMSGRAD=amsgrad, MAXIMIZE=group["maximize"],
        DECOUPLED=group["decoupled_weight_decay"], STOCHASTIC=stochastic, HYPER_IN_MEMORY=in_memory,
        ALIGNED=tab.aligned, **quant.layout(batch.block_size), num_warps=quant.NUM_WARPS,
        enable_fp_fusion=False,
    )
