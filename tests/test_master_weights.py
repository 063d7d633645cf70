"""``master_weights=True``: 16-bit params stepped through fp32 master copies.

The update of a param with a master copy is, by definition, the update of an fp32 param (the
master) by the param's 16-bit gradient; the param is then the master rounded to nearest. The
reference backend is checked against exactly that here (bit for bit), and every other backend
against the reference in ``tests/test_backends.py`` (its ``master_weights`` cases).
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt.testing import assert_identical

import cases
from cases import checkpoint

CLASSES = [cls.__name__ for cls in cases.CLASSES]
SIZES = (1, 255, 4097, 5000)
STEPS = 7


def _kwargs(name: str) -> dict:
    cls = getattr(fusedopt, name)
    return cases.kwargs_of(cls, backend="reference", lr=1e-3 if "Lion" not in name else 1e-4, weight_decay=0.1,
                           **({"min_8bit_size": 256} if cls._quantized else {}))


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in SIZES]


def _grads(step, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed * 100 + step)
    return [(torch.randn(n, generator=gen) * 2).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", CLASSES)
def test_master_is_an_fp32_param(name, dtype):
    """Each master equals an fp32 param stepped by the same optimizer on the same 16-bit grads,
    and each 16-bit param is its master rounded to nearest, after every step."""
    cls = getattr(fusedopt, name)
    params = _params(dtype)
    masters = [p.float() for p in params]
    for m in masters:
        m.grad_dtype = None  # an fp32 param that takes the 16-bit grads as they are
    ours = cls(params, master_weights=True, max_grad_norm=5.0, **_kwargs(name))
    theirs = cls(masters, max_grad_norm=5.0, **_kwargs(name))
    for step in range(STEPS):
        grads = _grads(step, dtype)
        for i, (p, m, g) in enumerate(zip(params, masters, grads)):
            skip = step == 2 and i == 1  # a param without a grad keeps its master and step
            p.grad = None if skip else g
            m.grad = None if skip else g.clone()
        ours.step()
        theirs.step()
        for i, (p, m) in enumerate(zip(params, masters)):
            state = ours.state[p]
            where = f"{name} step {step} param {i}"
            assert state["master_param"].dtype == torch.float32 and state["master_param"].shape == p.shape
            assert_identical(state["master_param"], m, f"{where} master")
            assert_identical(p, m.to(dtype), f"{where} param")
            for key, value in theirs.state[m].items():
                assert_identical(state[key], value, f"{where} {key}")
        assert_identical(ours.last_grad_norm, theirs.last_grad_norm, f"{name} step {step} norm")


def test_small_updates_accumulate():
    """Lion moves each element by exactly lr a step: at lr far below half a bf16 ulp of 1.0,
    round-to-nearest never moves a plain bf16 param, while one with a master copy moves as far
    as an fp32 param does."""
    lr, steps = 1e-3, 20  # a bf16 ulp at 1.0 is 2**-7 = 0.0078
    plain = torch.ones(300, dtype=torch.bfloat16)
    mastered = torch.ones(300, dtype=torch.bfloat16)
    reference = torch.ones(300, dtype=torch.float32)
    opts = [fusedopt.Lion([t], lr=lr, backend="reference") for t in (plain, reference)]
    opts.append(fusedopt.Lion([mastered], lr=lr, backend="reference", master_weights=True))
    for _ in range(steps):
        for t in (plain, mastered, reference):
            t.grad = torch.ones_like(t)
        for opt in opts:
            opt.step()
    assert torch.equal(plain, torch.ones_like(plain)), "a plain bf16 param moved by less than half an ulp"
    assert_identical(opts[2].state[mastered]["master_param"], reference, "master")
    assert torch.equal(mastered, reference.to(torch.bfloat16))
    assert float(mastered[0]) < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_full_precision_params_have_no_master(dtype):
    p, q = torch.randn(100, dtype=dtype), None
    q = p.clone()
    a = fusedopt.AdamW([p], master_weights=True, backend="reference")
    b = fusedopt.AdamW([q], backend="reference")
    for _ in range(3):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        a.step()
        b.step()
    assert "master_param" not in a.state[p]
    assert_identical(p, q, "param")


def test_skipped_step_changes_nothing():
    """GradScaler's ``found_inf`` leaves params, masters, states and steps as they were."""
    p = torch.randn(5000, dtype=torch.bfloat16)
    opt = fusedopt.AdamW8bit([p], master_weights=True, backend="reference", min_8bit_size=256)
    p.grad = torch.randn_like(p)
    opt.step()
    before = p.clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert_identical(p, before[0], "param")
    for k, v in before[1].items():
        assert_identical(opt.state[p][k], v, k)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_flag_is_checked(value):
    p = torch.randn(3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="master_weights"):
        fusedopt.AdamW([p], master_weights=value)
    opt = fusedopt.Lion([p])
    with pytest.raises(TypeError, match="master_weights"):
        opt.add_param_group({"params": [torch.randn(2, dtype=torch.bfloat16)], "master_weights": value})
    assert len(opt.param_groups) == 1


