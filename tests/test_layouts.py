"""Params, grads and states in any memory layout, on every backend (see ``fusedopt.layout``).

torch.optim steps a transposed param, a ``channels_last`` conv weight, a param with gaps
(``w[:, ::2]``) and grads with other strides than their params (an expanded, stride-0 grad; a
``channels_last`` grad of a contiguous param and the reverse). So does fusedopt, on every
backend: in place (the param keeps its address and strides), with states laid out as the
param, and with the orders that depend on memory (8-bit blocks, stochastic rounding's element
index) taken in the param's memory order. The oracle for those is the reference stepping each
param's *memory twin*: a 1-d contiguous copy of the param in its memory order, with its grad
in the same order; codes and rounded bits must be the twin's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import backends, layout, quant
from fusedopt.testing import assert_close, assert_identical

import cases
from conftest import FULL_ONLY, full_tier

BACKENDS = ("reference", "triton", "cuda")
STEPS = 7
EIGHT_BIT = dict(min_8bit_size=32, block_size=64)
FAMILIES = {
    "Adam": dict(weight_decay=0.1),
    "AdamW": dict(weight_decay=0.1, amsgrad=True),
    "LAMB": dict(weight_decay=0.1),
    "Lion": dict(weight_decay=0.1),
    "Adam8bit": dict(EIGHT_BIT),  # no L2 decay: the codes depend on the grads only (exact)
    "AdamW8bit": dict(EIGHT_BIT, weight_decay=0.1),
    "Lion8bit": dict(EIGHT_BIT, weight_decay=0.1),
    # No L2 decay below either (see Adam8bit); the bf16 runs of these are in the full tier.
    "SGD": dict(momentum=0.9, nesterov=True),
    "Adagrad": dict(lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(momentum=0.5, centered=True),
    "LARS": dict(momentum=0.9, max_unorm=0.01),
    "SGD8bit": dict(EIGHT_BIT, momentum=0.9),
    "Adagrad8bit": dict(EIGHT_BIT),
    "RMSprop8bit": dict(EIGHT_BIT, momentum=0.5, centered=True),
    "LARS8bit": dict(EIGHT_BIT, momentum=0.9),
    "LAMB8bit": dict(EIGHT_BIT, weight_decay=0.1),
}
LR = {"Lion": 1e-3, "Lion8bit": 1e-3}
_FIRST = ("Adam", "AdamW", "LAMB", "Lion", "Adam8bit", "AdamW8bit", "Lion8bit")  # every dtype by default


def _lay(shape, kind, gen, dtype=torch.float32, scale=1.0):
    """A tensor of ``shape`` with random values (times ``scale``, in ``dtype``), laid out as
    ``kind``."""
    def values(*size):
        return (torch.randn(size, generator=gen) * scale).to(dtype)

    if kind == "contiguous":
        return values(*shape)
    if kind == "transposed":  # a 2-d param made with w.t(): strides (1, rows)
        return values(*shape[::-1]).t()
    if kind == "channels_last":
        return values(*shape).contiguous(memory_format=torch.channels_last)
    if kind == "expanded":  # stride 0 on dim 0, as a broadcast grad
        return values(1, *shape[1:]).expand(shape)
    if kind == "gaps":  # w[:, ::2]: not dense
        return values(shape[0], 2 * shape[1])[:, ::2]
    raise ValueError(kind)


#: (shape, param layout, grad layout): every case of the issue in one optimizer.
LAYOUTS = [
    ((40, 7), "transposed", "transposed"),
    ((5, 3, 3, 3), "channels_last", "channels_last"),
    ((33, 9), "contiguous", "expanded"),
    ((4, 6, 3, 5), "channels_last", "contiguous"),
    ((6, 5, 3, 3), "contiguous", "channels_last"),
    ((9, 13), "gaps", "contiguous"),
]


def _skip_unavailable(backend):
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")


@pytest.fixture
def on(request):
    """``on(backend)``: skips when it cannot run here; ``cuda`` runs the CUDA kernels on the
    CPU through tests/cuda_emu (as tests/test_cuda_emulated.py does)."""
    stack = []

    def enter(backend):
        if backend == "cuda":
            from cuda_emu import emulator

            reason = emulator.cannot_build()
            if reason is not None:
                pytest.skip(f"the emulated cuda backend cannot be built here: {reason}")
            lib = emulator.load()
            emulator.configure(lib, sms=2, blocks_per_sm=2, block_order="shuffled", thread_order="shuffled", seed=1)
            context = emulator.emulated_cuda_backend(lib)
            context.__enter__()
            stack.append(context)
        _skip_unavailable(backend)
        return backend

    yield enter
    for context in stack:
        context.__exit__(None, None, None)


def _twin(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``'s values in the memory order of ``like``'s layout, as a 1-d contiguous tensor."""
    return layout.flat(layout.to_layout(t, layout.strides(like))).clone()


