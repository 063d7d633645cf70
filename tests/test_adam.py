"""Adam / AdamW / Adam8bit / AdamW8bit on the reference backend against torch.optim (for-loop
implementation) and bitsandbytes' CPU 8-bit optimizers.

Every test runs at least 8 steps on random data over two param groups with different
hyper-parameters, and compares every param, every state tensor and every step count.
"""

from __future__ import annotations

import io

import pytest
import torch

import bitsandbytes as bnb
import fusedopt
from fusedopt import quant
from tolerances import assert_close, assert_identical

STEPS = 8

# Shapes of each param group: odd sizes, a zero-size tensor, a single element, a 2-D tensor,
# one that is not a whole number of 256-blocks. The last param of group 0 never gets a grad.
SHAPES = ([(0,), (1,), (255,), (16, 17), (33,)], [(257,), (4097,)])
FROZEN = (0, 4)
# (step, group, param) whose grad is None at that step: its step count must not advance.
NO_GRAD = {(1, 0, 2), (2, 0, 2), (0, 1, 0), (5, 1, 1)}


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for shapes in SHAPES]


def _grads(step, params, seed=1):
    """Random grads (never zeros) in each param's dtype, each tensor with its own scale."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for gi, group in enumerate(params):
        gs = []
        for pi, p in enumerate(group):
            scale = 10.0 ** (torch.rand((), generator=gen).item() * 3 - 2)
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            skip = (gi, pi) == FROZEN or (step, gi, pi) in NO_GRAD
            gs.append(None if skip else g.to(p.dtype))
        out.append(gs)
    return out


def _groups(params, group1):
    return [{"params": params[0]}, {"params": params[1], **group1}]


# Group 1 differs from the defaults in every hyper-parameter.
GROUP1 = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)

VARIANTS = {
    # name: (fusedopt class, torch class, extra kwargs for both)
    "adam": (fusedopt.Adam, torch.optim.Adam, {}),
    "adamw": (fusedopt.AdamW, torch.optim.AdamW, {}),
    "adam-decoupled": (fusedopt.Adam, torch.optim.Adam, {"decoupled_weight_decay": True}),
}


def _compare(step, ours, opt, theirs, topt, dtype, state_dtype, names):
    for gi, (og, tg) in enumerate(zip(ours, theirs)):
        for pi, (p, q) in enumerate(zip(og, tg)):
            where = f"step {step} group {gi} param {pi}"
            assert_close(p, q, dtype, f"{where} param")
            assert p.dtype == dtype
            state = opt.state.get(p, {})
            assert set(state) == set(topt.state.get(q, {})), f"{where}: state keys differ"
            if not state:
                continue
            assert set(opt.state[p]) == {"step", *names}
            for name in names:
                assert opt.state[p][name].dtype == state_dtype, f"{where} {name} dtype"
                assert_close(opt.state[p][name], topt.state[q][name], state_dtype, f"{where} {name}")
            assert float(opt.state[p]["step"]) == float(topt.state[q]["step"]), f"{where} step"


def _set_grads(params, grads, convert=lambda g: g):
    for group, gs in zip(params, grads):
        for p, g in zip(group, gs):
            p.grad = None if g is None else convert(g).clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_adam_matches_torch(dtype, variant, amsgrad, maximize, weight_decay):
    cls, tcls, extra = VARIANTS[variant]
    kw = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, **extra)
    ours, theirs = _params(dtype), _params(dtype)
    opt = cls(_groups(ours, GROUP1), backend="reference", **kw)
    topt = tcls(_groups(theirs, GROUP1), foreach=False, **kw)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for step in range(STEPS):
        grads = _grads(step, ours)
        _set_grads(ours, grads)
        _set_grads(theirs, grads)
        opt.step()
        topt.step()
        _compare(step, ours, opt, theirs, topt, dtype, dtype, names)
    # The grad=None steps and the frozen param: step counts lag or never start.
    assert float(opt.state[ours[0][2]]["step"]) == STEPS - 2
    assert float(opt.state[ours[1][0]]["step"]) == STEPS - 1
    assert ours[0][4] not in opt.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["adam", "adamw"])
@pytest.mark.parametrize("flags", [{}, {"amsgrad": True, "maximize": True}], ids=["", "amsgrad-maximize"])
def test_adam_16bit_params_fp32_states(dtype, variant, flags):
    """16-bit params with fp32 states against torch on float64 copies. Each step starts torch
    from our params and states (so the comparison is of one rounding, see tolerances.py):
    params within the 16-bit tolerance, states within fp32's."""
    cls, tcls, extra = VARIANTS[variant]
    kw = dict(lr=1e-2, weight_decay=0.1, **flags, **extra)
    ours = _params(dtype)
    theirs = [[p.double() for p in group] for group in ours]
    opt = cls(_groups(ours, GROUP1), backend="reference", **kw)
    topt = tcls(_groups(theirs, GROUP1), foreach=False, **kw)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if flags else ())
    for step in range(STEPS):
        with torch.no_grad():
            for og, tg in zip(ours, theirs):
                for p, q in zip(og, tg):
                    q.copy_(p)
                    for name, value in opt.state[p].items():
                        topt.state[q][name].copy_(value)
        grads = _grads(step, ours)
        _set_grads(ours, grads)
        _set_grads(theirs, grads, convert=lambda g: g.double())
        opt.step()
        topt.step()
        _compare(step, ours, opt, theirs, topt, dtype, torch.float32, names)


