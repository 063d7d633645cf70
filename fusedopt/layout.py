"""Memory layouts: what a kernel reads as flat memory, and copies for what it cannot.

The kernels walk each param's tensors (param, grad, states) as flat memory from their first
address: element ``j`` of every stream is the ``j``-th element in memory. That is right for any
*dense* tensor (non-overlapping and dense: every element at its own address, no gaps; strides
a permutation of a contiguous layout, e.g. ``w.t()`` or a ``channels_last`` conv weight) as
long as all of a param's tensors share its strides. So:

- a param's **layout** is its own strides when it is dense, else the dense strides
  ``torch.empty_like(p)`` gives it (the same order of dimensions, without the gaps);
- its states are created in that layout (``torch.zeros_like(p)``, as torch.optim does), so
  a dense param, its grad and its states are flat memory to a kernel, at no cost;
- a grad in another layout (an expanded, stride-0 grad; a ``channels_last`` grad of a
  contiguous param, or the reverse) is read through a *gathered copy* into the param's
  layout, made per step for that grad only: one more read and write of the grad and a
  transient grad-sized buffer;
- a param that is not dense (a slice with gaps, ``w[:, ::2]``) is stepped through a gathered
  copy scattered back in place after the kernel (two more reads and writes of the param per
  step, and a transient buffer); a state in another layout than its param (replaced by hand)
  likewise. A param is always updated in place: never a ``.contiguous()`` we update instead;
- a param whose elements overlap (``expand``) cannot be updated in place by anyone (torch
  refuses it too): the optimizer refuses it before the step (:func:`overlap_error`).

Orders that depend on memory, the same in every backend: 8-bit blocks run over the param's
layout (block ``i`` of a state holds the elements at memory positions ``[i*bs, (i+1)*bs)`` of
the param's layout), and stochastic rounding draws element ``j``'s noise for its memory
position ``j`` in that layout. For a contiguous param both are the row-major index.

A param laid out anew after its states were made (``p.data = p.data.to(memory_format=...)``)
moves its states once, in place (:func:`settle_states`): fp32 states by a copy, 8-bit codes by
requantizing them over the new layout's blocks (codes moved element by element would sit in
other blocks than their absmax). So 8-bit codes are only meaningful in their own strides: a
checkpoint must keep them (``torch.save`` does; a format that stores every tensor contiguous
loses the block order of a non-contiguous param's codes).
"""

from __future__ import annotations

import dataclasses
import operator
import weakref

import torch

__all__ = ["dense", "strides", "same", "same_layout", "flat", "unflat", "to_layout", "overlap_error",
           "Gathered", "gather"]

_is_contiguous = torch.Tensor.is_contiguous


def dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense (flat memory of exactly ``numel`` elements)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``t``'s layout: its own when dense, else those ``torch.empty_like(t)``
    gives (a meta tensor: nothing is allocated)."""
    if dense(t):
        return tuple(t.stride())
    return tuple(torch.empty_like(t, device="meta").stride())


def same(t: torch.Tensor, layout: tuple[int, ...]) -> bool:
    """Whether ``t`` (shaped as the param) is laid out in ``layout``: the same strides on every
    dimension of more than one element (the strides of size-1 dimensions address nothing)."""
    stride = tuple(t.stride())
    if stride == layout or t.numel() == 0:
        return True
    return all(a == b for a, b, size in zip(stride, layout, t.shape) if size != 1)


def same_layout(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``t`` is flat memory in the layout of ``p`` (same shape): dense, same strides."""
    return t.shape == p.shape and dense(t) and same(t, strides(p))


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-d tensor in the memory order of its layout (a view when ``t`` is
    dense, else a copy)."""
    if not dense(t):
        t = to_layout(t, strides(t))
    return t.as_strided((t.numel(),), (1,))


def unflat(values: torch.Tensor, shape, layout: tuple[int, ...]) -> torch.Tensor:
    """The 1-d contiguous ``values`` (memory order) as a tensor of ``shape`` in ``layout`` (a view)."""
    return values.as_strided(tuple(shape), layout)


def to_layout(t: torch.Tensor, layout: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``t`` (cast to ``dtype``) in ``layout``."""
    out = torch.empty_strided(t.shape, layout, dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t)


def overlap_error(p: torch.Tensor) -> str | None:
    """Why param ``p`` cannot be updated in place (some of its elements share an address), or
    None. torch.optim refuses such a param too ("more than one element of the written-to
    tensor refers to a single memory location")."""
    if dense(p) or torch._debug_has_internal_overlap(p) != 1:
        return None
    return (f"its {p.numel()} elements (shape {tuple(p.shape)}, strides {tuple(p.stride())}) overlap in memory: "
            "more than one element refers to a single memory location, so an in-place update is undefined "
            "(torch.optim refuses it too); clone() it into a parameter of its own")


