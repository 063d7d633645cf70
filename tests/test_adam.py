"""Adam / AdamW / Adam8bit / AdamW8bit on the reference backend against torch.optim (for-loop
implementation) and bitsandbytes' CPU 8-bit optimizers.

Every test runs at least 8 steps on random data over two param groups with different
hyper-parameters, and compares every param, every state tensor and every step count.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch

import fusedopt
from cases import (
    STEPS,
    assert_no_worse_than_bnb,
    assert_unchanged,
    checkpoint,
    compare,
    make_grads,
    make_params,
    param_groups,
    run_against_bnb,
    set_grads,
    snapshot,
    step_count,
)
from fusedopt import quant
from fusedopt.testing import assert_close, assert_identical

# Group 1 differs from the defaults in every hyper-parameter.
GROUP1 = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)

VARIANTS = {
    # name: (fusedopt class, torch class, extra kwargs for both)
    "adam": (fusedopt.Adam, torch.optim.Adam, {}),
    "adamw": (fusedopt.AdamW, torch.optim.AdamW, {}),
    "adam-decoupled": (fusedopt.Adam, torch.optim.Adam, {"decoupled_weight_decay": True}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
def test_adam_matches_torch(dtype, variant, amsgrad, maximize, weight_decay):
    cls, tcls, extra = VARIANTS[variant]
    kw = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, **extra)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = cls(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = tcls(param_groups(theirs, GROUP1), foreach=False, **kw)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for step in range(STEPS):
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, dtype, names)
    # The grad=None steps and the frozen param: step counts lag or never start.
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["adam", "adamw"])
@pytest.mark.parametrize("flags", [{}, {"amsgrad": True, "maximize": True}], ids=["", "amsgrad-maximize"])
def test_adam_16bit_params_fp32_states(dtype, variant, flags):
    """16-bit params with fp32 states against torch on float64 copies. Each step starts torch
    from our params and states (so the comparison is of one rounding, see fusedopt/testing.py):
    params within the 16-bit tolerance, states within fp32's."""
    cls, tcls, extra = VARIANTS[variant]
    kw = dict(lr=1e-2, weight_decay=0.1, **flags, **extra)
    ours = make_params(dtype)
    theirs = [[p.double() for p in group] for group in ours]
    opt = cls(param_groups(ours, GROUP1), backend="reference", **kw)
    topt = tcls(param_groups(theirs, GROUP1), foreach=False, **kw)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if flags else ())
    for step in range(STEPS):
        with torch.no_grad():
            for og, tg in zip(ours, theirs):
                for p, q in zip(og, tg):
                    q.copy_(p)
                    for name, value in opt.state[p].items():
                        topt.state[q][name].copy_(value)
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads, convert=lambda g: g.double())
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, torch.float32, names)


def test_torch_state_dict_loads_both_ways():
    """torch.optim.AdamW's state dict loads into fusedopt.AdamW and ours into torch; both
    continue as the uninterrupted torch run."""
    dtype = torch.float64
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    base = make_params(dtype)
    torch_run = torch.optim.AdamW(param_groups(base, GROUP1), foreach=False, **kw)
    for step in range(3):
        set_grads(base, make_grads(step, base))
        torch_run.step()

    # torch -> fusedopt
    ours = [[p.clone() for p in group] for group in base]
    opt = fusedopt.AdamW(param_groups(ours, GROUP1), backend="reference", **kw)
    opt.load_state_dict(checkpoint(torch_run.state_dict()))
    for step in range(3, 6):
        grads = make_grads(step, base)
        set_grads(base, grads)
        set_grads(ours, grads)
        torch_run.step()
        opt.step()
        compare(step, ours, opt, base, torch_run, dtype, dtype, names)

    # fusedopt -> torch
    theirs = [[p.clone() for p in group] for group in ours]
    topt = torch.optim.AdamW(param_groups(theirs, GROUP1), foreach=False, **kw)
    topt.load_state_dict(checkpoint(opt.state_dict()))
    for step in range(6, 9):
        grads = make_grads(step, base)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, dtype, dtype, names)