def _checkpoint(state_dict):
    """``state_dict`` through ``torch.save`` / ``torch.load(weights_only=True)``. (Loading a
    live state dict would share tensors: torch.optim keeps the loaded ``step`` tensors as they
    are, so two optimizers would both advance them.)"""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_torch_state_dict_loads_both_ways():
    """torch.optim.AdamW's state dict loads into fusedopt.AdamW and ours into torch; both
    continue as the uninterrupted torch run."""
    dtype = torch.float64
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    base = _params(dtype)
    torch_run = torch.optim.AdamW(_groups(base, GROUP1), foreach=False, **kw)
    for step in range(3):
        _set_grads(base, _grads(step, base))
        torch_run.step()

    # torch -> fusedopt
    ours = [[p.clone() for p in group] for group in base]
    opt = fusedopt.AdamW(_groups(ours, GROUP1), backend="reference", **kw)
    opt.load_state_dict(_checkpoint(torch_run.state_dict()))
    for step in range(3, 6):
        grads = _grads(step, base)
        _set_grads(base, grads)
        _set_grads(ours, grads)
        torch_run.step()
        opt.step()
        _compare(step, ours, opt, base, torch_run, dtype, dtype, names)

    # fusedopt -> torch
    theirs = [[p.clone() for p in group] for group in ours]
    topt = torch.optim.AdamW(_groups(theirs, GROUP1), foreach=False, **kw)
    topt.load_state_dict(_checkpoint(opt.state_dict()))
    for step in range(6, 9):
        grads = _grads(step, base)
        _set_grads(ours, grads)
        _set_grads(theirs, grads)
        opt.step()
        topt.step()
        _compare(step, ours, opt, theirs, topt, dtype, dtype, names)


