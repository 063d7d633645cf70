"""The fine-tuning example (examples/finetune.py) end to end: its --tiny run on the CPU, the
outputs it writes, and what they must show (every optimizer learns, AdamW8bit tracks AdamW,
8-bit states take about a quarter of AdamW's memory)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
OPTIMIZERS = ["adamw", "adamw8bit", "lion", "lamb"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load(SCRIPT, "examples_finetune")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--tiny` run of all four optimizers (about a minute on 2 busy cores)."""
    out = tmp_path_factory.mktemp("finetune")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"finetune.py --tiny failed:\n{proc.stdout}\n{proc.stderr}"
    (out / "stderr.txt").write_text(proc.stderr)  # progress lines
    return out, json.loads((out / "summary.json").read_text()), proc.stdout


def expected_state_bytes(shapes: list[list[int]], optimizer: str) -> int:
    """Bytes of the optimizer states of params with these shapes, from the layouts DESIGN.md
    specifies: a 0-d fp32 step per param; two fp32 moments (AdamW, LAMB) or one (Lion); with
    AdamW8bit, tensors of at least min_8bit_size elements keep two uint8 codes per element
    plus one fp32 absmax per block_size elements for each of the two moments."""
    defaults = inspect.signature(fusedopt.AdamW8bit).parameters
    min_8bit, block = defaults["min_8bit_size"].default, defaults["block_size"].default
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw8bit" and n >= min_8bit:
            moments = 2 * (n + 4 * -(-n // block))
        else:
            moments = {"adamw": 8, "adamw8bit": 8, "lamb": 8, "lion": 4}[optimizer] * n
        total += 4 + moments
    return total


def test_outputs_exist(tiny_run):
    out, summary, stdout = tiny_run
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "summary.md").read_text()
    for name in ("AdamW", "AdamW8bit", "Lion", "LAMB"):
        assert f"| {name} |" in table
    assert table in stdout  # the same table is printed at the end
    assert list(summary["runs"]) == OPTIMIZERS


def test_every_optimizer_learns(tiny_run):
    _, summary, _ = tiny_run
    for name, run in summary["runs"].items():
        curves = run["curves"]
        eval_loss, train_loss = curves["eval_loss"], curves["train_loss"]
        # Untrained, the loss is about ln(vocab); each optimizer must at least cut it by 40%.
        assert eval_loss[0] > 0.9 * math.log(summary["vocab_size"]), name
        assert eval_loss[-1] < 0.6 * eval_loss[0], (name, eval_loss)
        assert train_loss[-1] < 0.6 * train_loss[0], (name, train_loss)
        assert all(e < eval_loss[0] for e in eval_loss[1:]), (name, eval_loss)
        assert run["final_eval_loss"] == eval_loss[-1]
        assert math.isfinite(run["final_train_loss"]) and run["final_train_loss"] < 0.6 * eval_loss[0]
        assert run["mean_step_ms"] > run["mean_optimizer_step_ms"] > 0


def test_schedule_is_warmup_then_cosine(tiny_run, example):
    _, summary, _ = tiny_run
    cfg = example.TINY
    for name, run in summary["runs"].items():
        lr = run["lr"]
        steps, lrs = run["curves"]["step"], run["curves"]["lr"]
        assert summary["config"]["steps"] == cfg.steps
        for step, got in zip(steps, lrs):
            t = step - 1  # the lr used by step `step`
            if t < cfg.warmup:
                want = lr * (0.01 + 0.99 * t / cfg.warmup)
            else:
                progress = (t - cfg.warmup) / (cfg.steps - cfg.warmup)
                want = 0.1 * lr + 0.9 * lr * (1 + math.cos(math.pi * progress)) / 2
            assert got == pytest.approx(want, rel=1e-6), (name, step)


def test_adamw8bit_tracks_adamw(tiny_run):
    _, summary, _ = tiny_run
    adamw, adamw8bit = summary["runs"]["adamw"], summary["runs"]["adamw8bit"]
    for key in ("final_train_loss", "final_eval_loss"):
        assert adamw8bit[key] == pytest.approx(adamw[key], rel=0.03), key


def test_state_memory_matches_layouts(tiny_run, example):
    _, summary, _ = tiny_run
    # The model's tensor sizes, from the model itself (not from the run's own report).
    model = example.GPT(example.TINY, summary["vocab_size"])
    shapes = [list(p.shape) for p in model.parameters()]
    assert shapes == list(summary["params"].values())
    for name, run in summary["runs"].items():
        assert run["state_bytes"] == expected_state_bytes(shapes, name), name
    ratio = expected_state_bytes(shapes, "adamw8bit") / expected_state_bytes(shapes, "adamw")
    assert summary["runs"]["adamw8bit"]["state_vs_adamw"] == pytest.approx(ratio)
    # Every matrix is 8-bit, so the ratio is near 2/8 (plus absmax, steps, fp32 LayerNorms).
    assert ratio < 0.3
    assert summary["runs"]["adamw8bit"]["fraction_8bit"] > 0.95
    assert summary["runs"]["lion"]["state_vs_adamw"] == pytest.approx(
        expected_state_bytes(shapes, "lion") / expected_state_bytes(shapes, "adamw"))


def test_full_size_is_all_8bit(example):
    """The GPU default: every weight matrix reaches min_8bit_size, and it is 10-50M params."""
    data = example.CharData(example.CORPUS.read_text(encoding="ascii"))
    with torch.device("meta"):
        model = example.GPT(example.FULL, data.vocab_size)
    min_8bit = inspect.signature(fusedopt.AdamW8bit).parameters["min_8bit_size"].default
    assert all(p.numel() >= min_8bit for p in model.parameters() if p.dim() == 2)
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 50e6


@pytest.mark.full  # two more training runs
def test_deterministic_with_a_seed(tmp_path):
    """Two runs with the same seed give the same curves, bit for bit (on a CPU)."""
    def run(out):
        subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "20",
                        "--optimizers", "adamw8bit", "--seed", "3", "--out", str(out)],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
        return json.loads((out / "summary.json").read_text())["runs"]["adamw8bit"]

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    for key in ("train_loss", "eval_loss", "eval_train_loss", "grad_norm"):
        assert first["curves"][key] == second["curves"][key], key


