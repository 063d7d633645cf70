"""LAMB / LAMB8bit on the reference backend against a direct transcription of the paper's
algorithm (LAMB8bit: against LAMB on its dequantized states, and bitsandbytes' CPU LAMB8bit where
it runs LAMB).

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh: "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, Algorithm 2 (LAMB),
with the scaling function phi the identity. The transcription below is written from the paper,
not from fusedopt/reference.py, and runs in float64.
"""

from __future__ import annotations

import functools
import math

import bitsandbytes as bnb
import pytest
import torch

import fusedopt
from cases import (
    EXTRAS,
    STEPS,
    assert_no_worse_than_bnb,
    check_8bit_lockstep,
    check_bad_input,
    check_extra,
    compare,
    make_grads,
    make_params,
    param_groups,
    run_against_bnb,
    set_grads,
    step_count,
)
from fusedopt.testing import assert_close

GROUP1 = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)


class PaperLAMB:
    """Algorithm 2 of You et al. (2020), per layer (= per parameter tensor ``x^(i)``)::

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_t <- m_t / (1 - beta1^t),  v_t <- v_t / (1 - beta2^t)   (the bias-corrected moments
                                                                  feed the update; the running
                                                                  m, v carry over)
        r_t = m_t / (sqrt(v_t) + eps)
        x_{t+1} = x_t - eta_t phi(||x_t||) / ||r_t + lambda x_t|| (r_t + lambda x_t)

    with phi(z) = z and the ratio taken as 1 when ``||x_t||`` or ``||r_t + lambda x_t||`` is 0
    (the paper leaves that case open; DESIGN.md fixes it). ``t`` counts the steps this tensor
    had a gradient. The state is named as torch names it so the test can compare it.
    """

    def __init__(self, groups, lr, betas, eps, weight_decay, bias_correction):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.param_groups = [{**defaults, **g} for g in groups]
        self.bias_correction = bias_correction
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            eta, (beta1, beta2) = group["lr"], group["betas"]
            eps, lam = group["eps"], group["weight_decay"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = x.grad.double()
                state = self.state.setdefault(x, {"step": 0, "exp_avg": torch.zeros_like(g), "exp_avg_sq": torch.zeros_like(g)})
                state["step"] += 1
                t = state["step"]
                m = beta1 * state["exp_avg"] + (1 - beta1) * g
                v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
                state["exp_avg"], state["exp_avg_sq"] = m, v
                if self.bias_correction:
                    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                r = m_hat / (v_hat.sqrt() + eps)
                u = r + lam * x.double()
                x_norm = math.sqrt(float((x.double() ** 2).sum()))
                u_norm = math.sqrt(float((u**2).sum()))
                ratio = x_norm / u_norm if x_norm > 0 and u_norm > 0 else 1.0
                x.copy_(x.double() - eta * ratio * u)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bias-correction", "no-bias-correction"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["wd0", "wd"])
def test_lamb_matches_paper(dtype, bias_correction, weight_decay):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
    ours = make_params(dtype)
    # A zero tensor: ||x|| = 0, so its trust ratio is 1 (and with weight decay it stays zero
    # only until its first update).
    ours[1].append(torch.zeros(40, dtype=dtype))
    theirs = [[p.double() for p in group] for group in ours]
    opt = fusedopt.LAMB(param_groups(ours, GROUP1), backend="reference", bias_correction=bias_correction, **kw)
    paper = PaperLAMB(param_groups(theirs, GROUP1), bias_correction=bias_correction, **kw)
    for step in range(STEPS):
        grads = make_grads(step, ours)
        set_grads(ours, grads)
        set_grads(theirs, grads, convert=lambda g: g.double())
        opt.step()
        paper.step()
        # The transcription runs in float64: the float32 run is compared in float32's tolerance.
        compare(step, ours, opt, theirs, paper, dtype, dtype, ("exp_avg", "exp_avg_sq"))
    assert step_count(opt, ours[0][2]) == STEPS - 2
    assert step_count(opt, ours[1][0]) == STEPS - 1
    assert ours[0][4] not in opt.state


def test_lamb_zero_param_trust_ratio_is_one():
    """The first step of a zero tensor moves it by exactly lr times the Adam direction."""
    p = torch.zeros(64, dtype=torch.float64)
    g = torch.randn(64, dtype=torch.float64)
    opt = fusedopt.LAMB([p], lr=0.5, weight_decay=0.1, backend="reference")
    p.grad = g.clone()
    opt.step()
    # Step 1 with bias correction: m_hat = g, v_hat = g^2, u = g / (|g| + eps) + 0.1 * 0.
    expected = -0.5 * g / (g.abs() + 1e-6)
    assert_close(p, expected, torch.float64, "zero param after one step")


@pytest.mark.parametrize("beta2", [0.999, 0.9999, 0.99999])
@pytest.mark.parametrize("tensor_betas", [False, True], ids=["", "tensor-betas"])
def test_bias_corrections_match_float64(beta2, tensor_betas):
    """fp32 LAMB steps from random states at steps 1..10 and 10**6 against one float64 step of
    the transcription (``1 - beta ** t`` in double). ``1 - beta2 ** t`` in fp32 put ``v_hat`` off
    by up to 1.4e-4 (beta2 = 0.99999), which weight decay turns into a change of direction."""
    betas = (torch.tensor(0.9), torch.tensor(beta2)) if tensor_betas else (0.9, beta2)
    kw = dict(lr=1.0, betas=betas, eps=1e-6, weight_decay=0.1)
    for t in tuple(range(1, 11)) + (10**6,):
        gen = torch.Generator().manual_seed(t)
        p0, g, m = (torch.randn(257, generator=gen) for _ in range(3))
        v = torch.rand(257, generator=gen) + 0.1
        ours, theirs = p0.clone(), p0.double()
        opt = fusedopt.LAMB([ours], backend="reference", **kw)
        opt.state[ours] = dict(step=torch.tensor(float(t - 1)), exp_avg=0.1 * m, exp_avg_sq=v.clone())
        paper = PaperLAMB([{"params": [theirs]}], bias_correction=True, **dict(kw, betas=tuple(map(float, betas))))
        paper.state[theirs] = dict(step=t - 1, exp_avg=0.1 * m.double(), exp_avg_sq=v.double())
        ours.grad, theirs.grad = g.clone(), g.double()
        opt.step()
        paper.step()
        assert_close(ours, theirs, torch.float32, f"t={t} param")


# ---------------------------------------------------------------------------------------------
# LAMB8bit
# ---------------------------------------------------------------------------------------------

NAMES = ("exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(weight_decay=0.0, bias_correction=False)],
                         ids=["wd", "no-bias-correction"])
def test_lamb8bit_steps_as_lamb_on_dequantized_states(kw):
    """The trust ratio's norms and the applied update come from this step's fp32 moments, not
    the requantized ones: the param is bit for bit the 32-bit step's, the codes those of
    quant.quantize_blockwise of its moments (signed map for exp_avg, unsigned for exp_avg_sq)."""
    check_8bit_lockstep(fusedopt.LAMB8bit, fusedopt.LAMB, kw, [NAMES, NAMES])


def test_lamb8bit_bf16_params():
    check_8bit_lockstep(fusedopt.LAMB8bit, fusedopt.LAMB, dict(weight_decay=0.1), [NAMES, NAMES], dtype=torch.bfloat16)


def _bnb_lamb8bit_is_adamw8bit_on_cpu() -> bool:
    """Whether bitsandbytes' LAMB8bit steps CPU tensors as its AdamW8bit (0.50.2 does: its CPU
    8-bit step takes the "lamb" name into the Adam branch, with no trust ratio)."""
    runs = []
    for cls in (bnb.optim.LAMB8bit, bnb.optim.AdamW8bit):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(4096, generator=gen)
        opt = cls([p], lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            p.grad = torch.randn(4096, generator=gen)
            opt.step()
        runs.append(p)
    return torch.equal(*runs)


def test_lamb8bit_no_worse_than_bitsandbytes():
    if _bnb_lamb8bit_is_adamw8bit_on_cpu():
        pytest.skip(f"bitsandbytes {bnb.__version__}'s LAMB8bit runs AdamW8bit's update on CPU tensors (no trust "
                    "ratio), so it is no baseline for LAMB8bit here")
    ours, theirs, ref = run_against_bnb(fusedopt.LAMB8bit, bnb.optim.LAMB8bit,
                                        functools.partial(fusedopt.LAMB, backend="reference"), NAMES,
                                        lr=1e-3, weight_decay=0.01)
    assert_no_worse_than_bnb(ours, theirs, ref)


BAD = [
    (dict(lr=-1e-3), ValueError, "Invalid learning rate: -0.001"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    (dict(eps=-1e-6), ValueError, "Invalid epsilon value: -1e-06"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (dict(bias_correction="yes"), TypeError, "Invalid bias_correction: 'yes'"),
    (dict(block_size=48), ValueError, "Invalid block_size: 48"),
    (dict(min_8bit_size=-1), ValueError, "Invalid min_8bit_size: -1"),
]


@pytest.mark.parametrize("overrides,exc,msg", BAD, ids=[str(b[0]) for b in BAD])
def test_lamb8bit_bad_input_changes_nothing(overrides, exc, msg):
    check_bad_input(fusedopt.LAMB8bit, dict(backend="reference", min_8bit_size=64, block_size=64), overrides, exc, msg)


@pytest.mark.parametrize("extra", EXTRAS)
def test_lamb8bit_extras(extra):
    check_extra(extra, fusedopt.LAMB8bit, dict(lr=1e-2, weight_decay=0.01, min_8bit_size=256, block_size=64))