@pytest.mark.parametrize("scaler", [False, True], ids=["", "gradscaler"])
def test_max_grad_norm_matches_clip_then_step(scaler):
    """max_grad_norm against clip_grad_norm_ + torch AdamW (with GradScaler: unscale_, clip,
    step); last_grad_norm is the unscaled norm torch returns, kept as a 0-d device tensor."""
    dtype = torch.float32
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = _params(dtype), _params(dtype)
    opt = fusedopt.AdamW(_groups(ours, GROUP1), backend="reference", max_grad_norm=1.0, **kw)
    topt = torch.optim.AdamW(_groups(theirs, GROUP1), foreach=False, **kw)
    flat_theirs = [p for group in theirs for p in group]
    sc_ours = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    sc_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    clipped = 0
    for step in range(STEPS):
        # Alternate between grads that clip and grads that do not.
        grads = _grads(step, ours)
        multiplier = 10.0 if step % 2 else 1e-3
        if scaler:
            multiplier *= _scaler_scale(sc_ours)
            assert _scaler_scale(sc_theirs) == _scaler_scale(sc_ours)
        _set_grads(ours, grads, convert=lambda g: g * multiplier)
        _set_grads(theirs, grads, convert=lambda g: g * multiplier)
        if scaler:
            sc_theirs.unscale_(topt)
        norm = torch.nn.utils.clip_grad_norm_(flat_theirs, 1.0, foreach=False)
        if scaler:
            sc_ours.step(opt)
            sc_theirs.step(topt)
            sc_ours.update()
            sc_theirs.update()
        else:
            opt.step()
            topt.step()
        clipped += bool(norm > 1.0)
        assert isinstance(opt.last_grad_norm, torch.Tensor)
        assert opt.last_grad_norm.shape == () and opt.last_grad_norm.dtype == torch.float32
        assert_close(opt.last_grad_norm, norm, dtype, f"step {step} last_grad_norm")
        _compare(step, ours, opt, theirs, topt, dtype, dtype, ("exp_avg", "exp_avg_sq"))
    assert 0 < clipped < STEPS


def _scaler_scale(scaler):
    """The scaler's current scale (making it, as ``scaler.scale(loss)`` does on first use)."""
    scaler.scale(torch.ones(()))
    return scaler.get_scale()


def _snapshot(opt, params):
    return [
        (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None)
        for group in params
        for p in group
    ]


def _assert_unchanged(opt, params, snapshot, what):
    flat = [p for group in params for p in group]
    for i, (p, (value, state)) in enumerate(zip(flat, snapshot)):
        assert_identical(p, value, f"{what}: param {i}")
        if state is None:
            assert p not in opt.state or not opt.state[p], f"{what}: param {i} got state"
            continue
        assert set(opt.state[p]) == set(state), f"{what}: param {i} state keys"
        for k, v in state.items():
            assert_identical(opt.state[p][k], v, f"{what}: param {i} {k}")


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.AdamW8bit], ids=lambda c: c.__name__)
def test_gradscaler_inf_skips_step(cls):
    """GradScaler("cpu"): scaled steps match torch's GradScaler + AdamW; a step with an inf in
    one grad changes nothing (params, states, step counts), exactly as torch skips it."""
    dtype = torch.float32
    kw = dict(lr=1e-2, weight_decay=0.1)
    extra = {"min_8bit_size": 256} if cls is fusedopt.AdamW8bit else {}
    ours, theirs = _params(dtype), _params(dtype)
    opt = cls(_groups(ours, GROUP1), backend="reference", **kw, **extra)
    topt = torch.optim.AdamW(_groups(theirs, GROUP1), foreach=False, **kw)
    sc_ours = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sc_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    inf_steps = {3, 4}
    for step in range(STEPS):
        grads = _grads(step, ours)
        for params, sc in ((ours, sc_ours), (theirs, sc_theirs)):
            # What backward of the scaled loss leaves in .grad: the grads times the scale.
            scale = _scaler_scale(sc)
            _set_grads(params, grads, convert=lambda g: g * scale)
            if step in inf_steps:
                params[1][1].grad[17] = float("inf")
        before = _snapshot(opt, ours)
        sc_ours.step(opt)
        sc_theirs.step(topt)
        sc_ours.update()
        sc_theirs.update()
        assert sc_ours.get_scale() == sc_theirs.get_scale()
        if step in inf_steps:
            _assert_unchanged(opt, ours, before, f"step {step} with inf")
        if cls is fusedopt.AdamW:
            _compare(step, ours, opt, theirs, topt, dtype, dtype, ("exp_avg", "exp_avg_sq"))
        else:
            for gi, (og, tg) in enumerate(zip(ours, theirs)):
                for pi, (p, q) in enumerate(zip(og, tg)):
                    if p in opt.state:
                        assert float(opt.state[p]["step"]) == float(topt.state[q]["step"])
    assert float(opt.state[ours[1][1]]["step"]) == STEPS - len(inf_steps) - 1