class Gathered:
    """What :func:`gather` made of a batch: ``batch``, the one the kernels run (the original
    when every tensor is already flat memory), and the copies to scatter back after them."""

    __slots__ = ("batch", "back")

    def __init__(self, batch, back):
        self.batch, self.back = batch, back

    def scatter(self) -> None:
        """Write the gathered params and states back into the tensors they were copied from."""
        for dst, src in self.back:
            dst.copy_(src)


#: Batches, by id (entries go with them), whose states were all contiguous / all dense and
#: shaped as their params when first checked.
_contiguous_states: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_dense_states: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _check_states(batch, names) -> tuple[bool, bool]:
    """``(contiguous, dense)`` of every state of ``batch``, checked once per ``Batch`` object
    (a replaced state tensor makes the optimizer build a new one)."""
    key = id(batch)
    if _contiguous_states.get(key) is batch:
        return True, True
    if _dense_states.get(key) is batch:
        return False, True
    states = [batch.state[n] for n in names]
    if all(all(map(_is_contiguous, column)) for column in states):
        _contiguous_states[key] = batch
        return True, True
    if all(s.shape == p.shape and dense(s) for column in states for s, p in zip(column, batch.params)):
        _dense_states[key] = batch
        return False, True
    return False, False


def _settle(batch, name: str, i: int, order: tuple[int, ...], relayout_codes) -> None:
    """State ``name`` of param ``i`` laid out in ``order``, in place (see :func:`settle_states`)."""
    s = batch.state[name][i]
    absmax = batch.state.get(name + "_absmax")
    if s.dtype == torch.uint8 and absmax is not None:
        codes, scales = relayout_codes(s, absmax[i], name, batch.block_size, order)
        s.data = codes
        absmax[i].copy_(scales)
    else:
        s.data = to_layout(s, order)
    _contiguous_states.pop(id(batch), None)
    _dense_states.pop(id(batch), None)


def settle_states(batch, relayout_codes) -> None:
    """Lay every state of ``batch`` out as its param, in place, where it is not (a param laid
    out anew after its states were made, ``p.data = p.data.to(memory_format=...)``, or a state
    replaced by hand). The state tensors stay the same objects (``state.data = ...``), so
    ``opt.state`` keeps them and later steps need no copies. fp32 states are copied (exact);
    8-bit codes are requantized by ``relayout_codes(codes, absmax, name, block_size, strides)
    -> (codes, absmax)`` (``fusedopt.quant.relayout``): their blocks follow their own memory
    order, so copying them element by element would put them in other blocks than their
    absmax. Every backend settles a batch before stepping it (the kernels' through
    :func:`gather`)."""
    names = [n for n in batch.state if not n.endswith("_absmax")]
    for i, p in enumerate(batch.params):
        if p.numel() == 0 or (p.is_contiguous() and all(batch.state[n][i].is_contiguous() for n in names)):
            continue
        order = strides(p)
        for n in names:
            s = batch.state[n][i]
            if not (dense(s) and same(s, order)):
                _settle(batch, n, i, order, relayout_codes)


def gather(batch, relayout_codes) -> Gathered:
    """The batch a kernel can run: every tensor of param ``i`` flat memory in param ``i``'s
    layout (see the module doc).

    What it costs per step on the host: two ``is_contiguous()`` per param when every param
    and grad is contiguous (about 0.25 ms per thousand params on an idle 2-core machine, where
    one ``data_ptr()`` per param, as the launch tables' check calls per stream, costs 0.1 ms
    per thousand; states are checked once per batch); else also a ``stride()`` per tensor of a param (3 ms per thousand
    channels_last params with two states, measured on the same machine under load), and
    copies only where a layout differs."""
    names = [n for n in batch.state if not n.endswith("_absmax")]
    params, grads = batch.params, batch.grads
    states_contiguous, states_dense = _check_states(batch, names)
    if states_contiguous and all(map(_is_contiguous, params)) and all(map(_is_contiguous, grads)):
        return Gathered(batch, ())
    columns = [batch.state[n] for n in names]
    new_params, new_grads = list(params), list(grads)
    new_state = {n: list(v) for n, v in batch.state.items()}
    back = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if states_dense:
            # States dense and shaped as the param: strides equal to theirs make the param and
            # the grad dense in the same layout.
            st = p.stride()
            if g.stride() == st and all(column[i].stride() == st for column in columns):
                continue
        if p.numel() == 0:
            continue
        order = strides(p)
        if not dense(p):
            new_params[i] = to_layout(p, order)
            back.append((p, new_params[i]))
        if not (dense(g) and same(g, order)):
            new_grads[i] = to_layout(g, order)
        for n, column in zip(names, columns):
            s = column[i]
            if not (dense(s) and same(s, order)):
                _settle(batch, n, i, order, relayout_codes)  # once: in place, for later steps too
    if not back and all(map(operator.is_, new_grads, grads)):
        return Gathered(batch, ())
    return Gathered(dataclasses.replace(batch, params=new_params, grads=new_grads, state=new_state), back)