def _memory(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (laid out as ``like``) as its 1-d memory order."""
    assert layout.same_layout(t, like), f"strides {t.stride()} are not the layout {layout.strides(like)}"
    return layout.flat(t)


def _run(cls, kwargs, params, grads, backend, steps=STEPS):
    opt = getattr(fusedopt, cls)(params, lr=LR.get(cls, 1e-2), backend=backend, **kwargs)
    for k in range(steps):
        for p, g in zip(params, grads[k]):
            p.grad = g
        opt.step()
    return opt


def _compare_with_twins(cls, dtype, opt, params, topt, twins, what):
    # Adam's L2 decay feeds the (16-bit) param into the moments: a param two backends round
    # to neighbouring values moves the states by that much (as in test_backends).
    state_dtype = dtype if cls == "Adam" else torch.float32
    for i, (p, q) in enumerate(zip(params, twins)):
        where = f"{what} param {i} {LAYOUTS[i][1:]}"
        assert_close(_twin(p, p), q, dtype, where)
        for name, value in topt.state[q].items():
            mine = opt.state[p][name]
            if name == "step" or name.endswith("_absmax"):
                assert_close(mine, value, torch.float32, f"{where} {name}")
            elif mine.dtype == torch.uint8:  # the same blocks over the same fp32 states: the same codes
                assert torch.equal(_memory(mine, p), value), f"{where} {name}: codes differ from the memory twin's"
            else:
                assert_close(_memory(mine, p), value, state_dtype, f"{where} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", list(FAMILIES))
def test_every_layout_steps_in_place_as_its_memory_twin(on, cls, backend, dtype, request):
    """One optimizer over every layout of :data:`LAYOUTS`, 7 steps: each param against the
    reference stepping its memory twin (every state, codes bit for bit); the params keep their
    addresses and strides, and every state is laid out as its param."""
    if dtype != torch.float32 and cls not in _FIRST and not full_tier(request.config):
        pytest.skip(FULL_ONLY)
    on(backend)
    cases.skip_unless_backend_has(getattr(fusedopt, cls), backend)
    gen = torch.Generator().manual_seed(11)
    params = [_lay(shape, kind, gen, dtype) for shape, kind, _ in LAYOUTS]
    grads = [[_lay(shape, kind, gen, dtype, 3.0) for shape, _, kind in LAYOUTS] for _ in range(STEPS)]
    twins = [_twin(p, p) for p in params]
    twin_grads = [[_twin(g, p) for g, p in zip(step, params)] for step in grads]
    addresses = [(p.data_ptr(), p.stride()) for p in params]
    kwargs = FAMILIES[cls]
    opt = _run(cls, kwargs, params, grads, backend)
    topt = _run(cls, kwargs, twins, twin_grads, "reference")
    assert [(p.data_ptr(), p.stride()) for p in params] == addresses, "a param was not updated in place"
    for p in params:
        for name, value in opt.state[p].items():
            if value.dim() and not name.endswith("_absmax"):
                assert layout.same_layout(value, p), f"state {name} has strides {value.stride()}, param {p.stride()}"
    _compare_with_twins(cls, dtype, opt, params, topt, twins, f"{cls} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_every_layout_against_torch(on, cls, backend):
    """fp32 Adam/AdamW over every layout against torch.optim stepping the same params (in the
    same layouts, logically: torch.optim is layout-blind)."""
    on(backend)
    gen = torch.Generator().manual_seed(5)
    params = [_lay(shape, kind, gen) for shape, kind, _ in LAYOUTS]
    theirs = [p.clone() for p in params]
    grads = [[_lay(shape, kind, gen) for shape, _, kind in LAYOUTS] for _ in range(STEPS)]
    kwargs = dict(weight_decay=0.1, amsgrad=True)
    opt = getattr(fusedopt, cls)(params, lr=1e-2, backend=backend, **kwargs)
    topt = getattr(torch.optim, cls)(theirs, lr=1e-2, **kwargs)
    for k in range(STEPS):
        for p, q, g in zip(params, theirs, grads[k]):
            p.grad, q.grad = g, g.clone()
        opt.step()
        topt.step()
    for i, (p, q) in enumerate(zip(params, theirs)):
        assert_close(p, q, torch.float32, f"param {i}")
        for name, value in topt.state[q].items():
            assert_close(opt.state[p][name], value, torch.float32, f"param {i} {name}")
            if value.dim():  # torch.optim lays its states out as the param too
                assert opt.state[p][name].stride() == value.stride(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_of_a_channels_last_bf16_param(on, backend):
    """The fp32 master of a channels_last bf16 param is channels_last; the update runs on it
    and the param is its round-to-nearest copy, as the memory twin's."""
    on(backend)
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(5, 3, 3, 3, generator=gen).to(torch.bfloat16, memory_format=torch.channels_last)
    twin = _twin(p, p)
    grads = [[torch.randn(5, 3, 3, 3, generator=gen).to(torch.bfloat16)] for _ in range(STEPS)]
    address = (p.data_ptr(), p.stride())
    opt = _run("AdamW", dict(master_weights=True), [p], grads, backend)
    topt = _run("AdamW", dict(master_weights=True), [twin], [[_twin(g[0], p)] for g in grads], "reference")
    assert (p.data_ptr(), p.stride()) == address
    master = opt.state[p]["master_param"]
    assert master.dtype == torch.float32 and master.stride() == p.stride()
    assert_close(_memory(master, p), topt.state[twin]["master_param"], torch.float32, "master")
    assert_identical(p, master.to(torch.bfloat16), "param: the master rounded to nearest")
    for name in ("exp_avg", "exp_avg_sq"):
        assert_close(_memory(opt.state[p][name], p), topt.state[twin][name], torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["Lion", "Lion8bit"])
def test_stochastic_rounding_draws_for_the_memory_position(on, cls, backend):
    """Stochastic rounding's element index is the element's position in the param's memory
    order: a channels_last (and a transposed) bf16 param stores exactly the bits of its memory
    twin (Lion's fp32 values are the same in every backend, so the bits are too), and not
    those it would get were the noise drawn for the row-major index."""
    on(backend)
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(8, 5, 7, 3, generator=gen).to(torch.bfloat16, memory_format=torch.channels_last),
              torch.randn(60, 9, generator=gen).to(torch.bfloat16).t()]
    grads = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]]
    twins = [_twin(p, p) for p in params]
    rowmajor = [p.contiguous() for p in params]
    kwargs = dict(stochastic_rounding=True, weight_decay=0.1, **(EIGHT_BIT if cls == "Lion8bit" else {}))
    _run(cls, kwargs, params, grads, backend, steps=1)
    _run(cls, kwargs, twins, [[_twin(g, p) for g, p in zip(grads[0], params)]], "reference", steps=1)
    _run(cls, kwargs, rowmajor, [[g.contiguous() for g in grads[0]]], "reference", steps=1)
    for i, (p, q, r) in enumerate(zip(params, twins, rowmajor)):
        assert_identical(_memory(p, p).view(torch.int16), q.view(torch.int16), f"param {i}: the twin's bits")
        assert not torch.equal(p, r), f"param {i}: the bits of row-major indices"


