"""The kernels of every elementwise family (Adam, Lion, SGD, Adagrad, RMSprop), 32-bit and
block-wise 8-bit states: one launch per batch and step, whatever its tensor count.

A family is a :class:`Family`: its math, a ``triton.jit`` function passed to the kernels as a
compile-time constant (``MATH``), named as in DESIGN.md,

    p, s = MATH(p, g, s, h, d, FLAGS)

on fp32 values: ``p`` the param, ``g`` the grad times the step's multiplier (unscale, clip),
``s`` the tuple of its states in the family's order (returned updated), ``h`` its runtime
hyper-parameters as a struct (a namedtuple: ``h.beta1``), ``d`` the per-step scalars its
``derive`` computes from the tensor's step in every program (fp64, rounded once: ``d.step_size``),
and ``FLAGS`` its compile-time switches (a namedtuple: ``FLAGS.amsgrad``). The kernels only move
bytes around it. A program owns one chunk of one tensor: full chunks run an unmasked loop of
16-byte vector accesses, the last chunk of a tensor a masked one. In the 8-bit kernel a chunk
is a run of whole quantization blocks (see :mod:`fusedopt.kernels.quant`): states are
dequantized, the same math runs in fp32, the param is written from the fp32 states, then they
are requantized.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import triton
import triton.language as tl

from .. import families, launch_table
from . import common, quant, table
from .common import GRAD_MULT, SKIP

BLOCK = common.block(2048, 8192)
NUM_WARPS = 8

#: The ``derived`` struct of a family without per-step scalars.
NoDerived = namedtuple("NoDerived", [])


@dataclass(frozen=True)
class Family:
    """An elementwise family, as the kernels see it: its declaration (``spec``, what every
    layer reads: state names and codebooks, flags) and what the kernels add to it.

    Attributes:
        spec: the family's declaration (:mod:`fusedopt.families`). ``s`` holds the states a
            group keeps (``spec.state_names``), in that order; the 8-bit codebook of each is
            the spec's; ``FLAGS`` has a field per spec flag and one per state, true when the
            group keeps it (``FLAGS.momentum_buffer``).
        math: ``p, s = math(p, g, s, h, d, FLAGS)`` (see the module docstring).
        hypers: ``hypers(group, device)``, the struct ``h`` of group values
            (``table.group_value``: numbers, or device tensors the kernel reads), with what the
            math takes derived as the reference derives it (``1 - beta1`` in double on the
            host, for instance).
        derive: ``d = derive(t, k)``, a ``triton.jit`` function of the step count after this
            step (fp32, exact) and the fp64 struct ``k`` of ``step_hypers``, returning the
            ``derived`` struct (at most three fields) as ``spec.derive`` names them, each
            rounded once to fp32 when stored; None: no per-step scalars.
        step_hypers: ``step_hypers(group, device)``, the struct ``k`` (group values, or
            ``table.log_of(beta)`` where ``derive`` wants ``log(beta)``).
        derived: the struct class ``derive`` returns.
    """

    spec: families.Family
    math: Callable
    hypers: Callable[[dict, object], NamedTuple]
    derive: Callable | None = None
    step_hypers: Callable[[dict, object], NamedTuple] | None = None
    derived: type = NoDerived

    @property
    def name(self) -> str:
        """The launch tables' name (``name`` and ``name + "8bit"`` in ``batch.cache``)."""
        return self.spec.name

    @cached_property
    def flag_struct(self) -> type:
        return namedtuple(self.spec.name.capitalize() + "Flags",
                          list(dict.fromkeys(self.spec.flags + tuple(s.name for s in self.spec.states))))

    def flags(self, group: dict) -> NamedTuple:
        """The compile-time switches of ``group``: its flags, and which states it keeps."""
        kept = self.spec.state_names(group)
        return self.flag_struct(*(bool(group[f]) for f in self.spec.flags),
                                *(s.name in kept for s in self.spec.states))

    def states(self, group: dict) -> tuple[str, ...]:
        return self.spec.state_names(group)

    def signed(self, name: str) -> bool:
        return self.spec.state(name).signed