def test_size_presets(example, capsys):
    """--tiny and --small pick their presets, the default is the GPU size, and the two cannot
    be combined. --small sits between: every matrix still gets 8-bit states."""
    assert example.SIZES[example.parse_args([]).size] is example.FULL
    assert example.SIZES[example.parse_args(["--tiny"]).size] is example.TINY
    assert example.SIZES[example.parse_args(["--small"]).size] is example.SMALL
    with pytest.raises(SystemExit):
        example.parse_args(["--tiny", "--small"])
    assert "--small" in capsys.readouterr().err
    data = example.CharData(example.CORPUS.read_text(encoding="ascii"))
    with torch.device("meta"):
        tiny, small = (sum(p.numel() for p in example.GPT(c, data.vocab_size).parameters())
                       for c in (example.TINY, example.SMALL))
        model = example.GPT(example.SMALL, data.vocab_size)
    assert tiny < small < 2e6
    min_8bit = inspect.signature(fusedopt.AdamW8bit).parameters["min_8bit_size"].default
    assert all(p.numel() >= min_8bit for p in model.parameters() if p.dim() == 2)


def test_bad_flags_name_the_flag(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--optimizers", "adamw,sgd"])
    assert "--optimizers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.parse_args(["--steps", "1"])
    assert "--steps" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(example, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match=r"matplotlib.*\[examples\]"):
        example.require_matplotlib()


def test_corpus_is_reproducible():
    corpus = _load(ROOT / "examples" / "data" / "make_corpus.py", "examples_make_corpus")
    assert corpus.make_corpus() == corpus.PATH.read_text(encoding="ascii")


def test_summary_losses_are_the_logged_ones_and_progress_is_plain(tiny_run):
    # The summary's final train/eval loss is the last logged `train`/`eval` (the same fixed-batch
    # estimate), and the table says what it is; progress (not a terminal) is plain lines.
    out, summary, stdout = tiny_run
    for name, run in summary["runs"].items():
        last = re.findall(rf"\[\s*{name}\] step\s+\d+/\d+\s+train (\S+)\s+eval (\S+)", stdout)[-1]
        assert (f"{run['final_train_loss']:.4f}", f"{run['final_eval_loss']:.4f}") == last, name
    assert "not the mean training loss of the last steps" in (out / "summary.md").read_text()
    err = (out / "stderr.txt").read_text()
    steps = summary["config"]["steps"]
    total = steps * len(summary["runs"])
    starts = re.findall(rf"^train \[(\d+)/{total}\] \d+s (\w+)$", err, re.M)
    assert starts == [(str(1 + i * steps), name) for i, name in enumerate(summary["runs"])], err
    assert re.search(rf"^train: {total}/{total} done in \d+s$", err, re.M), err
