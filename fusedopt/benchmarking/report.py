"""The report of a run: the terminal table (:func:`format_table`), the goal ratios
(:func:`headlines`), the JSON schema of ``--json`` (:data:`JSON_SCHEMA`) and the plot
(:func:`plot`); and the roofline table of every optimizer (:func:`roofline_table`).
"""

from __future__ import annotations

import math

import torch

from .cases import DTYPES, MODELS, OPTIMIZERS, bytes_per_param


SCHEMA_ID = "fusedopt-bench/1"


# ---------------------------------------------------------------------------------------------
# Output: the terminal table, the JSON schema, the plot.
# ---------------------------------------------------------------------------------------------


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


#: What a provider is, where its name alone does not say (the table's rows and the plot's legend).
ROLES = {
    "fusedopt-reference": "reference backend: the oracle, not a fast path",
    "fusedopt-triton": "triton backend",
    "fusedopt-cuda": "cuda backend",
    "fusedopt-triton-graph": "triton backend, CUDA-graph replay",
    "fusedopt-cuda-graph": "cuda backend, CUDA-graph replay",
}


def provider_label(name: str) -> str:
    """``name``, with its role in parentheses where :data:`ROLES` has one."""
    return f"{name} ({ROLES[name]})" if name in ROLES else name


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_table(doc: dict) -> str:
    """The run as text: one block per case, one row per provider, then the notes."""
    copy = doc["copy"]
    env = doc["environment"]
    lines = [
        f"fusedopt bench on {env['device']} ({env['device_name']}), torch {env['versions']['torch']}, "
        f"commit {(env['commit'] or 'unknown')[:10]}{' (dirty)' if env['dirty'] else ''}, {doc['date']}",
        f"copy ceiling: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2**20:.0f} MiB read + written "
        f"in {copy['median_ms']:.3f} ms, median)",
    ]
    # The name column fits the longest name (fusedopt-triton-graph is 21 characters).
    w = max([len("provider")] + [len(p["name"]) for p in doc["providers"]]
            + [len(r["provider"]) for c in doc["cases"] for r in c["results"]])
    head = (f"  {'provider':<{w}} {'status':<11} {'median ms':>10} {'[q20, q80]':>19} {'GB/s':>8} "
            f"{'%copy':>7} {'xfloor':>7} {'host ms':>8} {'launch':>6} {'stateB/p':>8} {'check':>8}")
    cached = False
    for case in doc["cases"]:
        lines.append("")
        lines.append(f"{case['name']}: {_count(case['params'])} params in {case['tensors']} tensors, "
                     f"{case['bytes_per_param']:.2f} B/param, floor {case['floor_ms']:.3f} ms at the copy ceiling")
        if not case["results"]:
            lines.append("  (no selected provider implements this optimizer)")
            continue
        lines.append(head)
        for r in case["results"]:
            if r["status"] != "ok":
                passed = r["status"] != "wrong" and r["check_error"] is not None
                check = f" (after passing the check: error {r['check_error']:.2g})" if passed else ""
                lines.append(f"  {r['provider']:<{w}} {r['status']:<11} {r['reason']}{check}")
                continue
            spread = f"[{r['q20_ms']:.3f}, {r['q80_ms']:.3f}]"
            notes = list(r["notes"])
            if r["provider"] in ROLES:
                notes.insert(0, ROLES[r["provider"]])
            # Faster than the copy: the step's bytes stayed in a cache the copy's did not fit.
            star = "*" if r["pct_copy"] > 100 else " "
            if star == "*":
                cached = True
                notes.append(f"*cache-resident: {_mib(r['bytes_per_param'] * case['params'])} moved per step")
            notes = f"  ({'; '.join(notes)})" if notes else ""
            lines.append(
                f"  {r['provider']:<{w}} {'ok':<11} {r['median_ms']:>10.3f} {spread:>19} {r['gbps']:>8.1f} "
                f"{r['pct_copy']:>5.1f}%{star} {r['x_floor']:>6.2f}x {r['host_ms']:>8.3f} {_fmt(r['launches'], 'd'):>6} "
                f"{r['state_bytes_per_param']:>8.2f} {r['check_error']:>8.1e}{notes}")
    lines.append("")
    lines.append("providers:")
    for p in doc["providers"]:
        lines.append(f"  {p['name']:<{w}} {p['description']}"
                     + ("" if p["reason"] is None else f"; not run here: {p['reason']}"))
    lines.append("GB/s: the bytes the provider's own algorithm must move (B/param shown per case is the "
                 "fused floor) over the median step time; xfloor: median over the case's floor.")
    if cached:
        lines.append(f"*: over 100% of the copy. The step's working set (the MiB moved per step, in the row) "
                     f"is small enough to stay in the device's caches between repeats, while the copy moves "
                     f"{copy['bytes'] / 2**20:.0f} MiB from memory: a cache speed, not memory bandwidth.")
    lines.extend(doc["notes"])
    return "\n".join(lines)


