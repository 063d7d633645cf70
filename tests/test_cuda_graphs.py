"""A whole training step (forward, backward, ``opt.step()``) captured in a CUDA graph.

On a GPU (marked ``gpu``): torch's recipe (warm-up steps on a side stream, then capture; grads
either allocated by the captured backward after ``zero_grad(set_to_none=True)`` or kept
allocated and zeroed in place inside the graph), replayed with new data and a tensor learning
rate changed in place between replays, against eager steps on the same data and learning
rates, for the Triton and CUDA backends, with and without ``max_grad_norm``.

On the CPU: what keeps capture safe, with capture simulated (``capture.capturing``): no state
is created while capturing (it would be re-initialized at every replay), and launch tables
made while capturing are not kept for later eager steps (they are written only by a replay).
"""

from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import backends, capture
from fusedopt.testing import assert_close, assert_identical

from cases import assert_unchanged, snapshot


def _available(device: str, backend: str) -> None:
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}")


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------

WARMUP = 3
REPLAYS = 7
ZERO_LR_AT = 5  # a replay with lr = 0: the params must not move


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()


def _train_step(model, opt, x, y, zero_in_place: bool):
    if zero_in_place:
        opt.zero_grad(set_to_none=False)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _lr(k: int) -> float:
    return 0.0 if k == ZERO_LR_AT else 1e-2 * 0.7**k


@pytest.mark.gpu
@pytest.mark.parametrize("grads", ["allocated-in-graph", "kept-allocated"])
@pytest.mark.parametrize("name, kwargs", [
    ("AdamW", {}),
    ("AdamW", dict(max_grad_norm=0.5)),
    ("LAMB", dict(max_grad_norm=0.5)),
    ("Lion", dict(weight_decay=0.1)),
])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_captured_training_step_replays_as_eager_steps(backend, name, kwargs, grads):
    _available("cuda", backend)
    zero_in_place = grads == "kept-allocated"
    cls = getattr(fusedopt, name)
    gen = torch.Generator(device="cuda").manual_seed(3)
    data = [(torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 8, device="cuda", generator=gen))
            for _ in range(WARMUP + REPLAYS)]
    models = [_model(0), _model(0)]
    lrs = [torch.tensor(_lr(0), device="cuda") for _ in models]  # on the device: the graph reads it
    opts = [cls(m.parameters(), lr=lr, backend=backend, **kwargs) for m, lr in zip(models, lrs)]
    (model, eager_model), (opt, eager_opt) = models, opts
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: states, launch tables, compiled kernels
        for k in range(WARMUP):
            static_x.copy_(data[k][0])
            static_y.copy_(data[k][1])
            if not zero_in_place:
                opt.zero_grad(set_to_none=True)
            _train_step(model, opt, static_x, static_y, zero_in_place)
    torch.cuda.current_stream().wait_stream(side)
    for k in range(WARMUP):
        eager_opt.zero_grad(set_to_none=True)
        _train_step(eager_model, eager_opt, *data[k], zero_in_place=False)

    graph = torch.cuda.CUDAGraph()
    if not zero_in_place:
        opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads
    with torch.cuda.graph(graph):
        static_loss = _train_step(model, opt, static_x, static_y, zero_in_place)

    for k in range(WARMUP, WARMUP + REPLAYS):
        for lr in lrs:
            lr.fill_(_lr(k))  # in place: the captured step reads it
        static_x.copy_(data[k][0])
        static_y.copy_(data[k][1])
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        loss = _train_step(eager_model, eager_opt, *data[k], zero_in_place=False)
        torch.cuda.synchronize()
        assert_close(static_loss, loss, torch.float32, f"replay {k}: loss")
        for i, (p, q) in enumerate(zip(model.parameters(), eager_model.parameters())):
            assert_close(p, q, torch.float32, f"replay {k}: param {i}")
            if k == ZERO_LR_AT:
                assert_identical(p, before[i], f"replay {k} (lr 0): param {i}")
            for key, value in eager_opt.state[q].items():
                assert_close(opt.state[p][key], value, torch.float32, f"replay {k}: param {i} {key}")
        if "max_grad_norm" in kwargs:
            assert_close(opt.last_grad_norm, eager_opt.last_grad_norm, torch.float32, f"replay {k}: norm")
    assert float(opt.state[next(model.parameters())]["step"]) == WARMUP + REPLAYS


# ---------------------------------------------------------------------------------------------
# On the CPU, capture simulated
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit"])
def test_no_state_is_created_while_capturing(monkeypatch, name):
    params = [torch.randn(300), torch.randn(5000, dtype=torch.bfloat16)]
    opt = getattr(fusedopt, name)(params, backend="reference", master_weights=True)
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot(opt, [params])
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="param 0 of group 0 has no optimizer state yet while a CUDA graph"):
        opt.step()
    assert_unchanged(opt, [params], before, "after the error")
    monkeypatch.undo()
    opt.step()  # the warm-up step
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    opt.step()  # every state exists: fine
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


def test_tables_made_while_capturing_are_not_kept(monkeypatch):
    """A launch table built while capturing (new grads: new addresses) serves that step only;
    the next eager step builds it again (and keeps it)."""
    _available("cpu", "triton")
    init = [torch.randn(300), torch.randn(4097)]
    runs = []
    for backend in ("triton", "reference"):
        params = [p.clone() for p in init]
        runs.append((params, fusedopt.AdamW(params, backend=backend, max_grad_norm=10.0)))
    (params, opt), (ref_params, ref) = runs
    gen = torch.Generator().manual_seed(0)
    for k in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for ps in (params, ref_params):
            for p, g in zip(ps, grads):
                p.grad = g.clone()  # new tensors: new addresses, a new table
        if k == 1:
            monkeypatch.setattr(capture, "capturing", lambda device: True)
        opt.step()
        ref.step()
        kept = {id(entry[1]) for cache in opt._caches.values() for entry in cache.values()}
        if k == 0:
            first = kept
        elif k == 1:
            assert kept == first, "a table made while capturing was kept"
            monkeypatch.undo()
        else:
            assert kept and not kept & first, "the table was not rebuilt and kept after capture"
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert_close(p, q, torch.float32, f"step {k} param {i}")
