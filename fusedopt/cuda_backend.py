"""The ``cuda`` backend: CUDA C++ multi-tensor kernels (``csrc/``) registered as torch ops.

Each family function builds (once per change of addresses) a device table of the batch's
tensor addresses and a list of (tensor, chunk) work items, keeps them in ``batch.cache``, and
calls one op: ``torch.ops.fusedopt.elementwise_`` for the elementwise families (Adam/AdamW,
Lion, SGD, Adagrad, RMSprop: the family by name, its states in its own order, its
hyper-parameters by name, all read from its spec in ``fusedopt.families``), or ``lamb_`` or
``lars_`` for the two-pass families (two kernels; for sharded params ``lamb_moments_`` /
``lars_norms_`` and ``lamb_apply_`` / ``lars_apply_``, with the per-tensor norms summed over the
shards between them). In ``csrc/``: ``elementwise_`` (``ops.cpp``) checks the inputs against
the family's declaration and calls ``launch_elementwise`` (``elementwise.cu``), which runs the
family's kernel (its header, listed in ``families.cuh``, on ``elementwise_kernel`` or the 8-bit
``quant8.cuh``); ``lamb_`` and ``lars_`` call ``launch_lamb`` / ``launch_lars`` (``lamb.cu``,
``lars.cu``, on ``two_pass.cuh``). The step scalars (``fusedopt.scalars``) and tensor-valued
hyper-parameters are read on the device, so a step never waits for the GPU. ``global_norm`` is
two kernels (partials in fixed slots, then one block), deterministic.

The extension is loaded on first use: the ahead-of-time build (``FUSEDOPT_BUILD_CUDA=1 pip
install .``), else the user's cache, else compiled there now (see :mod:`fusedopt.build`).

Example (on a machine with a GPU and nvcc)::

    >>> import torch, fusedopt
    >>> model = torch.nn.Linear(1024, 1024).cuda()
    >>> opt = fusedopt.AdamW(model.parameters(), lr=1e-3, backend="cuda")
    >>> model(torch.randn(8, 1024, device="cuda")).square().mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

import collections
import math
import threading
from itertools import chain

import torch

from . import build, capture, families, layout, quant, reference

NAME = "cuda"
DESCRIPTION = "CUDA C++ multi-tensor kernels (csrc/), compiled with nvcc on first use or by `python -m fusedopt build`"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORM_TYPES = (1.0, 2.0, math.inf)
_lock = threading.Lock()
_loaded: dict = {"path": None, "error": None}


def _ops():
    """``torch.ops.fusedopt``, loading (or building) the extension on first use."""
    if _loaded["path"] is None:
        with _lock:
            if _loaded["path"] is None:
                if _loaded["error"] is not None:
                    raise RuntimeError(_loaded["error"])
                try:
                    path = build.prebuilt() or build.cached() or build.build()
                    torch.ops.load_library(str(path))
                except (build.BuildError, OSError, RuntimeError) as e:
                    _loaded["error"] = f"the fusedopt CUDA extension could not be loaded: {e}"
                    raise RuntimeError(_loaded["error"]) from e
                _register_fakes()
                _loaded["path"] = path
    return torch.ops.fusedopt


def library_path():
    """Path of the loaded extension (loading it if needed)."""
    _ops()
    return _loaded["path"]


def available(device) -> str | None:
    """None when this backend can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if device.type != "cuda":
        return f"it runs on CUDA tensors, not {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if _loaded["error"] is not None:
        return _loaded["error"]
    if _loaded["path"] is not None or build.prebuilt() or build.cached():
        return None
    reason = build.cannot_build()
    return None if reason is None else f"the extension is not built, and cannot be built here: {reason}"


def unsupported_step(kind: str, *, block_size: int | None = None, norm_type: float | None = None) -> str | None:
    """Why this backend cannot run a step of ``kind`` with these requirements, or None (see
    :mod:`fusedopt.backends`): any 8-bit block size, and the 1-, 2- and inf-norms."""
    if norm_type is not None and float(norm_type) not in _NORM_TYPES:
        return f"its global norm takes norm_type 1, 2 or inf, not {norm_type}"
    return None


def unsupported(tensor: torch.Tensor) -> str | None:
    """Why this backend cannot take ``tensor`` (a param or a grad), or None."""
    if not tensor.is_cuda:
        return f"it takes CUDA tensors, got a {tensor.device.type} tensor"
    if tensor.dtype not in _DTYPES:
        return f"it takes float32, bfloat16 and float16 tensors, got {tensor.dtype}"
    return None  # any layout: dense ones as flat memory, others through copies (fusedopt.layout)