def test_load_a_contiguous_checkpoint_into_a_channels_last_optimizer():
    """torch.optim's state of a contiguous param loads into fusedopt over the same weights in
    channels_last: states channels_last with the same values, and the next steps match torch."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, 3, 3, generator=gen)
    theirs, ours = w.clone(), w.clone().contiguous(memory_format=torch.channels_last)
    topt = torch.optim.AdamW([theirs], lr=1e-2, amsgrad=True)
    for _ in range(3):
        theirs.grad = torch.randn(w.shape, generator=gen)
        topt.step()
    ours.copy_(theirs)
    opt = fusedopt.AdamW([ours], lr=1e-2, amsgrad=True)
    opt.load_state_dict(topt.state_dict())
    for name, value in topt.state[theirs].items():
        if value.dim():
            assert opt.state[ours][name].stride() == ours.stride(), name
        assert_identical(opt.state[ours][name], value, name)
    for k in range(STEPS):
        g = torch.randn(w.shape, generator=gen)
        theirs.grad, ours.grad = g, g.clone()
        topt.step()
        opt.step()
    assert_close(ours, theirs, torch.float32, "param")
    for name, value in topt.state[theirs].items():
        assert_close(opt.state[ours][name], value, torch.float32, name)


def test_load_8bit_states_across_layouts():
    """8-bit codes saved for a contiguous param load into a channels_last param's optimizer as
    the documented conversion: dequantized over the saved blocks (row-major), requantized over
    the param's memory order; saved in the param's own layout they load bit for bit."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(5, 3, 3, 3, generator=gen)
    src = w.clone()
    sopt = fusedopt.AdamW8bit([src], **EIGHT_BIT)
    for _ in range(3):
        src.grad = torch.randn(w.shape, generator=gen)
        sopt.step()
    saved = sopt.state_dict()
    cl = w.clone().contiguous(memory_format=torch.channels_last)
    opt = fusedopt.AdamW8bit([cl], **EIGHT_BIT)
    opt.load_state_dict(saved)
    for name in ("exp_avg", "exp_avg_sq"):
        signed = quant.signed_state(name)
        codes, absmax = saved["state"][0][name], saved["state"][0][name + "_absmax"]
        values = quant.dequantize_blockwise(codes, absmax, signed, 64)
        expected = quant.quantize_blockwise(layout.to_layout(values, cl.stride()), signed, 64)
        assert opt.state[cl][name].stride() == cl.stride(), name
        assert torch.equal(opt.state[cl][name], expected[0]), name
        assert_identical(opt.state[cl][name + "_absmax"], expected[1], name + "_absmax")
    again = fusedopt.AdamW8bit([cl.clone().contiguous(memory_format=torch.channels_last)], **EIGHT_BIT)
    again.load_state_dict(opt.state_dict())
    for name, value in opt.state[cl].items():
        assert torch.equal(next(iter(again.state.values()))[name], value), name