def _bytes(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def roofline_table() -> str:
    """The README's roofline table (``python -m fusedopt bench --roofline``): per optimizer,
    the states its family keeps with these hyper-parameters, its passes, and the fewest bytes
    per param a step reads plus writes with fp32 and with bf16 params and grads (fp32 states;
    :func:`fusedopt.benchmarking.cases.bytes_per_param`, 8-bit figures rounded to 0.01)."""
    lines = ["| optimizer | class, hyper-parameters | states kept (torch's keys) | passes | fp32 params | bf16 params |",
             "|---|---|---|---|---|---|"]
    for o in OPTIMIZERS.values():
        what = f"`{o.fusedopt_class}`" + (f", {o.description}" if o.description else "")
        states = ", ".join(f"`{s}`" for s in o.states) or "none"
        if o.quantized:
            states += f" (8-bit codes + an fp32 absmax per {o.block_size})"
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            cell = _bytes(bytes_per_param(o, dtype))
            if o.max_grad_norm is not None:
                cell += f" ({_bytes(bytes_per_param(o, dtype, separate_clip=True))} with a separate `clip_grad_norm_`)"
            cells.append(cell)
        lines.append(f"| `{o.name}` | {what} | {states} | {o.passes} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def kind_of(optimizer: str) -> str | None:
    """The kind of step (``fusedopt.backends.KINDS``) a benchmark optimizer exercises, from its
    family; None for a name this version does not have (a saved run of another)."""
    spec = OPTIMIZERS.get(optimizer)
    return None if spec is None else spec.kind


def _medians(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """(case name, provider) -> result, over several runs (a later run wins)."""
    out = {}
    for doc in docs:
        for case in doc["cases"]:
            for r in case["results"]:
                if r["status"] == "ok":
                    out[(case["name"], r["provider"])] = r
    return out


#: The peers a fusedopt result is compared with in the headlines, where they ran.
HEADLINE_PEERS = ("torch-fused", "torch-fused-graph", "bnb-8bit")


def headlines(docs: list[dict]) -> list[str]:
    """The figures the project's performance goals are stated in, from one or more runs of the
    same machine: ratios of medians measured in the same run, never across machines.

    - each fusedopt backend's %copy on every case (goal on AdamW fp32: >= 90%) and its speed-up
      over torch's fused step (AdamW, SGD, Adagrad; with clipping, over torch's
      clip_grad_norm_ + fused AdamW: goal >= 1.5x) and over bitsandbytes' 8-bit classes
      (AdamW8bit bf16: goal >= 1.5x); where neither ran (RMSprop, LARS, Lion), over the
      fastest other provider of the case;
    - 20,000 tensors of 4,096 elements over the same bytes in one tensor (goal: <= 1.3x);
    - per kind of step, the faster of triton and cuda (the geometric mean of their ratios over
      every case both ran): what ``fusedopt.backends.AUTO_ORDER`` should say.
    """
    res = _medians(docs)
    cases = sorted({c for c, _ in res})
    lines = []

    def ratio(case, slow, fast):
        a, b = res.get((case, slow)), res.get((case, fast))
        return None if a is None or b is None else a["median_ms"] / b["median_ms"]

    ours = [p for p in ("fusedopt-triton", "fusedopt-cuda", "fusedopt-triton-graph", "fusedopt-cuda-graph")
            if any(k[1] == p for k in res)]
    for case in cases:
        opt, model, dtype = case.split("/")
        for p in ours:
            r = res.get((case, p))
            if r is None:
                continue
            parts = [f"{r['pct_copy']:.1f}% of copy"]
            peers = [q for q in HEADLINE_PEERS if (case, q) in res]
            if not peers:  # no fused peer for this optimizer (RMSprop, LARS, Lion): the fastest other
                others = [q for c, q in res if c == case and not q.startswith("fusedopt-")]
                peers = sorted(others, key=lambda q: res[(case, q)]["median_ms"])[:1]
            for peer in peers:
                parts.append(f"{ratio(case, peer, p):.2f}x {peer}")
            if model == "many-4k":
                one = res.get((f"{opt}/one-82m/{dtype}", p))
                if one is not None:
                    parts.append(f"{r['median_ms'] / one['median_ms']:.2f}x its one-tensor time (goal <= 1.3)")
            lines.append(f"  {case:<24} {p:<22} " + ", ".join(parts))
    for graph in ("", "-graph"):
        t, c = f"fusedopt-triton{graph}", f"fusedopt-cuda{graph}"
        by_kind: dict[str, list[float]] = {}
        for case in cases:
            x = ratio(case, t, c)  # > 1: cuda is faster
            kind = kind_of(case.split("/")[0])
            if x is not None and kind is not None:
                by_kind.setdefault(kind, []).append(math.log(x))
        for kind, logs in sorted(by_kind.items()):
            g = math.exp(sum(logs) / len(logs))
            faster = "cuda" if g > 1 else "triton"
            lines.append(f"  auto{graph or ''} {kind:<9} {faster} ({max(g, 1 / g):.2f}x, geometric mean of "
                         f"{len(logs)} cases)")
    return ["headlines (ratios of medians within a run):"] + (lines or ["  (no fusedopt GPU results)"])


def _nullable(kind):
    return {"type": [kind, "null"]}


_RESULT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["provider", "status", "reason", "check_error", "check_tolerance", "bytes_per_param",
                 "median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy", "x_floor", "host_ms",
                 "launches", "state_bytes_per_param", "repeats", "input_sets", "notes"],
    "properties": {
        "provider": {"type": "string"},
        "status": {"enum": ["ok", "wrong", "error", "unavailable", "skipped"]},
        "reason": _nullable("string"),
        "check_error": _nullable("number"),
        "check_tolerance": _nullable("number"),
        "bytes_per_param": _nullable("number"),
        "median_ms": _nullable("number"),
        "q20_ms": _nullable("number"),
        "q80_ms": _nullable("number"),
        "gbps": _nullable("number"),
        "pct_copy": _nullable("number"),
        "x_floor": _nullable("number"),
        "host_ms": _nullable("number"),
        "launches": _nullable("integer"),
        "state_bytes_per_param": _nullable("number"),
        "repeats": _nullable("integer"),
        "input_sets": _nullable("integer"),
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    # A timed result has every timing; any other has none and says why.
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {"properties": {k: {"type": "number"} for k in
                            ("check_error", "median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy",
                             "x_floor", "host_ms", "state_bytes_per_param", "bytes_per_param")}
             | {"repeats": {"type": "integer", "minimum": 1}, "input_sets": {"type": "integer", "minimum": 1},
                "reason": {"type": "null"}}},
    "else": {"properties": {k: {"type": "null"} for k in
                            ("median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy", "x_floor", "host_ms",
                             "launches", "state_bytes_per_param", "repeats", "input_sets", "bytes_per_param")}
             | {"reason": {"type": "string"}}},
}

#: JSON Schema (draft 2020-12) of the document ``--json`` writes; bench/README.md explains it.
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fusedopt benchmark run",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema", "date", "argv", "quick", "environment", "config", "copy", "providers", "cases", "notes"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "date": {"type": "string"},
        "argv": {"type": "array", "items": {"type": "string"}},
        "quick": {"type": "boolean"},
        "environment": {
            "type": "object",
            "additionalProperties": False,
            "required": ["device", "device_name", "gpu", "device_memory_bytes", "driver", "cuda", "cpu_count",
                         "python", "platform", "versions", "commit", "dirty"],
            "properties": {
                "device": {"type": "string"},
                "device_name": {"type": "string"},
                "gpu": {"type": "boolean"},
                "device_memory_bytes": _nullable("integer"),
                "driver": _nullable("string"),
                "cuda": _nullable("string"),
                "cpu_count": _nullable("integer"),
                "python": {"type": "string"},
                "platform": {"type": "string"},
                "versions": {
                    "type": "object",
                    "required": ["torch", "triton", "bitsandbytes", "lion_pytorch", "fusedopt"],
                    "additionalProperties": _nullable("string"),
                },
                "commit": _nullable("string"),
                "dirty": _nullable("boolean"),
            },
        },
        "config": {
            "type": "object",
            "additionalProperties": False,
            "required": ["warmup", "min_repeat", "max_repeat", "time_budget_s", "input_sets", "check_steps",
                         "flush_bytes", "cpu_threads"],
            "properties": {
                "warmup": {"type": "integer", "minimum": 0},
                "min_repeat": {"type": "integer", "minimum": 1},
                "max_repeat": {"type": "integer", "minimum": 1},
                "time_budget_s": {"type": "number", "minimum": 0},
                "input_sets": {"type": "integer", "minimum": 1},
                "check_steps": {"type": "integer", "minimum": 1},
                "flush_bytes": {"type": "integer", "minimum": 0},
                "cpu_threads": {"type": "integer", "minimum": 1},
            },
        },
        "copy": {
            "type": "object",
            "additionalProperties": False,
            "required": ["bytes", "median_ms", "q20_ms", "q80_ms", "gbps"],
            "properties": {k: {"type": "number", "exclusiveMinimum": 0}
                           for k in ("bytes", "median_ms", "q20_ms", "q80_ms", "gbps")},
        },
        "providers": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "description", "optimizers", "reason"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "optimizers": {"type": "array", "items": {"type": "string"}},
                    "reason": _nullable("string"),
                },
            },
        },
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "optimizer", "model", "dtype", "tensors", "params", "bytes_per_param",
                             "floor_ms", "results"],
                "properties": {
                    "name": {"type": "string"},
                    "optimizer": {"enum": list(OPTIMIZERS)},
                    "model": {"enum": list(MODELS)},
                    "dtype": {"enum": list(DTYPES)},
                    "tensors": {"type": "integer", "minimum": 1},
                    "params": {"type": "integer", "minimum": 1},
                    "bytes_per_param": {"type": "number", "exclusiveMinimum": 0},
                    "floor_ms": {"type": "number", "exclusiveMinimum": 0},
                    "results": {"type": "array", "items": _RESULT_SCHEMA},
                },
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