def test_tensor_lr_changed_in_place():
    """lr given as a 1-element tensor and changed in place between steps (as a scheduler on a
    captured graph does) is followed exactly as torch follows it."""
    ours, theirs = make_params(torch.float64), make_params(torch.float64)
    lr_ours, lr_theirs = torch.tensor(1e-2, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)
    opt = fusedopt.AdamW(param_groups(ours, {}), lr=lr_ours, backend="reference")
    topt = torch.optim.AdamW(param_groups(theirs, {}), lr=lr_theirs, foreach=False)
    for step in range(STEPS):
        lr_ours.fill_(1e-2 * 0.7**step)
        lr_theirs.fill_(1e-2 * 0.7**step)
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        topt.step()
        compare(step, ours, opt, theirs, topt, torch.float64, torch.float64, ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_grad(bad):
    """With max_grad_norm, a non-finite grad makes the norm non-finite and the step changes
    nothing; without it, the non-finite values flow into params and states as in torch."""
    ours, theirs, clipped = make_params(torch.float32), make_params(torch.float32), make_params(torch.float32)
    opt = fusedopt.AdamW(param_groups(ours, GROUP1), backend="reference")
    topt = torch.optim.AdamW(param_groups(theirs, GROUP1), foreach=False)
    copt = fusedopt.AdamW(param_groups(clipped, GROUP1), backend="reference", max_grad_norm=1.0)
    for step in range(3):
        grads = make_grads(step, ours)
        for params in (ours, theirs, clipped):
            set_grads(params, grads)
            if step == 2:
                params[1][1].grad[5] = bad
        before = snapshot(copt, clipped)
        opt.step()
        topt.step()
        copt.step()
        compare(step, ours, opt, theirs, topt, torch.float32, torch.float32, ("exp_avg", "exp_avg_sq"))
        assert bool(torch.isfinite(copt.last_grad_norm)) == (step < 2)
    assert not bool(torch.isfinite(ours[1][1]).all())
    assert_unchanged(copt, clipped, before, f"clipped step with {bad}")


def scaler_scale(scaler) -> float:
    """The scaler's current scale (making it, as ``scaler.scale(loss)`` does on first use)."""
    scaler.scale(torch.ones(()))
    return scaler.get_scale()


@pytest.mark.parametrize("scaler", [False, True], ids=["", "gradscaler"])
def test_max_grad_norm_matches_clip_then_step(scaler):
    """max_grad_norm against clip_grad_norm_ + torch AdamW (with GradScaler: unscale_, clip,
    step); last_grad_norm is the unscaled norm torch returns, kept as a 0-d device tensor."""
    dtype = torch.float32
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = fusedopt.AdamW(param_groups(ours, GROUP1), backend="reference", max_grad_norm=1.0, **kw)
    topt = torch.optim.AdamW(param_groups(theirs, GROUP1), foreach=False, **kw)
    flat_theirs = [p for group in theirs for p in group]
    sc_ours = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    sc_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    clipped = 0
    for step in range(STEPS):
        # Alternate between grads that clip and grads that do not.
        grads = make_grads(step, ours)
        multiplier = 10.0 if step % 2 else 1e-3
        if scaler:
            multiplier *= scaler_scale(sc_ours)
            assert scaler_scale(sc_theirs) == scaler_scale(sc_ours)
        set_grads(ours, grads, convert=lambda g: g * multiplier)
        set_grads(theirs, grads, convert=lambda g: g * multiplier)
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
        compare(step, ours, opt, theirs, topt, dtype, dtype, ("exp_avg", "exp_avg_sq"))
    assert 0 < clipped < STEPS


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.AdamW8bit], ids=lambda c: c.__name__)
def test_gradscaler_inf_skips_step(cls):
    """GradScaler("cpu"): scaled steps match torch's GradScaler + AdamW; a step with an inf in
    one grad changes nothing (params, states, step counts), exactly as torch skips it."""
    dtype = torch.float32
    kw = dict(lr=1e-2, weight_decay=0.1)
    extra = {"min_8bit_size": 256} if cls is fusedopt.AdamW8bit else {}
    ours, theirs = make_params(dtype), make_params(dtype)
    opt = cls(param_groups(ours, GROUP1), backend="reference", **kw, **extra)
    topt = torch.optim.AdamW(param_groups(theirs, GROUP1), foreach=False, **kw)
    sc_ours = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sc_theirs = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    inf_steps = {3, 4}
    for step in range(STEPS):
        grads = make_grads(step, ours)
        for params, sc in ((ours, sc_ours), (theirs, sc_theirs)):
            # What backward of the scaled loss leaves in .grad: the grads times the scale.
            scale = scaler_scale(sc)
            set_grads(params, grads, convert=lambda g: g * scale)
            if step in inf_steps:
                params[1][1].grad[17] = float("inf")
        before = snapshot(opt, ours)
        sc_ours.step(opt)
        sc_theirs.step(topt)
        sc_ours.update()
        sc_theirs.update()
        assert sc_ours.get_scale() == sc_theirs.get_scale()
        if step in inf_steps:
            assert_unchanged(opt, ours, before, f"step {step} with inf")
        if cls is fusedopt.AdamW:
            compare(step, ours, opt, theirs, topt, dtype, dtype, ("exp_avg", "exp_avg_sq"))
        else:
            for gi, (og, tg) in enumerate(zip(ours, theirs)):
                for pi, (p, q) in enumerate(zip(og, tg)):
                    if p in opt.state:
                        assert float(opt.state[p]["step"]) == float(topt.state[q]["step"])
    assert step_count(opt, ours[1][1]) == STEPS - len(inf_steps) - 1


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
            x.grad = g * scaler_scale(sc)
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
    ours, theirs, ref = run_against_bnb(
        ours_cls, getattr(bnb.optim, bnb_name), ref_cls, ("exp_avg", "exp_avg_sq"), **kw
    )
    assert_no_worse_than_bnb(ours, theirs, ref)


