"""The kernels of every elementwise family (Adam, Lion, SGD, Adagrad, RMSprop), 32-bit and
block-wise 8-bit states: one launch per batch, after the step prologue.

A family is a :class:`Family`: its math, a ``triton.jit`` function passed to the kernels as a
compile-time constant (``MATH``), named as in DESIGN.md,

    p, s = MATH(p, g, s, h, d, FLAGS)

on fp32 values: ``p`` the param, ``g`` the grad times the step's multiplier (unscale, clip),
``s`` the tuple of its states in the family's order (returned updated), ``h`` its runtime
hyper-parameters as a struct (a namedtuple: ``h.beta1``), ``d`` the per-step scalars its
``derive`` computes once per tensor in the step prologue (fp64, rounded once: ``d.step_size``),
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

from .. import families
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
    """Pointers to element ``start`` of the ``STATES`` states of a row (columns 2, 3, ...)."""
    ptrs = ()
    for i in tl.static_range(STATES):
        ptrs = ptrs + (common.load_ptr(row, 2 + i, DTYPE, ALIGNED) + start,)
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
def elementwise_kernel(table, work, steps, scalars, hyper_values, seed, MATH: tl.constexpr, FLAGS: tl.constexpr,
                       HYPERS: tl.constexpr, IN_MEMORY: tl.constexpr, DERIVED: tl.constexpr, STATES: tl.constexpr,
                       WIDTH: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                       STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Table row: param, grad, ``STATES`` fp32 states, step, numel, salt, offset."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s_ptrs = _state_ptrs(row, start, STATES, tl.float32, ALIGNED)
        h = common.hypers(hyper_values, IN_MEMORY, HYPERS)
        d = common.derived(steps, tensor, DERIVED)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        if n >= CHUNK:
            for off in range(0, CHUNK, BLOCK):
                _block(p_ptr, g_ptr, s_ptrs, off, None, first, key, grad_mult, h, d, MATH, FLAGS, P_DTYPE,
                       STOCHASTIC, BLOCK)
        else:
            tail = n.to(tl.int32)
            for off in range(0, tail, BLOCK):
                _block(p_ptr, g_ptr, s_ptrs, off, off + tl.arange(0, BLOCK) < tail, first, key, grad_mult, h, d,
                       MATH, FLAGS, P_DTYPE, STOCHASTIC, BLOCK)


@triton.jit
def _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, base, n, first_block, index, key, code_values, code_mids, grad_mult,
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
                                  code_values + 256 * SIGNED[i]),)
    p, s = MATH(p, g, s, h, d, FLAGS)
    common.store_param(p_ptr, o, p, mask, index, key, P_DTYPE, STOCHASTIC)
    for i in tl.static_range(len(SIGNED)):
        quant.store_state(s[i], s_ptrs[i], absmax_ptrs[i], o, blocks, mask, row_mask, code_mids + 256 * SIGNED[i],
                          SIGNED[i])


@triton.jit(do_not_specialize=["seed"])
def elementwise8bit_kernel(table, work, steps, scalars, hyper_values, code_values, code_mids, seed,
                           MATH: tl.constexpr, FLAGS: tl.constexpr, HYPERS: tl.constexpr, IN_MEMORY: tl.constexpr,
                           DERIVED: tl.constexpr, SIGNED: tl.constexpr, WIDTH: tl.constexpr,
                           P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_PAD: tl.constexpr,
                           ROWS: tl.constexpr, TILES: tl.constexpr):
    """Table row: param, grad, ``len(SIGNED)`` states (uint8 codes; ``SIGNED[i]``: the signed
    map), their absmax, step, numel, salt, offset. ``code_values`` / ``code_mids``: see
    ``table.codebooks``."""
    skip = tl.load(scalars + SKIP)
    if skip == 0:
        CHUNK: tl.constexpr = TILES * ROWS * BLOCK_SIZE
        STATES: tl.constexpr = len(SIGNED)
        tensor, chunk, row, start, n = common.work_item(table, work, WIDTH, CHUNK)
        p_ptr = common.load_ptr(row, 0, P_DTYPE, ALIGNED) + start
        g_ptr = common.load_ptr(row, 1, G_DTYPE, ALIGNED) + start
        s_ptrs = _state_ptrs(row, start, STATES, tl.uint8, ALIGNED)
        absmax_ptrs = ()
        for i in tl.static_range(STATES):
            absmax_ptrs = absmax_ptrs + (common.load_ptr(row, 2 + STATES + i, tl.float32, False),)
        h = common.hypers(hyper_values, IN_MEMORY, HYPERS)
        d = common.derived(steps, tensor, DERIVED)
        grad_mult = tl.load(scalars + GRAD_MULT)
        key = common.step_key(seed, steps, tensor, row, WIDTH, STOCHASTIC)
        first = common.first_index(row, start, WIDTH, STOCHASTIC)
        first_block = chunk * (TILES * ROWS)
        if n >= CHUNK:
            for it in range(TILES):
                _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, it * (ROWS * BLOCK_SIZE), n, first_block, first, key,
                      code_values, code_mids, grad_mult, h, d, MATH, FLAGS, SIGNED, P_DTYPE, STOCHASTIC, BLOCK_SIZE,
                      BLOCK_PAD, ROWS, False)
        else:
            tail = n.to(tl.int32)
            for base in range(0, tail, ROWS * BLOCK_SIZE):
                _tile(p_ptr, g_ptr, s_ptrs, absmax_ptrs, base, tail, first_block, first, key, code_values, code_mids,
                      grad_mult, h, d, MATH, FLAGS, SIGNED, P_DTYPE, STOCHASTIC, BLOCK_SIZE, BLOCK_PAD, ROWS, True)


def _prologue(batch, tab, family: Family, device):
    """The step prologue (``t`` and the family's per-step scalars; steps advanced) and the
    hyper-parameter struct: ``(hypers, in_memory)``, see ``table.hyper_struct``."""
    group = batch.group
    step_values = family.step_hypers(group, device) if family.derive is not None else None
    table.launch_steps(tab, batch.scalars, family.derive, step_values)
    return table.hyper_struct(family.hypers(group, device))


def step(batch, family: Family) -> None:
    """Launch the step prologue and ``family``'s kernel over ``batch`` (32-bit or 8-bit states)."""
    if batch.quantized:
        return step8bit(batch, family)
    group = batch.group
    names = tuple(family.states(group))
    streams = [batch.params, batch.grads] + [batch.state[n] for n in names] + [batch.steps]
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, family.name, streams, vector_streams=len(streams) - 1, chunk=table.CHUNK,
                       extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    hypers, in_memory = _prologue(batch, tab, family, device)
    if tab.n_work == 0:
        return
    elementwise_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, batch.scalars, hypers, table.seed(group),
        MATH=family.math, FLAGS=family.flags(group), HYPERS=type(hypers), IN_MEMORY=in_memory,
        DERIVED=family.derived, STATES=len(names), WIDTH=tab.width, P_DTYPE=table.tl_dtype(batch.params[0].dtype),
        G_DTYPE=table.tl_dtype(batch.grads[0].dtype), STOCHASTIC=stochastic, ALIGNED=tab.aligned,
        CHUNK=table.CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def step8bit(batch, family: Family) -> None:
    """Launch the step prologue and ``family``'s 8-bit kernel over ``batch``. Blocks over
    ``quant.MAX_BLOCK`` elements do not fit one program: ``fusedopt.backends`` does not
    resolve such a step here (see ``fusedopt.kernels.backend.unsupported_step``)."""
    quant.check_block(batch)
    group = batch.group
    names = tuple(family.states(group))
    streams = ([batch.params, batch.grads] + [batch.state[n] for n in names]
               + [batch.state[n + "_absmax"] for n in names] + [batch.steps])
    stochastic = table.stochastic(batch)
    tab = table.lookup(batch.cache, family.name + "8bit", streams, vector_streams=2 + len(names),
                       chunk=quant.chunk(batch.block_size), extra=table.rounding(batch) if stochastic else None)
    device = batch.params[0].device
    hypers, in_memory = _prologue(batch, tab, family, device)
    if tab.n_work == 0:
        return
    code_values, code_mids = table.codebooks(device)
    elementwise8bit_kernel[(tab.n_work,)](
        tab.rows, tab.work, tab.steps, batch.scalars, hypers, code_values, code_mids, table.seed(group),
        MATH=family.math, FLAGS=family.flags(group), HYPERS=type(hypers), IN_MEMORY=in_memory,
        DERIVED=family.derived, SIGNED=tuple(family.signed(n) for n in names), WIDTH=tab.width,
        P_DTYPE=table.tl_dtype(batch.params[0].dtype), G_DTYPE=table.tl_dtype(batch.grads[0].dtype),
        STOCHASTIC=stochastic, ALIGNED=tab.aligned, **quant.layout(batch.block_size), num_warps=quant.NUM_WARPS,
        enable_fp_fusion=False,
    )