def test_gradscaler_inf_on_first_step():
    """A skipped first step leaves the step count at 0 (the zero states exist, as with torch's
    fused Adam), so the run continues exactly as torch's, which never stepped."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(300, generator=gen)
    q = p.clone()
    opt = fusedopt.AdamW([p], lr=1e-2, backend="reference")
    topt = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    sc_ours, sc_theirs = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for step in range(STEPS):
        g = torch.randn(300, generator=gen)
        for x, o, sc in ((p, opt, sc_ours), (q, topt, sc_theirs)):
            x.grad = g * _scaler_scale(sc)
            if step == 0:
                x.grad[5] = float("nan")
            sc.step(o)
            sc.update()
        assert_close(p, q, torch.float32, f"step {step} param")
        if step == 0:
            assert_identical(p, q, "param after the skipped first step")
            assert_identical(opt.state[p]["step"], torch.tensor(0.0), "step count after the skipped first step")
            assert q not in topt.state
            continue
        assert float(opt.state[p]["step"]) == float(topt.state[q]["step"]) == step
        for name in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[p][name], topt.state[q][name], torch.float32, f"step {step} {name}")


# ---------------------------------------------------------------------------------------------
# 8-bit states
# ---------------------------------------------------------------------------------------------

STEPS_8BIT = 50
BLOCK = 256  # bitsandbytes' CPU 8-bit path is hard-wired to 256-element blocks
N_8BIT = 3 * 4096 + 100  # above min_8bit_size, with a short last block


def _errors(x, ref):
    d = (x.double() - ref.double()).abs()
    return d.max().item(), d.norm().item()


def _median_relative(x, ref):
    return ((x.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).median().item()


def _run_8bit_against_bnb(ours_cls, bnb_cls, ref_cls, state_names, **kw):
    """Run ours, bitsandbytes' and the fp32 reference optimizer for 50 steps on the same data;
    return the final params and each one's dequantized states."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(N_8BIT, generator=gen)
    # Per-element gradient scales spanning about five decades, as between the rows of a layer:
    # the block-wise quantizer must keep small entries of a block next to large ones.
    scale = torch.exp(2 * torch.randn(N_8BIT, generator=gen))
    a, b, r = p0.clone(), p0.clone(), p0.clone()
    opt = ours_cls([a], backend="reference", block_size=BLOCK, **kw)
    bopt = bnb_cls([b], **kw)
    ropt = ref_cls([r], **kw)
    for _ in range(STEPS_8BIT):
        g = torch.randn(N_8BIT, generator=gen) * scale
        for x in (a, b, r):
            x.grad = g.clone()
        opt.step()
        bopt.step()
        ropt.step()
    st, bst = opt.state[a], bopt.state[b]
    assert float(st["step"]) == STEPS_8BIT
    ours, theirs = {}, {}
    for i, name in enumerate(state_names, start=1):
        assert st[name].dtype == torch.uint8 and bst[f"state{i}"].dtype == torch.uint8
        signed = quant.signed_state(name)
        ours[name] = quant.dequantize_blockwise(st[name], st[name + "_absmax"], signed, BLOCK)
        theirs[name] = bnb.functional.dequantize_blockwise(
            bst[f"state{i}"], absmax=bst[f"absmax{i}"], code=bst[f"qmap{i}"], blocksize=BLOCK
        )
    return (a, ours), (b, theirs), (r, ropt.state[r])