def test_blocks_run_over_memory_order():
    """quant's blocks follow the tensor's layout: a channels_last tensor's codes and absmax are
    those of its memory order, and dequantizing gives the values back in the same layout."""
    x = torch.randn(5, 7, 3, 3).contiguous(memory_format=torch.channels_last)
    codes, absmax = quant.quantize_blockwise(x, True, 32)
    flat_codes, flat_absmax = quant.quantize_blockwise(layout.flat(x).clone(), True, 32)
    assert codes.stride() == x.stride()
    assert torch.equal(layout.flat(codes), flat_codes) and torch.equal(absmax, flat_absmax)
    back = quant.dequantize_blockwise(codes, absmax, True, 32)
    assert back.stride() == x.stride()
    assert torch.equal(layout.flat(back), quant.dequantize_blockwise(flat_codes, flat_absmax, True, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overlapping_param_is_refused_before_anything_changes(on, backend):
    """An expanded param (elements sharing addresses) cannot be updated in place; torch.optim
    refuses it at its step too. fusedopt says which param and why, before any state changes."""
    on(backend)
    ok = torch.randn(10)
    bad = torch.randn(1, 6).expand(4, 6)
    q = torch.randn(1, 6).expand(4, 6)
    q.grad = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="more than one element"):
        torch.optim.AdamW([q]).step()
    opt = fusedopt.AdamW([ok, bad], backend=backend)
    before = ok.clone()
    ok.grad, bad.grad = torch.randn(10), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"param 1 of group 0 cannot be stepped: .*overlap in memory"):
        opt.step()
    assert torch.equal(ok, before) and not opt.state


def test_the_cuda_ops_check_layouts(on):
    """The ops take dense tensors of any strides, and a param's grad and states in its layout;
    they refuse the rest, naming the argument (the backend hands them gathered copies)."""
    on("cuda")
    from fusedopt import cuda_backend

    ops = cuda_backend._ops()
    p = torch.randn(4, 6).t()
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
    scalars = torch.tensor([1.0, 0.0, 0.0])
    hyper, hyper_tensors = cuda_backend._hyper((1e-3, 0.9, 0.999, 1e-8, 0.0), torch.device("cpu"))

    def adam(grad, param=p):
        table, work = ops.make_table([param], [grad], [m], [v], [], [], [], [], [step], 0)
        ops.elementwise_("adam", [param], [grad], ["exp_avg", "exp_avg_sq"], [m], [v], [], [], [], [], [step],
                         scalars, table, work, torch.zeros(1, dtype=torch.int32), None,
                         ["lr", "beta1", "beta2", "eps", "weight_decay"], hyper, hyper_tensors,
                         ["decoupled_weight_decay"], 0)

    adam(torch.randn(4, 6).t())  # transposed param, grad and states: flat memory, accepted
    with pytest.raises(RuntimeError, match=r"elementwise_: grads\[0\] has sizes \[6, 4\] and strides \[4, 1\] but "
                                           r"params\[0\] has sizes \[6, 4\] and strides \[1, 6\]"):
        adam(torch.randn(6, 4))
    with pytest.raises(RuntimeError, match=r"elementwise_: grads\[0\] must be non-overlapping and dense"):
        adam(torch.randn(1, 4).expand(6, 4))
    with pytest.raises(RuntimeError, match=r"elementwise_: params\[0\] must be non-overlapping and dense"):
        adam(torch.randn(6, 4), torch.randn(6, 8)[:, ::2])