def test_not_with_stochastic_rounding():
    p = torch.randn(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="master_weights=True and stochastic_rounding=True"):
        fusedopt.LAMB([p], master_weights=True, stochastic_rounding=True)
    opt = fusedopt.LAMB([p], master_weights=True)
    with pytest.raises(ValueError, match="alternatives"):
        opt.add_param_group({"params": [torch.randn(2, dtype=torch.bfloat16)], "stochastic_rounding": True})


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step, torch.bfloat16)):
            p.grad = g
        opt.step()


def test_state_dict_round_trip():
    """A saved master copy loads as a copy and the run goes on exactly as without the break."""
    params = _params(torch.bfloat16)
    opt = fusedopt.AdamW(params, master_weights=True, backend="reference")
    _run(opt, params, 3)
    saved = checkpoint(opt.state_dict())
    resumed = [p.clone() for p in params]
    opt2 = fusedopt.AdamW(resumed, master_weights=True, backend="reference")
    opt2.load_state_dict(saved)
    _run(opt, params, 3, start=3)
    _run(opt2, resumed, 3, start=3)
    for i, (p, q) in enumerate(zip(params, resumed)):
        assert_identical(q, p, f"param {i}")
        assert_identical(opt2.state[q]["master_param"], opt.state[p]["master_param"], f"master {i}")
    # the loaded tensors are copies: stepping never wrote into the loaded dict
    assert not any(
        torch.equal(saved["state"][i]["master_param"], opt2.state[q]["master_param"]) for i, q in enumerate(resumed)
    )


def test_load_without_master_and_into_fp32_params():
    """A torch.optim state (no master) loads into a master optimizer, which makes its masters
    from the params at the next step. The groups' settings load as torch.optim's do (the saved
    ``master_weights`` wins); fp32 params take no master copy and drop a saved one."""
    params = _params(torch.bfloat16)
    torch_opt = torch.optim.AdamW(params, lr=1e-3)
    for p, g in zip(params, _grads(0, torch.bfloat16)):
        p.grad = g
    torch_opt.step()
    ours = fusedopt.AdamW(params, lr=1e-3, master_weights=True, backend="reference")
    ours.load_state_dict(checkpoint(torch_opt.state_dict()))
    assert all("master_param" not in ours.state[p] for p in params)
    assert ours.param_groups[0]["master_weights"] is True
    _run(ours, params, 1, start=1)
    assert all(ours.state[p]["master_param"].dtype == torch.float32 for p in params)
    assert_identical(ours.state[params[0]]["master_param"].to(torch.bfloat16), params[0], "master")
    full = [p.float() for p in params]
    fp32 = fusedopt.AdamW(full, lr=1e-3, backend="reference")
    fp32.load_state_dict(checkpoint(ours.state_dict()))
    assert fp32.param_groups[0]["master_weights"] is True
    assert all(set(fp32.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in full)


def test_master_state_of_wrong_size_is_refused():
    params = _params(torch.bfloat16)
    opt = fusedopt.AdamW(params, master_weights=True, backend="reference")
    _run(opt, params, 1)
    saved = checkpoint(opt.state_dict())
    saved["state"][2]["master_param"] = torch.zeros(7)
    fresh = fusedopt.AdamW([p.clone() for p in params], master_weights=True, backend="reference")
    with pytest.raises(ValueError, match="master_param"):
        fresh.load_state_dict(saved)
    assert not fresh.state
