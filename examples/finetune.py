"""Train a small character-level GPT with AdamW, AdamW8bit, Lion and LAMB, and compare them.

Every optimizer trains the same model from the same initial weights on the same batches, with
a linear warmup followed by a cosine decay (torch's ``LinearLR`` + ``CosineAnnealingLR`` joined
by ``SequentialLR``) and global-norm clipping fused into the step (``max_grad_norm=1.0``). The
text is ``data/harbour.txt``, shipped with the repository (nothing is downloaded); its last
10% is held out for the eval loss.

Writes into ``--out`` (default ``examples/out/``):

- ``loss.png``: train and eval loss curves, one line per optimizer (needs matplotlib);
- ``summary.md`` and ``summary.json``: final train/eval loss, mean step time, optimizer state
  memory and its ratio to AdamW's (the JSON also holds the curves and the configuration).

Usage::

    python examples/finetune.py --tiny            # CPU, about a minute (51 s on 2 cores at load 3)
    python examples/finetune.py --amp             # GPU: ~10.8M-param model, 2000 steps
    python examples/finetune.py --optimizers adamw,adamw8bit --steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Deterministic cuBLAS needs this before CUDA initialises (it only matters on GPUs).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import fusedopt
from fusedopt.progress import Progress

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "harbour.txt"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in characters
    dropout: float
    batch_size: int
    steps: int
    warmup: int  # steps of linear warmup before the cosine decay
    lr: float  # AdamW's peak learning rate; the other optimizers scale it (OPTIMIZERS)
    eval_interval: int
    eval_iters: int  # batches per loss estimate


# The GPU default: nanoGPT's character-level size (6 x 384, ~10.8M parameters). Every weight
# matrix has >= 4096 elements (AdamW8bit's min_8bit_size), so all of them get 8-bit states.
FULL = Config(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1, batch_size=32,
              steps=2000, warmup=100, lr=1e-3, eval_interval=100, eval_iters=20)
# A CPU-sized run (~0.11M parameters): the smallest matrices are 64 x 64 = 4096 elements, so
# they are still 8-bit with the default min_8bit_size.
TINY = Config(n_layer=2, n_head=4, n_embd=64, block_size=64, dropout=0.0, batch_size=16,
              steps=300, warmup=30, lr=5e-3, eval_interval=25, eval_iters=8)
# Between the two, for a CPU with time to spare (~0.8M parameters, 4 x 128): long enough for
# the loss curves to flatten, about 13 minutes on 2 busy cores for all four optimizers.
SMALL = Config(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, batch_size=16,
               steps=1000, warmup=50, lr=2e-3, eval_interval=50, eval_iters=8)
SIZES = {"tiny": TINY, "small": SMALL, "full": FULL}


@dataclass(frozen=True)
class OptimizerSpec:
    cls: type
    lr_scale: float  # times Config.lr
    weight_decay: float
    betas: tuple[float, float]


# Lion's update is a sign (unit size per element): a 3x smaller lr and a 10x larger weight decay
# than AdamW's (Chen et al., 2023, section 5). LAMB scales each tensor's step to lr * ||p|| (its
# trust ratio) and so takes a larger lr than AdamW. On the tiny run, lr = 5e-3 for AdamW kept
# AdamW8bit within 1.2% of AdamW over seeds 0-2; at 1e-2 both trained faster but the gap
# between any two runs (a seed, or 8-bit states) grew to 7% (the loss is still falling steeply).
OPTIMIZERS = {
    "adamw": OptimizerSpec(fusedopt.AdamW, 1.0, 0.1, (0.9, 0.95)),
    "adamw8bit": OptimizerSpec(fusedopt.AdamW8bit, 1.0, 0.1, (0.9, 0.95)),
    "lion": OptimizerSpec(fusedopt.Lion, 1 / 3, 1.0, (0.9, 0.99)),
    "lamb": OptimizerSpec(fusedopt.LAMB, 6.0, 0.1, (0.9, 0.999)),
}


# ---------------------------------------------------------------------------------------------
# Data: characters of the corpus, the last 10% held out
# ---------------------------------------------------------------------------------------------


class CharData:
    def __init__(self, text: str, vocab_multiple: int = 64):
        chars = sorted(set(text))
        # The embedding and head are padded to a multiple of 64 rows, so that with n_embd=64
        # they reach min_8bit_size (and matmuls get friendlier shapes on GPUs).
        self.vocab_size = -(-len(chars) // vocab_multiple) * vocab_multiple
        self.stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train, self.eval = ids[:split], ids[split:]

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        ids = self.train if split == "train" else self.eval
        starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
        x = torch.stack([ids[s: s + block_size] for s in starts])
        y = torch.stack([ids[s + 1: s + 1 + block_size] for s in starts])
        return x, y


# ---------------------------------------------------------------------------------------------
# The model: a decoder-only transformer (pre-LayerNorm, learned positions, GELU MLP)
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, c // self.n_head).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear weights, embeddings), none on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, 8-bit codes and absmax, steps)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def fraction_8bit(opt: torch.optim.Optimizer) -> float:
    """Fraction of the parameters whose states are stored in 8 bits."""
    params = [p for g in opt.param_groups for p in g["params"]]
    quantized = sum(p.numel() for p in params if opt.state[p].get("exp_avg", torch.empty(0)).dtype == torch.uint8)
    return quantized / sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class StepClock:
    """Wall time of steps and of their optimizer part. On CUDA it records events and reads them
    once at the end, so timing adds no host sync to the loop."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start, opt_start, end):
        self.marks.append((start, opt_start, end))

    def millis(self) -> tuple[list[float], list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
            step = [s.elapsed_time(e) for s, _, e in self.marks]
            opt = [o.elapsed_time(e) for _, o, e in self.marks]
        else:
            step = [1e3 * (e - s) for s, _, e in self.marks]
            opt = [1e3 * (e - o) for _, o, e in self.marks]
        return step, opt


def estimate_loss(model, batches, autocast) -> float:
    model.eval()
    with torch.no_grad(), autocast():
        losses = torch.stack([model(x, y) for x, y in batches])
    model.train()
    return losses.mean().item()


def train(name: str, cfg: Config, data: CharData, eval_batches: dict, args, device, progress: Progress) -> dict:
    spec = OPTIMIZERS[name]
    torch.manual_seed(args.seed)  # same initial weights and dropout masks for every optimizer
    model = GPT(cfg, data.vocab_size).to(device)
    lr = cfg.lr * spec.lr_scale
    opt = spec.cls(param_groups(model, spec.weight_decay), lr=lr, betas=spec.betas,
                   max_grad_norm=1.0, backend=args.backend)
    schedule = SequentialLR(opt, [
        LinearLR(opt, start_factor=0.01, total_iters=cfg.warmup),
        CosineAnnealingLR(opt, T_max=cfg.steps - cfg.warmup, eta_min=0.1 * lr),
    ], milestones=[cfg.warmup])
    generator = torch.Generator().manual_seed(args.seed)  # same batches for every optimizer

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def evaluate(step):
        curves["eval_step"].append(step)
        curves["eval_train_loss"].append(estimate_loss(model, eval_batches["train"], autocast))
        curves["eval_loss"].append(estimate_loss(model, eval_batches["eval"], autocast))

    curves = {k: [] for k in ("step", "train_loss", "lr", "grad_norm", "eval_step", "eval_train_loss", "eval_loss")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    evaluate(0)
    log_every = max(1, cfg.eval_interval // 5)
    running = torch.zeros((), device=device)
    progress.start(name)
    for step in range(1, cfg.steps + 1):
        x, y = (t.to(device, non_blocking=True) for t in data.batch("train", cfg.batch_size, cfg.block_size, generator))
        start = clock.mark()
        with autocast():
            loss = model(x, y)
        loss.backward()
        opt_start = clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.add(start, opt_start, clock.mark())
        running += loss.detach()
        step_lr = schedule.get_last_lr()[0]
        schedule.step()
        if step % log_every == 0 or step == cfg.steps:
            n = step - (curves["step"][-1] if curves["step"] else 0)  # steps since the last log point
            curves["step"].append(step)
            curves["train_loss"].append(running.item() / n)  # the mean over the interval
            curves["lr"].append(step_lr)
            curves["grad_norm"].append(opt.last_grad_norm.item())
            running.zero_()
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            evaluate(step)
            # train and eval: estimates on fixed batches (what the summary reports); "last N":
            # the mean loss of the training steps since the previous log point.
            progress.write(f"[{name:>9}] step {step:>5}/{cfg.steps}  train {curves['eval_train_loss'][-1]:.4f}  "
                           f"eval {curves['eval_loss'][-1]:.4f}  (last {n} steps {curves['train_loss'][-1]:.4f})  "
                           f"lr {step_lr:.2e}  |g| {curves['grad_norm'][-1]:.3f}")
        progress.advance()
    step_ms, opt_ms = clock.millis()
    skip = min(10, cfg.steps // 10)  # the first steps create states and warm caches up
    result = {
        "optimizer": spec.cls.__name__,
        "lr": lr,
        "weight_decay": spec.weight_decay,
        "betas": list(spec.betas),
        "final_train_loss": curves["eval_train_loss"][-1],
        "final_eval_loss": curves["eval_loss"][-1],
        "mean_step_ms": sum(step_ms[skip:]) / len(step_ms[skip:]),
        "mean_optimizer_step_ms": sum(opt_ms[skip:]) / len(opt_ms[skip:]),
        "state_bytes": state_bytes(opt),
        "fraction_8bit": fraction_8bit(opt),
        "curves": curves,
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def summary_markdown(summary: dict) -> str:
    runs = summary["runs"]
    lines = [
        f"Model: {summary['n_params'] / 1e6:.2f}M parameters ({summary['config']['n_layer']} layers x "
        f"{summary['config']['n_embd']}), {summary['config']['steps']} steps, device {summary['device']}"
        f"{', bf16 autocast' if summary['amp'] else ''}, seed {summary['seed']}.",
        "",
        "| optimizer | lr | weight decay | final train loss | final eval loss | mean step (ms) "
        "| optimizer step (ms) | optimizer state (MiB) | vs AdamW | 8-bit share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        ratio = "n/a" if r["state_vs_adamw"] is None else f"{r['state_vs_adamw']:.3f}"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:.2e} | {r['weight_decay']} | {r['final_train_loss']:.4f} "
            f"| {r['final_eval_loss']:.4f} | {r['mean_step_ms']:.2f} | {r['mean_optimizer_step_ms']:.2f} "
            f"| {r['state_bytes'] / 2**20:.3f} | {ratio} | {r['fraction_8bit']:.0%} |"
        )
    lines += [
        "",
        f"Final train and eval loss: the loss after the last step on the same {summary['config']['eval_iters']} "
        "fixed batches of each split (the log's `train` and `eval`), not the mean training loss of the "
        "last steps (the log's `last N steps`).",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # checked by require_matplotlib() before training

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, r in summary["runs"].items():
        c = r["curves"]
        style = "--" if r["fraction_8bit"] > 0 else "-"  # AdamW8bit lies on top of AdamW
        ax_train.plot(c["step"], c["train_loss"], style, label=r["optimizer"])
        ax_eval.plot(c["eval_step"], c["eval_loss"], style, marker=".", label=r["optimizer"])
    for ax, title in ((ax_train, "train loss (mean over each log interval)"), (ax_eval, "held-out eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_train.set_ylabel("cross-entropy (nats per character)")
    fig.suptitle(f"char-level GPT, {summary['n_params'] / 1e6:.2f}M params, {summary['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("examples/finetune.py writes loss.png with matplotlib, which is not installed: "
                         "pip install -e '.[examples]' (or pip install matplotlib)") from None


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                      help="a CPU-sized model and run (about a minute: 51 s on 2 shared cores at load 3, "
                           "3m38s at load 8)")
    size.add_argument("--small", action="store_const", dest="size", const="small",
                      help="a larger CPU run (~0.8M parameters, 1000 steps, about a quarter of an hour)")
    parser.set_defaults(size="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--steps", type=int, help="training steps (default: 300 with --tiny, 1000 with --small, else 2000)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss (meant for CUDA)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "reference"),
                        help="fusedopt backend (default: auto)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: examples/out)")
    args = parser.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown or not args.optimizers:
        parser.error(f"--optimizers: unknown {unknown or 'empty list'}; choose from {', '.join(OPTIMIZERS)}")
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps: expected an integer >= 2, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    require_matplotlib()
    device = torch.device(args.device)
    cfg = SIZES[args.size]
    if args.size == "full" and device.type == "cpu":
        print("note: the default size is meant for a GPU (hours on a CPU); --tiny runs in about a minute", flush=True)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, warmup=max(1, min(cfg.warmup, args.steps // 10)),
                      eval_interval=min(cfg.eval_interval, args.steps))
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.size == "tiny" and device.type == "cpu":
        # Matrices this small gain nothing from intra-op threads, and on a shared CPU the
        # threads' spinning made a step 25x slower (measured on 2 busy cores: 36 ms with one
        # thread, 880 ms with two).
        torch.set_num_threads(1)

    data = CharData(CORPUS.read_text(encoding="ascii"))
    generator = torch.Generator().manual_seed(args.seed + 1)  # fixed loss-estimate batches
    eval_batches = {
        split: [tuple(t.to(device) for t in data.batch(split, cfg.batch_size, cfg.block_size, generator))
                for _ in range(cfg.eval_iters)]
        for split in ("train", "eval")
    }
    model = GPT(cfg, data.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocab {len(data.stoi)} (padded to {data.vocab_size}), "
          f"{len(data.train)} train / {len(data.eval)} eval characters, device {device}", flush=True)

    with Progress(cfg.steps * len(args.optimizers), "train", unit="step", log=sys.stdout) as progress:
        runs = {name: train(name, cfg, data, eval_batches, args, device, progress) for name in args.optimizers}
    base = runs.get("adamw", {}).get("state_bytes")
    for r in runs.values():
        r["state_vs_adamw"] = None if base is None else r["state_bytes"] / base
    summary = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "amp": args.amp,
        "seed": args.seed,
        "backend": args.backend,
        "versions": {"torch": torch.__version__, "fusedopt": fusedopt.__version__, "python": platform.python_version()},
        "vocab_size": data.vocab_size,
        "n_params": n_params,
        "params": {name: list(p.shape) for name, p in model.named_parameters()},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = summary_markdown(summary)
    (args.out / "summary.md").write_text(table)
    plot(summary, args.out / "loss.png")
    print("\n" + table + f"\nwrote {args.out / 'loss.png'}, summary.md and summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