def _assert_no_worse_than_bnb(ours, theirs, ref):
    """Param error (max and 2-norm) and state error (median relative error of the dequantized
    moments) against the fp32 run: ours no worse than bitsandbytes'.

    The states' absolute error is dominated by each block's largest entries, whose codes are the
    same in both libraries (same codebook, both round to nearest there); it is a tie, within the
    noise of two trajectories that differ in fp32 rounding. The relative error is where the
    quantizers differ (bitsandbytes' CPU search is not round-to-nearest for small entries), and it
    is what Adam's 1/sqrt(v) consumes."""
    (a, sa), (b, sb), (r, sr) = ours, theirs, ref
    (ours_max, ours_l2), (bnb_max, bnb_l2) = _errors(a, r), _errors(b, r)
    assert ours_max <= bnb_max, f"param max error {ours_max:.4g} > bitsandbytes' {bnb_max:.4g}"
    assert ours_l2 <= bnb_l2, f"param 2-norm error {ours_l2:.4g} > bitsandbytes' {bnb_l2:.4g}"
    for name in sa:
        e_ours, e_bnb = _median_relative(sa[name], sr[name]), _median_relative(sb[name], sr[name])
        assert e_ours <= e_bnb, f"{name}: median relative error {e_ours:.4g} > bitsandbytes' {e_bnb:.4g}"


