"""LAMB in two passes (after the step prologue), each one launch per batch.

Pass 1 (:func:`lamb_moments_kernel`): the moments of every chunk, written back, and the
chunk's partial sums of ``p^2`` and ``u^2`` in its own slot. A finishing launch
(:func:`lamb_ratio_kernel`, one program per tensor) adds each tensor's slots in order into
the trust ratio ``r = ||p|| / ||u||``. Pass 2 (:func:`lamb_apply_kernel`) recomputes ``u`` from
the stored moments (fp32, so exactly pass 1's) and applies ``p -= lr * r * u``. Deterministic:
no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, table
from .common import GRAD_MULT, SKIP

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8
RATIO_BLOCK = 1024


@triton.jit
def lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2,
                   BIAS_CORRECTION: tl.constexpr):
    """``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p``."""
    if BIAS_CORRECTION:
        m_hat = tl.div_rn(m, bias_correction1)
        v_hat = tl.div_rn(v, bias_correction2)
    else:
        m_hat = m
        v_hat = v
    u = tl.div_rn(m_hat, tl.sqrt_rn(v_hat) + eps)
    if weight_decay != 0.0:  # a runtime branch: 0 * inf would make a NaN
        u = u + weight_decay * p
    return u


@triton.jit
def lamb_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
              bias_correction1, bias_correction2, BIAS_CORRECTION: tl.constexpr):
    """LAMB's per-element half on fp32 values: the new moments and the update direction,
    ``(m, v, u)``; the order of operations is the reference's (``fusedopt.reference.lamb_math``).
    The other half, ``p - lr * r * u`` with ``r = ||p|| / ||u||``, needs the whole tensor."""
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    u = lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2, BIAS_CORRECTION)
    return m, v, u


@triton.jit
def _moments_block(p_ptr, g_ptr, m_ptr, v_ptr, mask, grad_mult, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2,
                   BIAS_CORRECTION: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    m = tl.load(m_ptr + o, mask=mask)
    v = tl.load(v_ptr + o, mask=mask)
    m, v, u = lamb_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                        bias_correction1, bias_correction2, BIAS_CORRECTION)
    tl.store(m_ptr + o, m, mask=mask)
    tl.store(v_ptr + o, v, mask=mask)
    if mask is not None:  # lanes past the end hold garbage
        p = tl.where(mask, p, 0.0)
        u = tl.where(mask, u, 0.0)
    return p * p, u * u


@triton.jit
def lamb_moments_kernel(table, work, steps, scalars, hyper_values, partials,
                        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                        WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                        BIAS_CORRECTION: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr,
                        ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1. Table row: param, grad, exp_avg, exp_avg_sq, step, numel, salt, offset. Slot
    ``partials[program]`` gets the chunk's ``(sum p^2, sum u^2)``."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, g_ptr, m_ptr, v_ptr, _ = common.stream_ptrs(row, start, P_DTYPE, G_DTYPE, tl.float32, 2, ALIGNED)
        if HYPER_IN_MEMORY:  # see table.hyper_args
            beta1 = tl.load(hyper_values + 1)
            one_minus_beta1 = tl.load(hyper_values + 2)
            beta2 = tl.load(hyper_values + 3)
            one_minus_beta2 = tl.load(hyper_values + 4)
            eps = tl.load(hyper_values + 5)
            weight_decay = tl.load(hyper_values + 6)
        grad_mult = tl.load(scalars + GRAD_MULT)
        bias_correction1, bias_correction2 = common.bias_corrections(steps, tensor)
        p_sq = tl.zeros([BLOCK], tl.float32)
        u_sq = tl.zeros([BLOCK], tl.float32)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                pp, uu = _moments_block(p_ptr + off, g_ptr + off, m_ptr + off, v_ptr + off, None, grad_mult,
                                        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                                        bias_correction1, bias_correction2, BIAS_CORRECTION, BLOCK)
                p_sq += pp
                u_sq += uu
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                pp, uu = _moments_block(p_ptr + off, g_ptr + off, m_ptr + off, v_ptr + off,
                                        tl.arange(0, BLOCK) < tail - off, grad_mult, beta1, one_minus_beta1, beta2,
                                        one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2,
                                        BIAS_CORRECTION, BLOCK)
                p_sq += pp
                u_sq += uu
        w = tl.program_id(0)
        tl.store(partials + 2 * w, tl.sum(p_sq, axis=0))
        tl.store(partials + 2 * w + 1, tl.sum(u_sq, axis=0))


@triton.jit
def lamb_ratio_kernel(first, partials, ratios, BLOCK: tl.constexpr):
    """One program per tensor: its slots, added in order, give ``r = ||p|| / ||u||`` (1 unless
    both norms are positive)."""
    tensor = tl.program_id(0)
    begin = tl.load(first + tensor)
    end = tl.load(first + tensor + 1)
    o = tl.arange(0, BLOCK)
    p_sq = tl.zeros([BLOCK], tl.float32)
    u_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(begin, end, BLOCK):
        mask = off + o < end
        p_sq += tl.load(partials + 2 * (off + o), mask=mask, other=0.0)
        u_sq += tl.load(partials + 2 * (off + o) + 1, mask=mask, other=0.0)
    p_norm = tl.sqrt_rn(tl.sum(p_sq, axis=0))
    u_norm = tl.sqrt_rn(tl.sum(u_sq, axis=0))
    r = tl.where((p_norm > 0) & (u_norm > 0), tl.div_rn(p_norm, tl.where(u_norm > 0, u_norm, 1.0)), 1.0)
    tl.store(ratios + tensor, r)


@triton.jit
def _apply_block(p_ptr, m_ptr, v_ptr, mask, index, key, lr_r, eps, weight_decay, bias_correction1,
                 bias_correction2, P_DTYPE: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                 STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + o, mask=mask)
    v = tl.load(v_ptr + o, mask=mask)
    u = lamb_direction(p, m, v, eps, weight_decay, bias_correction1, bias_correction2, BIAS_CORRECTION)
    p = p - lr_r * u
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])
def lamb_apply_kernel(table, work, steps, scalars, hyper_values, ratios, lr, eps, weight_decay, seed,
                      WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                      STOCHASTIC: tl.constexpr, HYPER_IN_MEMORY: tl.constexpr, ALIGNED: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: ``p -= lr * r * u``, ``u`` recomputed from the moments pass 1 stored."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr, _, m_ptr, v_ptr, _ = common.stream_ptrs(row, start, P_DTYPE, P_DTYPE, tl.float32, 2, ALIGNED)
        if HYPER_IN_MEMORY:  # see table.hyper_args
            lr = tl.load(hyper_values + 0)
            eps = tl.load(hyper_values + 5)
            weight_decay = tl.load(hyper_values + 6)
        bias_correction1, bias_correction2 = common.bias_corrections(steps, tensor)
        lr_r = lr * tl.load(ratios + tensor)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _apply_block(p_ptr + off, m_ptr + off, v_ptr + off, None, first + off, key, lr_r, eps,
                             weight_decay, bias_correction1, bias_correction2, P_DTYPE, BIAS_CORRECTION,
                             STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _apply_block(p_ptr + off, m_ptr + off, v_ptr + off, tl.arange(0, BLOCK) < tail - off, first + off,
                             key, lr_r, eps, weight_decay, bias_correction1, bias_correction2, P_DTYPE,
                             BIAS_CORRECTION, STOCHASTIC, BLOCK)


def hyper_values(group, device):
    """LAMB's runtime hyper-parameters in the kernels' order, derived as the reference does."""
    lr = table.group_value(group["lr"], device)
    beta1, beta2 = (table.group_value(b, device) for b in group["betas"])
    eps = table.group_value(group["eps"], device)
    weight_decay = table.group_value(group["weight_decay"], device)
    return [lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay]


def step(batch) -> None:
    """The step prologue, pass 1, the trust ratios and pass 2 over ``batch``: four launches
    whatever the tensor count."""
    group = batch.group
    streams = [batch.params, batch.grads, batch.state["exp_avg"], batch.state["exp_avg_sq"], batch.steps]
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, "lamb", streams, vector_streams=4, chunk=table.CHUNK,
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    values, in_memory, hyper_tensor = table.prologue(batch, tab, hyper_values(group, device), beta1_index=1, beta2_index=3)
    scalars = batch.scalars
    scratch = tab.scratch.get("lamb")
    if scratch is None:
        scratch = (torch.empty((max(tab.n_work, 1), 2), dtype=torch.float32, device=device),
                   torch.empty(tab.n_tensors, dtype=torch.float32, device=device))
        tab.scratch["lamb"] = scratch
    partials, ratios = scratch
    if tab.n_work == 0:
        return
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay = values
    p_dtype = table.tl_dtype(batch.params[0].dtype)
    lamb_moments_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, partials,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
        WIDTH=tab.width, P_DTYPE=p_dtype, G_DTYPE=table.tl_dtype(batch.grads[0].dtype),
        BIAS_CORRECTION=group["bias_correction"], HYPER_IN_MEMORY=in_memory, ALIGNED=tab.aligned,
        CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    if batch.all_reduce is None:
        lamb_ratio_kernel[(tab.n_tensors,)](tab.first, partials, ratios, BLOCK=RATIO_BLOCK, num_warps=4,
                                            enable_fp_fusion=False)
    else:
        _sharded_ratios(tab, partials, ratios, batch.all_reduce)
    lamb_apply_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, scalars, hyper_tensor, ratios, lr, eps, weight_decay, table.seed(group),
        WIDTH=tab.width, P_DTYPE=p_dtype, BIAS_CORRECTION=group["bias_correction"], STOCHASTIC=stochastic,
        HYPER_IN_MEMORY=in_memory, ALIGNED=tab.aligned, CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def _sharded_ratios(tab, partials, ratios, all_reduce) -> None:
    """Trust ratios of sharded params (FSDP2): each tensor's ``||p||^2`` and ``||u||^2`` partials
    are summed on this rank, then over the shards, before ``r = ||p|| / ||u||``."""
    owner = tab.scratch.get("lamb_owner")
    if owner is None:
        first = tab.first.to(torch.int64)
        counts = first[1:] - first[:-1]
        owner = torch.repeat_interleave(torch.arange(tab.n_tensors, device=first.device), counts)
        tab.scratch["lamb_owner"] = owner
    squares = torch.zeros((tab.n_tensors, 2), dtype=torch.float32, device=partials.device)
    squares.index_add_(0, owner, partials[: tab.n_work])
    all_reduce(squares)
    p_norm, u_norm = torch.sqrt(squares).unbind(1)
    ones = torch.ones_like(p_norm)
    ratios.copy_(torch.where((p_norm > 0) & (u_norm > 0), p_norm / torch.where(u_norm > 0, u_norm, ones), ones))