@pytest.mark.parametrize("cls", [fusedopt.Adam8bit, fusedopt.AdamW8bit], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam8bit_small_tensors_keep_fp32_states(cls, dtype):
    """Below min_8bit_size the states are fp32 and the run is bit-identical to the 32-bit class;
    above it they are uint8 codes with one fp32 absmax per block."""
    fp32_cls = fusedopt.Adam if cls is fusedopt.Adam8bit else fusedopt.AdamW
    ours, plain = make_params(dtype), make_params(dtype)
    opt = cls(param_groups(ours, GROUP1), backend="reference", lr=1e-2, min_8bit_size=300, block_size=64)
    popt = fp32_cls(param_groups(plain, GROUP1), backend="reference", lr=1e-2)
    for step in range(STEPS):
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(plain, grads)
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

    sd = checkpoint(opt.state_dict())
    sd["param_groups"][0]["block_size"] = 512  # the absmax saved has 20 blocks, 512 gives 10
    with pytest.raises(ValueError, match="exp_avg_absmax.*20 blocks.*block_size=512"):
        other.load_state_dict(sd)
    sd = checkpoint(opt.state_dict())
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
    sd = checkpoint(opt.state_dict())
    saved = {k: v.clone() for k, v in sd["state"][0].items()}
    opt2 = fusedopt.AdamW([p.clone()], backend="reference")
    opt2.load_state_dict(sd)
    for _ in range(STEPS):
        opt2.param_groups[0]["params"][0].grad = torch.randn(100)
        opt2.step()
    for k, v in saved.items():
        assert_identical(sd["state"][0][k], v, f"loaded dict's {k}")


# ---------------------------------------------------------------------------------------------
# Bias corrections: 1 - beta^t without cancellation
# ---------------------------------------------------------------------------------------------

BIAS_BETA2 = (0.999, 0.9999, 0.99999)
BIAS_STEPS = tuple(range(1, 11)) + (10**6,)


def bias_case(t: int, n: int = 257):
    """Random fp32 ``(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq)`` to step from at step ``t - 1``;
    ``max_exp_avg_sq`` above ``exp_avg_sq`` in some entries, below in others."""
    gen = torch.Generator().manual_seed(t)
    p, g, m = (torch.randn(n, generator=gen) for _ in range(3))
    v = torch.rand(n, generator=gen) + 0.1
    v_max = v * (0.5 + torch.rand(n, generator=gen))
    return p, g, 0.1 * m, v, v_max


def adam_float64(p, g, m, v, v_max, *, t, lr, betas, eps, weight_decay, amsgrad, decoupled):
    """One Adam/AdamW step in float64 from fp32 inputs, transcribed from DESIGN.md with
    ``beta ** t`` in Python's double arithmetic."""
    beta1, beta2 = (float(b) for b in betas)
    p, g, m, v, v_max = (x.double() for x in (p, g, m, v, v_max))
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    v_hat = torch.maximum(v_max, v) if amsgrad else v
    return p - lr / (1 - beta1**t) * m / (v_hat.sqrt() / math.sqrt(1 - beta2**t) + eps)


@pytest.mark.parametrize("beta2", BIAS_BETA2)
@pytest.mark.parametrize("variant", ["adam", "adamw-amsgrad", "adamw-tensor-betas"])
def test_bias_corrections_match_float64(variant, beta2):
    """fp32 steps from random states at steps 1..10 and 10**6: the param agrees with float64
    math and with torch's for-loop (float betas: with tensor betas torch takes ``beta ** t`` in
    fp32 and misses float64 by up to 2e-5 here) in the fp32 tolerance. (``1 - beta2 ** t`` taken in fp32 from
    an fp32-rounded beta2 put the first updates off by 6.6e-6 (beta2 = 0.999) to 6.8e-4
    (0.99999), relative; torch stays within 2.4e-7.) ``lr`` is large so that the update, not the
    param, sets the tolerance."""
    cls = fusedopt.Adam if variant == "adam" else fusedopt.AdamW
    tcls = torch.optim.Adam if variant == "adam" else torch.optim.AdamW
    betas = (0.9, beta2)
    if variant.endswith("tensor-betas"):
        betas = (torch.tensor(0.9), torch.tensor(beta2))
    kw = dict(lr=10.0, betas=betas, eps=1e-8, weight_decay=0.01, amsgrad=variant.endswith("amsgrad"))
    for t in BIAS_STEPS:
        p0, g, m, v, v_max = bias_case(t)
        state = dict(step=torch.tensor(float(t - 1)), exp_avg=m, exp_avg_sq=v)
        if kw["amsgrad"]:
            state["max_exp_avg_sq"] = v_max
        expected = adam_float64(p0, g, m, v, v_max, t=t, decoupled=cls is fusedopt.AdamW, **kw)
        runs = {}
        makers = [("fusedopt", lambda q: cls([q], backend="reference", **kw))]
        if not variant.endswith("tensor-betas"):  # torch takes a tensor beta's power in fp32
            makers.append(("torch", lambda q: tcls([q], foreach=False, **kw)))
        for name, make in makers:
            q = p0.clone()
            opt = make(q)
            opt.state[q] = {k: x.clone() for k, x in state.items()}
            q.grad = g.clone()
            opt.step()
            runs[name] = q
            assert_close(q, expected, torch.float32, f"{name} t={t} param against float64")
        if "torch" in runs:
            assert_close(runs["fusedopt"], runs["torch"], torch.float32, f"t={t} param against torch")