@pytest.mark.parametrize(
    "ours_cls,bnb_name,ref_cls,kw",
    [
        # bitsandbytes' Adam8bit applies weight decay decoupled (as AdamW): compare it without.
        (fusedopt.Adam8bit, "Adam8bit", torch.optim.Adam, dict(lr=1e-3)),
        (fusedopt.AdamW8bit, "AdamW8bit", torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    ],
    ids=["Adam8bit", "AdamW8bit"],
)
def test_adam8bit_no_worse_than_bitsandbytes(ours_cls, bnb_name, ref_cls, kw):
    ours, theirs, ref = _run_8bit_against_bnb(
        ours_cls, getattr(bnb.optim, bnb_name), ref_cls, ("exp_avg", "exp_avg_sq"), **kw
    )
    _assert_no_worse_than_bnb(ours, theirs, ref)


@pytest.mark.parametrize("cls", [fusedopt.Adam8bit, fusedopt.AdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam8bit_small_tensors_keep_fp32_states(cls, dtype):
    """Below min_8bit_size the states are fp32 and the run is bit-identical to the 32-bit class;
    above it they are uint8 codes with one fp32 absmax per block."""
    fp32_cls = fusedopt.Adam if cls is fusedopt.Adam8bit else fusedopt.AdamW
    ours, plain = _params(dtype), _params(dtype)
    opt = cls(_groups(ours, GROUP1), backend="reference", lr=1e-2, min_8bit_size=300, block_size=64)
    popt = fp32_cls(_groups(plain, GROUP1), backend="reference", lr=1e-2)
    for step in range(STEPS):
        grads = _grads(step, ours)
        _set_grads(ours, grads)
        _set_grads(plain, grads)
        opt.step()
        popt.step()
    for gi, (og, pg) in enumerate(zip(ours, plain)):
        for pi, (p, q) in enumerate(zip(og, pg)):
            if p not in opt.state:
                continue
            st = opt.state[p]
            if p.numel() < 300:
                assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
                for name in ("exp_avg", "exp_avg_sq"):
                    assert_identical(st[name], popt.state[q][name], f"group {gi} param {pi} {name}")
                assert_identical(p, q, f"group {gi} param {pi}")
            else:
                assert set(st) == {"step", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"}
                for name in ("exp_avg", "exp_avg_sq"):
                    assert st[name].dtype == torch.uint8 and st[name].shape == p.shape
                    absmax = st[name + "_absmax"]
                    assert absmax.dtype == torch.float32 and absmax.shape == (quant.num_blocks(p.numel(), 64),)
            assert_identical(st["step"], popt.state[q]["step"], f"group {gi} param {pi} step")


def test_adam8bit_state_conversion_on_load():
    """An fp32 AdamW state dict loads into AdamW8bit as the quantized states, and an 8-bit one
    into AdamW as the dequantized states; both continue stepping."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    gen = torch.Generator().manual_seed(3)
    shapes = [(4096 + 5,), (64, 70), (10,)]
    p32 = [torch.randn(s, generator=gen) for s in shapes]
    opt32 = fusedopt.AdamW(p32, backend="reference", **kw)
    for step in range(3):
        for p in p32:
            p.grad = torch.randn(p.shape, generator=gen)
        opt32.step()

    p8 = [p.clone() for p in p32]
    opt8 = fusedopt.AdamW8bit(p8, backend="reference", block_size=128, **kw)
    opt8.load_state_dict(opt32.state_dict())
    for i, (p, q) in enumerate(zip(p8, p32)):
        st, st32 = opt8.state[p], opt32.state[q]
        assert_identical(st["step"], st32["step"], f"param {i} step")
        for name in names:
            if p.numel() < 4096:
                assert_identical(st[name], st32[name], f"param {i} {name}")
                continue
            codes, absmax = quant.quantize_blockwise(st32[name], quant.signed_state(name), 128)
            assert_identical(st[name], codes, f"param {i} {name} codes")
            assert_identical(st[name + "_absmax"], absmax, f"param {i} {name}_absmax")

    back = [p.clone() for p in p8]
    opt_back = fusedopt.AdamW(back, backend="reference", **kw)
    opt_back.load_state_dict(opt8.state_dict())
    for i, (p, q) in enumerate(zip(back, p8)):
        st, st8 = opt_back.state[p], opt8.state[q]
        for name in names:
            expected = st8[name]
            if st8[name].dtype == torch.uint8:
                expected = quant.dequantize_blockwise(st8[name], st8[name + "_absmax"], quant.signed_state(name), 128)
            assert_identical(st[name], expected, f"param {i} {name}")
        assert set(st) == {"step", *names}

    for opt, params in ((opt8, p8), (opt_back, back)):
        for step in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        for p in params:
            assert torch.isfinite(p).all() and float(opt.state[p]["step"]) == 3 + STEPS


def test_load_rejects_inconsistent_8bit_state():
    """Codes whose absmax does not fit the block size, or come without absmax, raise
    ValueError naming the state, and nothing is loaded."""
    p = torch.randn(5000)
    opt = fusedopt.AdamW8bit([p], backend="reference", block_size=256)
    p.grad = torch.randn(5000)
    opt.step()
    other = fusedopt.AdamW8bit([p.clone()], backend="reference", block_size=256, lr=5e-3)

    sd = _checkpoint(opt.state_dict())
    sd["param_groups"][0]["block_size"] = 512  # the absmax saved has 20 blocks, 512 gives 10
    with pytest.raises(ValueError, match="exp_avg_absmax.*20 blocks.*block_size=512"):
        other.load_state_dict(sd)
    sd = _checkpoint(opt.state_dict())
    del sd["state"][0]["exp_avg_sq_absmax"]
    with pytest.raises(ValueError, match="exp_avg_sq.*without.*exp_avg_sq_absmax"):
        other.load_state_dict(sd)
    assert not other.state
    assert other.param_groups[0]["lr"] == 5e-3 and other.param_groups[0]["block_size"] == 256


def test_state_dict_is_copied_on_load():
    """Stepping after load_state_dict never writes into the loaded dict."""
    p = torch.randn(100)
    opt = fusedopt.AdamW([p], backend="reference")
    p.grad = torch.randn(100)
    opt.step()
    sd = _checkpoint(opt.state_dict())
    saved = {k: v.clone() for k, v in sd["state"][0].items()}
    opt2 = fusedopt.AdamW([p.clone()], backend="reference")
    opt2.load_state_dict(sd)
    for _ in range(STEPS):
        opt2.param_groups[0]["params"][0].grad = torch.randn(100)
        opt2.step()
    for k, v in saved.items():
        assert_identical(sd["state"][0][k], v, f"loaded dict's {k}")