#: The plot's columns: (result field, axis label, log scale).
_PLOT_METRICS = (
    ("gbps", "GB/s (log)", True),
    ("median_ms", "median step time, ms (log)", True),
    ("state_bytes_per_param", "optimizer state, bytes/param", False),
)


def plot(doc: dict, path: str) -> str | None:
    """One row of panels per model and dtype: GB/s (against the copy ceiling), median step time
    and optimizer state bytes per parameter, one group of bars per optimizer. Log axes keep slow
    bars (8-bit states on a CPU) readable next to fast ones, and the state panel shows what
    8-bit buys. fusedopt's reference (the oracle, not a fast path) is hatched. Returns None, or
    why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib, or pip install 'fusedopt[test]'); no plot written"

    panels = list(dict.fromkeys((c["model"], c["dtype"]) for c in doc["cases"]))
    providers = [p["name"] for p in doc["providers"]]
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(providers)}
    ncol, nrow = len(_PLOT_METRICS), max(len(panels), 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 3.2 * nrow), squeeze=False)
    ceiling = doc["copy"]["gbps"]
    for row, (model, dtype) in zip(axes, panels):
        cases = [c for c in doc["cases"] if c["model"] == model and c["dtype"] == dtype]
        ok = {(c["name"], r["provider"]): r for c in cases for r in c["results"] if r["status"] == "ok"}
        shown = [n for n in providers if any((c["name"], n) in ok for c in cases)]
        width = 0.8 / max(len(shown), 1)
        for ax, (field_name, label, log) in zip(row, _PLOT_METRICS):
            for j, name in enumerate(shown):
                xs = [i - 0.4 + (j + 0.5) * width for i, c in enumerate(cases) if (c["name"], name) in ok]
                ys = [ok[c["name"], name][field_name] for c in cases if (c["name"], name) in ok]
                ax.bar(xs, ys, width, color=colors[name], label=provider_label(name),
                       hatch="//" if name == "fusedopt-reference" else None, edgecolor="white", linewidth=0)
            if field_name == "gbps":
                ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
                ax.text(len(cases) - 0.5, ceiling, f"copy {ceiling:.0f} GB/s", ha="right", va="bottom", fontsize=8)
            if log:
                ax.set_yscale("log")
            if field_name == "gbps":  # room above the copy line for its label
                ax.set_ylim(top=2 * max([ceiling] + [r["gbps"] for r in ok.values()]))
            ax.set_xticks(range(len(cases)), [c["optimizer"] for c in cases], fontsize=8)
            ax.set_xlim(-0.5, len(cases) - 0.5)
            ax.set_ylabel(label, fontsize=9)
            ax.set_title(f"{model}, {dtype} params: {label.split(' (')[0].split(',')[0]}", fontsize=10)
            ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    env = doc["environment"]
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, max(len(handles), 1)), fontsize=9)
    fig.suptitle(f"fusedopt bench: {env['device_name']} ({env['device']}), commit "
                 f"{(env['commit'] or 'unknown')[:10]}, {doc['date'][:10]}"
                 f"{' (--quick: a smoke test, not a measurement)' if doc['quick'] else ''}", fontsize=11)
    fig.tight_layout(rect=(0, 0.9 / (3.2 * nrow), 1, 1 - 0.4 / (3.2 * nrow)))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