# --------------------------------------------------------------------------------------------
# Tables, codebooks and hyper-parameters.
# --------------------------------------------------------------------------------------------

class _Plan:
    """A batch's device tables: addresses (``table``, with each param's salt: its position in its
    group, and offset: where the tensor starts in its full param, ``Batch.offsets``), work items
    (``work``) and the per-tensor counters the kernels use to find the block that finishes a
    tensor (zero between launches). ``rounding``: ``(salts, offsets)``."""

    def __init__(self, ops, lists: dict, block_size: int, rounding: tuple, device: torch.device):
        salts, offsets = rounding
        table, work = ops.make_table(*(lists[k] for k in _TABLE_LISTS), block_size, salts, offsets)
        self.table = _to_device(table, device)
        self.work = _to_device(work, device)
        self.counters = torch.zeros(len(lists["params"]), dtype=torch.int32, device=device)


# The op's tensor lists, in its argument order: a family's states (at most three) in its own
# order, their absmaxes when 8-bit.
_MAX_STATES = 3
_TABLE_LISTS = ("params", "grads", *(f"states{k}" for k in range(_MAX_STATES)),
                *(f"absmaxes{k}" for k in range(_MAX_STATES)), "steps")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned, so the copy is asynchronous: building a table never waits for the GPU (and it
    # can be captured in a CUDA graph). CPU tensors (the input-check tests) stay as they are.
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _lists(batch, names) -> dict:
    """The op's tensor lists of ``batch``: its states ``names`` (torch's keys, in the family's
    order) as ``states0``, ``states1``, ... and their absmaxes as ``absmaxes0``, ... when 8-bit;
    the unused lists empty."""
    if len(names) > _MAX_STATES:
        raise ValueError(f"the cuda backend takes at most {_MAX_STATES} states per param, got {list(names)}")
    lists = {"params": batch.params, "grads": batch.grads, "steps": batch.steps}
    for k in range(_MAX_STATES):
        name = names[k] if k < len(names) else None
        lists[f"states{k}"] = batch.state[name] if name else []
        lists[f"absmaxes{k}"] = batch.state[name + "_absmax"] if name and batch.quantized else []
    return lists


def _plan(batch, lists: dict) -> _Plan:
    """The batch's tables from ``batch.cache``, rebuilt when any address or size changed (a
    param re-bound with ``p.data = ...``, a new grad tensor, a grad that became None)."""
    block_size = batch.block_size if batch.quantized else 0
    tensors = list(chain.from_iterable(lists[k] for k in _TABLE_LISTS))
    salts = [int(s) for s in batch.positions]
    offsets = [int(o) for o in batch.offsets]
    key = (block_size, tuple(t.data_ptr() for t in tensors), tuple(p.numel() for p in batch.params), tuple(salts),
           tuple(offsets))
    cache = batch.cache
    if cache.get("key") == key:
        return cache["plan"]
    device = batch.params[0].device
    plan = _Plan(_ops(), lists, block_size, (salts, offsets), device)
    if not capture.capturing(device):  # see capture.capturing
        cache["plan"], cache["key"] = plan, key
    return plan


_codebooks: dict = {}


def codebook(device: torch.device) -> torch.Tensor:
    """[4, 256] fp32 on ``device``: signed and unsigned dynamic-map values, then their 255
    midpoints (padded with +inf), exactly :mod:`fusedopt.quant`'s tables."""
    device = torch.device(device)
    book = _codebooks.get(device)
    if book is None:
        pad = torch.tensor([math.inf])
        book = _to_device(torch.stack([
            quant.dynamic_map(True), quant.dynamic_map(False),
            torch.cat([quant.midpoints(True), pad]), torch.cat([quant.midpoints(False), pad]),
        ]), device)
        if not capture.capturing(device):  # see capture.capturing
            _codebooks[device] = book
    return book


def _hyper(values, device: torch.device) -> tuple[list[float], list]:
    """Numbers for the op's ``hyper`` and, for hyper-parameters given as tensors on the GPU,
    1-element fp32 device tensors read by the kernels (a CPU tensor is read here: no sync)."""
    numbers, tensors = [], []
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            numbers.append(0.0)
            tensors.append(v.detach().to(device=device, dtype=torch.float32).reshape(1))
        else:
            numbers.append(float(v))
            tensors.append(None)
    return numbers, tensors


def _rounding(batch) -> tuple[bool, int]:
    """The ops' ``stochastic_rounding`` and ``seed``: stochastic for bf16 params of a group with
    ``stochastic_rounding=True`` (as the reference decides), keyed by the group's ``seed``."""
    return reference.stochastic(batch), int(batch.group.get("seed", 0))


# --------------------------------------------------------------------------------------------
# The backend entry points.
# --------------------------------------------------------------------------------------------


def _flat(fn):
    """``fn`` on a batch whose every tensor of a param is flat memory in the param's layout:
    gathered copies where one is not, scattered back after the op (see fusedopt.layout). The
    op checks it: a dense param, and grads and states with its strides."""

    def run(batch) -> None:
        gathered = layout.gather(batch, quant.relayout)
        fn(gathered.batch)
        gathered.scatter()

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def _two_pass(batch, ops: tuple, slots: int, states: tuple[str, ...], hyper_values, flags: tuple) -> None:
    """A two-pass family's step over one batch (LAMB, LARS: csrc/two_pass.cuh). ``ops`` are the
    family's three ops ``(both, norms, apply)``: ``both`` (two kernels), or for sharded params
    (``batch.all_reduce``) ``norms``, each tensor's ``||p||^2`` and ``||u||^2`` summed over its
    shards, then ``apply``. The ops take ``slots`` state lists and as many absmax lists: ``states``
    (the batch's state names, in the op's order; fp32, or 8-bit codes with absmaxes), the rest
    empty. ``flags``: the ops' arguments between ``hyper_tensors`` and ``block_size``."""
    both, norms_pass, apply_pass = ops
    lists = _lists(batch, states)
    plan = _plan(batch, lists)
    device = batch.params[0].device
    hyper, hyper_tensors = _hyper(hyper_values, device)
    streams = [lists["params"], lists["grads"], *(lists[f"states{k}"] for k in range(slots)),
               *(lists[f"absmaxes{k}"] for k in range(slots)), lists["steps"]]
    tables = (batch.scalars, plan.table, plan.work, plan.counters)
    book = codebook(device) if batch.quantized else None
    block_size = batch.block_size if batch.quantized else 0
    rounding = _rounding(batch)
    if batch.all_reduce is None:
        both(*streams, *tables, book, hyper, hyper_tensors, *flags, block_size, *rounding)
        return
    norms = norms_pass(*streams, *tables, book, hyper, hyper_tensors, *flags, block_size)
    batch.all_reduce(norms)
    apply_pass(*streams, *tables, book, norms, hyper, hyper_tensors, *flags, block_size, *rounding)


@_flat
def lamb(batch) -> None:
    """LAMB over one batch, fp32 or 8-bit states: one op (two kernels), or for sharded params
    (``batch.all_reduce``) the moments pass, each tensor's ``||p||^2`` and ``||u||^2`` summed over
    its shards, then the apply pass."""
    group = batch.group
    ops = _ops()
    _two_pass(batch, (ops.lamb_, ops.lamb_moments_, ops.lamb_apply_), 2, ("exp_avg", "exp_avg_sq"),
              (group["lr"], *group["betas"], group["eps"], group["weight_decay"]), (group["bias_correction"],))


@_flat
def lars(batch) -> None:
    """LARS over one batch, with the momentum buffer (fp32 or 8-bit) where the group keeps one
    (``momentum != 0``): as :func:`lamb`, two kernels, or three steps for sharded params."""
    group = batch.group
    ops = _ops()
    # the states the base made for the group (families.LARS: the buffer where momentum != 0)
    _two_pass(batch, (ops.lars_, ops.lars_norms_, ops.lars_apply_), 1,
              tuple(n for n in ("momentum_buffer",) if n in batch.state),
              (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["max_unorm"]),
              (group["nesterov"],))


def _elementwise(batch, family: families.Family) -> None:
    """One step of an elementwise ``family`` over ``batch`` through
    ``torch.ops.fusedopt.elementwise_``, all from the family's spec: its states (torch's keys,
    those the group keeps, in the family's order: which pick the kernel's variant), its
    hyper-parameters by name (numbers, or tensors read on the device) and the switches that are
    on."""
    group = batch.group
    names = family.state_names(group)
    lists = _lists(batch, names)
    plan = _plan(batch, lists)
    device = batch.params[0].device
    hypers = family.values(group)
    hyper, hyper_tensors = _hyper(list(hypers.values()), device)
    _ops().elementwise_(
        family.name, lists["params"], lists["grads"], list(names), *(lists[k] for k in _TABLE_LISTS[2:]),
        batch.scalars, plan.table, plan.work, plan.counters,
        codebook(device) if batch.quantized and names else None, list(hypers), hyper, hyper_tensors,
        [flag for flag in family.flags if group[flag]], batch.block_size if batch.quantized else 0,
        *_rounding(batch),
    )


@_flat
def adam(batch) -> None:
    _elementwise(batch, families.ADAM)


@_flat
def lion(batch) -> None:
    _elementwise(batch, families.LION)


@_flat
def sgd(batch) -> None:
    _elementwise(batch, families.SGD)


@_flat
def adagrad(batch) -> None:
    _elementwise(batch, families.ADAGRAD)


@_flat
def rmsprop(batch) -> None:
    _elementwise(batch, families.RMSPROP)


#: The step of each family (``fusedopt.backends``).
STEPS = {"adam": adam, "lamb": lamb, "lion": lion, "sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "lars": lars}


_norm_plans: collections.OrderedDict = collections.OrderedDict()
_NORM_PLANS_KEPT = 8


def global_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` together (fp32 accumulation), as a 0-d fp32
    tensor on their device; ``inf`` is ``max |x|``. The 1-, 2- and inf-norms are two kernels,
    deterministic (partials in fixed slots, reduced in a fixed order). Other orders raise
    (``unsupported_step`` says so first, so that ``fusedopt.backends`` resolves them
    elsewhere)."""
    if not tensors:
        raise ValueError("global_norm needs at least one tensor")
    reason = unsupported_step("norm", norm_type=norm_type)
    if reason is not None:
        raise RuntimeError(f"the cuda backend cannot compute this norm: {reason}")
    norm_type = float(norm_type)
    # A norm is the same in any memory order: dense tensors as they lie, others (an expanded
    # grad) through a contiguous copy.
    tensors = [t if layout.dense(t) else t.contiguous() for t in tensors]
    key = tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors)
    plan = _norm_plans.get(key)
    if plan is None:
        ops = _ops()
        table, work = ops.make_table(tensors, [], [], [], [], [], [], [], [], 0)
        plan = (_to_device(table, tensors[0].device), _to_device(work, tensors[0].device))
        if not capture.capturing(tensors[0].device):  # see capture.capturing
            _norm_plans[key] = plan
            while len(_norm_plans) > _NORM_PLANS_KEPT:
                _norm_plans.popitem(last=False)
    else:
        _norm_plans.move_to_end(key)
    return _ops().global_norm(tensors, plan[0], plan[1], norm_type)


# --------------------------------------------------------------------------------------------
# Fake implementations, so that torch.compile can trace the ops (registered once, on load).
# --------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    lib = "fusedopt::"

    @torch.library.register_fake(lib + "make_table")
    def _(params, grads, states0, states1, states2, absmaxes0, absmaxes1, absmaxes2, steps, block_size, salts=(),
          offsets=()):
        chunk = torch.ops.fusedopt.chunk_size(block_size)
        n_work = sum(max(1, -(-p.numel() // chunk)) for p in params)
        width = torch.ops.fusedopt.table_width()
        return (torch.empty((len(params), width), dtype=torch.int64, device="cpu"),
                torch.empty((n_work, 2), dtype=torch.int32, device="cpu"))

    for name in ("elementwise_", "lamb_", "lamb_apply_", "lars_", "lars_apply_"):
        torch.library.register_fake(lib + name)(lambda *args, **kwargs: None)

    # The two-pass families' first passes: each tensor's sums of p^2 and u^2.
    @torch.library.register_fake(lib + "lamb_moments_")
    def _(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes, steps, scalars, table, work,
          counters, codebook, hyper, hyper_tensors, bias_correction, block_size):
        return scalars.new_empty((len(params), 2), dtype=torch.float32)

    @torch.library.register_fake(lib + "lars_norms_")
    def _(params, grads, momentum_buffers, momentum_buffer_absmaxes, steps, scalars, table, work, counters, codebook,
          hyper, hyper_tensors, nesterov, block_size):
        return scalars.new_empty((len(params), 2), dtype=torch.float32)

    @torch.library.register_fake(lib + "global_norm")
    def _(tensors, table, work, norm_type):
        return tensors[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "quantize_blockwise")
    def _(x, codebook, signed, block_size):
        return (torch.empty_like(x, dtype=torch.uint8),
                x.new_empty((quant.num_blocks(x.numel(), block_size),), dtype=torch.float32))