@triton.jit
def _state_ptrs(row, start, STATES: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of the ``STATES`` states of a row (columns ``STATE0``, ...)."""
    ptrs = ()
    for i in tl.static_range(STATES):
        ptrs = ptrs + (common.load_ptr(row, common.STATE0 + i, DTYPE, ALIGNED) + start,)
    return ptrs


@triton.jit
def _block(p_ptr, g_ptr, s_ptrs, off, mask, index, key, grad_mult, h, d, MATH: tl.constexpr,
           FLAGS: tl.constexpr, P_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    o = off + tl.arange(0, BLOCK)
    p = tl.load(p_ptr + o, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + o, mask=mask).to(tl.float32) * grad_mult
    s = ()
    for i in tl.static_range(len(s_ptrs)):
        s = s + (tl.load(s_ptrs[i] + o, mask=mask),)
    p, s = MATH(p, g, s, h, d, FLAGS)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    for i in tl.static_range(len(s_ptrs)):
        tl.store(s_ptrs[i] + o, s[i], mask=mask)


@triton.jit(do_not_specialize=["seed"])
def elementwise_kernel(table, work, counters, scalars, hyper_values, step_pointers, x0: tl.float64, x1: tl.float64,
                       x2: tl.float64, seed, MATH: tl.constexpr, FLAGS: tl.constexpr, HYPERS: tl.constexpr,
                       IN_MEMORY: tl.constexpr, DERIVE: tl.constexpr, STEP_HYPERS: tl.constexpr, MODES: tl.constexpr,
                       DERIVED: tl.constexpr, STATES: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                       STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Table row (``fusedopt.launch_table``): param, grad, ``STATES`` fp32 states, step. The
    per-step scalars come from ``DERIVE`` (see ``common.derived``; ``step_pointers``, ``x0``..``x2``
    and ``MODES``: ``table.step_args``); the step is advanced by the program that finishes the
    tensor (``common.advance_step_reread``)."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t = common.tensor_step(row)
        d = common.derived(t, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS, MODES, DERIVED)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s_ptrs = _state_ptrs(row, start, STATES, tl.float32, ALIGNED)
        h = common.hypers(hyper_values, IN_MEMORY, HYPERS)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, t, row, STOCHASTIC)
        first = common.first_index(row, start, STOCHASTIC)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _block(p_ptr, g_ptr, s_ptrs, off, None, first, key, grad_mult, h, d, MATH, FLAGS, P_DTYPE,
                       STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _block(p_ptr, g_ptr, s_ptrs, off, off + tl.arange(0, BLOCK) < tail, first, key, grad_mult, h, d,
                       MATH, FLAGS, P_DTYPE, STOCHASTIC, BLOCK)
        common.advance_step_reread(table, work, counters, CHUNK)


@triton.jit
def _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, base, n, first_block, index, key, codebook, grad_mult,
          h, d, MATH: tl.constexpr, FLAGS: tl.constexpr, SIGNED: tl.constexpr, P_DTYPE: tl.constexpr,
          STOCHASTIC: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr,
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
    s = ()
    for i in tl.static_range(len(SIGNED)):
        s = s + (quant.load_state(s_ptrs[i], absmax_ptrs[i], o, blocks, mask, row_mask,
                                  codebook + 256 * (common.SIGNED_VALUES + 1 - SIGNED[i])),)
    p, s = MATH(p, g, s, h, d, FLAGS)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    for i in tl.static_range(len(SIGNED)):
        quant.store_state(s[i], s_ptrs[i], absmax_ptrs[i], o, blocks, mask, row_mask,
                          codebook + 256 * (common.SIGNED_MIDS + 1 - SIGNED[i]), SIGNED[i])


@triton.jit(do_not_specialize=["seed"])
def elementwise8bit_kernel(table, work, counters, scalars, hyper_values, step_pointers, x0: tl.float64,
                           x1: tl.float64, x2: tl.float64, codebook, seed, MATH: tl.constexpr, FLAGS: tl.constexpr,
                           HYPERS: tl.constexpr, IN_MEMORY: tl.constexpr, DERIVE: tl.constexpr,
                           STEP_HYPERS: tl.constexpr, MODES: tl.constexpr, DERIVED: tl.constexpr,
                           SIGNED: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                           STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           BLOCK_PAD: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Table row: param, grad, ``len(SIGNED)`` states (uint8 codes; ``SIGNED[i]``: the signed
    map), their absmax, step. ``codebook``: ``launch_table.codebook``. The rest as
    :func:`elementwise_kernel`'s."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        STATES: tl.constexpr = len(SIGNED)
        tensor, chunk, row, start, n = common.work_item(table, work, CHUNK)
        t = common.tensor_step(row)
        d = common.derived(t, step_pointers, x0, x1, x2, DERIVE, STEP_HYPERS, MODES, DERIVED)
        p_ptr = common.load_ptr(row, common.PARAM, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, common.GRAD, G_DTYPE, ALIGNED) + start
        s_ptrs = _state_ptrs(row, start, STATES, tl.uint8, ALIGNED)
        absmax_ptrs = ()
        for i in tl.static_range(STATES):
            absmax_ptrs = absmax_ptrs + (common.load_ptr(row, common.ABSMAX0 + i, tl.float32, False),)
        h = common.hypers(hyper_values, IN_MEMORY, HYPERS)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, t, row, STOCHASTIC)
        first = common.first_index(row, start, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, it * (ROWS * BLOCK_SIZE), n, first_block, first, key,
                      codebook, grad_mult, h, d, MATH, FLAGS, SIGNED, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD,
                      ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, base, tail, first_block, first, key, codebook, grad_mult,
                      h, d, MATH, FLAGS, SIGNED, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, True)
        if STOCHASTIC:  # what is kept across the loop matters to ptxas: see common.advance_step_reread
            common.advance_step(counters, tensor, row, start + n, t, CHUNK)
        else:
            common.advance_step_reread(table, work, counters, CHUNK)


def _step_args(batch, family: Family, device):
    """The hyper-parameter struct and the per-step derivation's arguments of ``family`` over
    ``batch``: ``(hypers, in_memory, step_args, step_constexprs)`` (``table.hyper_struct``,
    ``table.step_args``)."""
    group = batch.group
    step_values = family.step_hypers(group, device) if family.derive is not None else None
    pointers, numbers, modes = table.step_args(step_values, batch.scalars)
    hypers, in_memory = table.hyper_struct(family.hypers(group, device))
    constexprs = dict(DERIVE=family.derive, STEP_HYPERS=type(step_values) if step_values is not None else None,
                      MODES=modes, DERIVED=family.derived)
    return hypers, in_memory, (pointers, *numbers), constexprs


def step(batch, family: Family) -> None:
    """Launch ``family``'s kernel over ``batch`` (32-bit or 8-bit states): one launch."""
    if batch.quantized:
        return step8bit(batch, family)
    group = batch.group
    names = tuple(family.states(group))
    cols = launch_table.columns(batch.params, batch.grads, [batch.state[n] for n in names], steps=batch.steps)
    stochastic = table.stochastic(batch)
    tab = launch_table.lookup(batch.cache, family.name, cols, table.CHUNK,
                              extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    hypers, in_memory, step_args, step_constexprs = _step_args(batch, family, device)
    elementwise_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.counters, batch.scalars, hypers, *step_args, table.seed(group),
        MATH=family.math, FLAGS=family.flags(group), HYPERS=type(hypers), IN_MEMORY=in_memory, **step_constexprs,
        STATES=len(names), P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), STOCHASTIC=stochastic, ALIGNED=tab.aligned,
        CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def step8bit(batch, family: Family) -> None:
    """Launch ``family``'s 8-bit kernel over ``batch``: one launch. Blocks over
    ``quant.MAX_BLOCK`` elements do not fit one program: ``fusedopt.backends`` does not
    resolve such a step here (see ``fusedopt.kernels.backend.unsupported_step``)."""
    quant.check_block(batch)
    group = batch.group
    names = tuple(family.states(group))
    cols = launch_table.columns(batch.params, batch.grads, [batch.state[n] for n in names],
                                [batch.state[n + "_absmax"] for n in names], batch.steps)
    stochastic = table.stochastic(batch)
    tab = launch_table.lookup(batch.cache, family.name + "8bit", cols, quant.chunk(batch.block_size),
                              extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    hypers, in_memory, step_args, step_constexprs = _step_args(batch, family, device)
    elementwise8bit_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.counters, batch.scalars, hypers, *step_args, launch_table.codebook(device),
        table.seed(group), MATH=family.math, FLAGS=family.flags(group), HYPERS=type(hypers), IN_MEMORY=in_memory,
        **step_constexprs, SIGNED=tuple(family.signed(n) for n in names),
        P_DTYPE=table.tl_dtype(batch.params[0].dtype), G_DTYPE=table.tl_dtype(batch.grads[0].dtype),
        STOCHASTIC=stochastic, ALIGNED=tab.aligned, **quant.layout(batch.block_size), num_warps=quant.NUM_WARPS,
        enable_fp_fusion=False, **quant.register_limit(stochastic),
    )