@pytest.mark.parametrize("cls", ["AdamW", "AdamW8bit"])
def test_a_channels_last_model_is_flat_memory_to_the_kernels(cls):
    """A conv model in channels_last: autograd's grads and fusedopt's states share each
    param's strides, so the kernels get the batch as it is: no gathered copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 5, 3)).to(
        memory_format=torch.channels_last)
    opt = getattr(fusedopt, cls)(model.parameters(), **(EIGHT_BIT if cls.endswith("8bit") else {}))
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    model(x).square().mean().backward()
    opt.step()
    weight = model[0].weight
    assert not weight.is_contiguous() and weight.grad.stride() == weight.stride()
    (batch,) = [b for plan in opt._plans.values() for b in plan.batches if any(p is weight for p in b.params)]
    gathered = layout.gather(batch, quant.relayout)
    assert gathered.batch is batch and not gathered.back


def _moved_by_hand(opt, w):
    """What moving ``w`` to channels_last should make of its states: fp32 states copied into
    the new layout, 8-bit states dequantized over their old blocks and quantized over the new
    layout's (put into ``opt.state`` as new tensors)."""
    state = opt.state[w]
    for n in [n for n in state if n != "step" and not n.endswith("_absmax")]:
        v = state[n]
        if v.dtype == torch.uint8:
            signed, bs = quant.signed_state(n), EIGHT_BIT["block_size"]
            values = quant.dequantize_blockwise(v, state[n + "_absmax"], signed, bs)
            state[n], state[n + "_absmax"] = quant.quantize_blockwise(
                values.contiguous(memory_format=torch.channels_last), signed, bs)
        else:
            state[n] = v.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "AdamW8bit"])
def test_a_param_laid_out_anew_after_its_states_moves_them_once(on, cls, backend):
    """``w.data = w.data.to(memory_format=torch.channels_last)`` after steps (a model moved to
    channels_last once its optimizer has state): the states follow the param, once, in place
    (the same tensor objects). fp32 states keep their values; 8-bit codes are requantized over
    the new layout's blocks from their dequantized values. Moving codes element by element, as
    before, put them in other blocks than their absmax: the next update was off by up to 56% on
    the reference and 43% on Triton. The oracle makes the move by hand on the reference
    (:func:`_moved_by_hand`); codes must equal it bit for bit, and the fp32 run must equal a run
    that never moved, bit for bit."""
    backend = on(backend)
    gen = torch.Generator().manual_seed(11)
    init = torch.randn(8, 5, 3, 3, generator=gen)
    grads = [torch.randn(8, 5, 3, 3, generator=gen) for _ in range(5)]
    kw = EIGHT_BIT if cls.endswith("8bit") else {}
    runs = {}
    for name, b, move in (("moved", backend, "step"), ("oracle", "reference", "hand"),
                          ("unmoved", "reference", None)):
        w = torch.nn.Parameter(init.clone())
        opt = getattr(fusedopt, cls)([w], lr=1e-2, backend=b, **kw)
        for k, g in enumerate(grads):
            if k == 3 and move is not None:
                held = dict(opt.state[w])
                if move == "hand":
                    _moved_by_hand(opt, w)
                w.data = w.data.to(memory_format=torch.channels_last)
            w.grad = g
            opt.step()
        if move == "step":  # moved in place: the same tensor objects, in the param's layout
            for n, v in opt.state[w].items():
                assert v is held[n], f"state {n!r} was replaced"
                if n != "step" and not n.endswith("_absmax"):
                    assert v.stride() == w.stride(), f"state {n!r} is not laid out as its param"
        runs[name] = (w, opt)
    (w, opt), (rw, ropt), (uw, uopt) = runs["moved"], runs["oracle"], runs["unmoved"]
    assert_close(w, rw, torch.float32, f"{backend} vs the hand-moved reference, param")
    for n, v in ropt.state[rw].items():
        if v.dtype == torch.uint8:
            assert torch.equal(_memory(opt.state[w][n], w), _memory(v, rw)), f"{backend}: codes of {n!r} differ"
        else:
            assert_close(opt.state[w][n], v, torch.float32, f"{backend} vs the hand-moved reference, state {n!r}")
    if not cls.endswith("8bit"):
        assert_identical(w.detach().contiguous(), uw.detach(), "param moved vs not moved")
        for n, v in uopt.state[uw].items():
            assert_identical(opt.state[w][n].contiguous(), v, f"state {n!r} moved vs not moved")
