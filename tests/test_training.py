"""A mixed-precision training loop as users write it: bf16 autocast for the forward pass,
``torch.amp.GradScaler``, ``scaler.step(opt)`` with the clip fused into the step, against
the same loop with ``torch.optim.AdamW`` and torch's ``unscale_`` + ``clip_grad_norm_``.

Both optimizers step on the same gradients (model A's backward, copied to model B), so what
is compared is the optimizer under AMP: unscaling inside the step, clipping, the skip on an
inf gradient (and the scaler's reaction to it), the step counts. On a GPU the fusedopt side
also runs with ``torch.cuda.set_sync_debug_mode("error")``: no host sync inside the step.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedopt
from fusedopt.testing import assert_close

STEPS = 6
INF_STEP = 3
MAX_NORM = 1.0


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)


def _run(device: str, backend: str) -> None:
    ours_model = _model(device)
    torch_model = copy.deepcopy(ours_model)
    ours = fusedopt.AdamW(ours_model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM,
                          backend=backend)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, weight_decay=0.1)
    sc_ours = torch.amp.GradScaler(device, init_scale=2.0**12)
    sc_theirs = torch.amp.GradScaler(device, init_scale=2.0**12)
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = torch.randn(16, 8, generator=gen).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(ours_model(x).float(), y)
        sc_ours.scale(loss).backward()
        sc_theirs.scale(loss.detach())  # (the scaler creates its scale on first use)
        if step == INF_STEP:
            next(ours_model.parameters()).grad.view(-1)[5] = float("inf")
        for p, q in zip(ours_model.parameters(), torch_model.parameters()):
            q.grad = p.grad.clone()

        sync_mode = torch.cuda.get_sync_debug_mode() if device == "cuda" else None
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            sc_ours.step(ours)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(sync_mode)
        sc_ours.update()
        ours.zero_grad()

        sc_theirs.unscale_(theirs)
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM)
        sc_theirs.step(theirs)
        sc_theirs.update()
        theirs.zero_grad()

        assert sc_ours.get_scale() == sc_theirs.get_scale(), f"step {step}: scale"
        for i, (p, q) in enumerate(zip(ours_model.parameters(), torch_model.parameters())):
            assert_close(p, q, torch.float32, f"step {step} param {i}")
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close(ours.state[p][key], theirs.state[q][key], torch.float32, f"step {step} param {i} {key}")
            assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]), f"step {step} param {i} step"
    # the inf step was skipped by both: one step fewer than the loop ran
    assert float(ours.state[next(ours_model.parameters())]["step"]) == STEPS - 1
    assert sc_ours.get_scale() < 2.0**12


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_amp_loop_cpu(backend):
    _run("cpu", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_amp_loop_cuda(backend):
    reason = fusedopt.backends.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    _run("cuda", backend)
