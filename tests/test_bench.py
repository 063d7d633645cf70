"""The benchmark harness (``python -m fusedopt bench``): the quick CPU run, its JSON against
the documented schema, the bytes each case declares, and the correctness check that keeps a
wrong provider from being timed."""

import importlib.metadata
import json
import re
import sys

import jsonschema
import pytest
import torch

from fusedopt import benchmarking

# A cross-section of the quick suite that stays fast on two cores: every family, both dtypes,
# 8-bit, clipping, the many-tensor model, and a provider that cannot run here.
QUICK_CASES = ["adamw-clip/gpt2-124m/fp32", "adamw/many-4k/bf16", "lamb/llama-1b/fp32",
               "lion/gpt2-124m/bf16", "adamw8bit/llama-1b/bf16", "lion8bit/many-4k/fp32"]
QUICK_PROVIDERS = ["torch-fused", "torch-compile", "bnb-8bit", "lion-pytorch*", "fusedopt-*"]

TIMINGS = ("median_ms", "q20_ms", "q80_ms", "gbps", "pct_copy", "x_floor", "host_ms",
           "state_bytes_per_param", "repeats", "input_sets", "bytes_per_param")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--cases", *QUICK_CASES, "--providers", *QUICK_PROVIDERS,
            "--json", str(out / "run.json"), "--plot", str(out / "run.png")]
    code = benchmarking.main(argv)
    return code, json.loads((out / "run.json").read_text()), out


def test_quick_run_writes_json_that_matches_the_schema(quick_run, capsys):
    code, doc, _ = quick_run
    assert code == 0
    jsonschema.validate(doc, benchmarking.JSON_SCHEMA)
    assert sorted(c["name"] for c in doc["cases"]) == sorted(QUICK_CASES)
    assert doc["quick"] is True and doc["environment"]["device"] == "cpu"
    assert doc["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert doc["copy"]["gbps"] > 0


def test_quick_run_reports_every_provider_of_every_case(quick_run):
    _, doc, _ = quick_run
    selected = benchmarking.select_providers(QUICK_PROVIDERS)
    for case in doc["cases"]:
        want = [p.name for p in selected if case["optimizer"] in p.optimizers]
        assert [r["provider"] for r in case["results"]] == want, case["name"]
        for r in case["results"]:
            if r["status"] == "ok":
                assert r["check_error"] <= r["check_tolerance"]
                assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
                assert r["launches"] is None  # counted on GPUs only
            else:
                assert r["reason"], r  # never dropped without a reason
        ref = next(r for r in case["results"] if r["provider"] == "fusedopt-reference")
        assert ref["status"] == "ok" and ref["check_error"] == 0.0
    # What cannot run on a CPU says so.
    by_name = {p["name"]: p["reason"] for p in doc["providers"]}
    assert "CUDA" in by_name["lion-pytorch-triton"]
    assert by_name["torch-compile"].startswith("not run under --quick")
    compiled = [r for c in doc["cases"] for r in c["results"] if r["provider"] == "torch-compile"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)
    for backend in ("triton", "cuda"):
        assert by_name[f"fusedopt-{backend}"] is not None


def test_quick_run_says_gpu_figures_need_a_gpu(quick_run, capsys):
    _, doc, out = quick_run
    assert benchmarking.NO_GPU_NOTE in doc["notes"]
    assert "GPU figures" in benchmarking.format_table(doc)
    assert (out / "run.png").stat().st_size > 0 or "matplotlib" in capsys.readouterr().err


def test_schema_rejects_a_timed_result_without_timings(quick_run):
    _, doc, _ = quick_run
    broken = json.loads(json.dumps(doc))
    ok = next(r for c in broken["cases"] for r in c["results"] if r["status"] == "ok")
    ok["median_ms"] = None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, benchmarking.JSON_SCHEMA)
    broken = json.loads(json.dumps(doc))
    other = next(r for c in broken["cases"] for r in c["results"] if r["status"] != "ok")
    other["median_ms"] = 1.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, benchmarking.JSON_SCHEMA)


# ---------------------------------------------------------------------------------------------
# A provider that computes the wrong thing is marked and not timed.
# ---------------------------------------------------------------------------------------------


def _adamw_with(**change):
    """fusedopt's reference AdamW (fp32 states, like every fusedopt backend) with one
    hyper-parameter changed: a provider that is wrong by exactly that flaw."""
    def make(params, spec, hp):
        import fusedopt
        hp = {**hp, **{k: f(hp[k]) for k, f in change.items()}}
        opt = fusedopt.AdamW(params, **hp, max_grad_norm=spec.max_grad_norm, backend="reference")
        return benchmarking.Runner(opt, opt.step)
    return make


def _nan(params, spec, hp):
    def step():
        for p in params:
            p.fill_(float("nan"))
    return benchmarking.Runner(torch.optim.SGD(params, lr=0.1), step)


def _raises(params, spec, hp):
    def step():
        raise RuntimeError("kernel exploded")
    return benchmarking.Runner(torch.optim.SGD(params, lr=0.1), step)


WRONG = {
    "lr-1pct": _adamw_with(lr=lambda lr: lr * 1.01),
    "lr-10pct": _adamw_with(lr=lambda lr: lr * 1.1),
    "no-decay": _adamw_with(weight_decay=lambda wd: 0.0),
    "beta1": _adamw_with(betas=lambda b: (0.8, b[1])),
}


@pytest.mark.parametrize("dtype,flaw", [("fp32", "lr-1pct"), ("fp32", "no-decay"), ("fp32", "beta1"),
                                        ("bf16", "lr-10pct"), ("bf16", "no-decay"), ("bf16", "beta1")])
def test_a_wrong_provider_is_marked_and_not_timed(monkeypatch, tmp_path, dtype, flaw):
    wrong = benchmarking.Provider("wrong-adamw", "AdamW with one flaw", ("adamw",), WRONG[flaw])
    monkeypatch.setitem(benchmarking.PROVIDERS, wrong.name, wrong)
    path = tmp_path / "run.json"
    code = benchmarking.main(["--quick", "--device", "cpu", "--cases", f"adamw/llama-1b/{dtype}",
                           "--providers", "wrong-adamw", "fusedopt-reference", "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, benchmarking.JSON_SCHEMA)
    results = {r["provider"]: r for r in doc["cases"][0]["results"]}
    bad = results["wrong-adamw"]
    assert bad["status"] == "wrong"
    assert "not timed" in bad["reason"]
    assert bad["check_error"] > bad["check_tolerance"]
    assert all(bad[k] is None for k in TIMINGS)
    assert results["fusedopt-reference"]["status"] == "ok"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_independent_correct_provider_passes_the_check(dtype):
    # The control of the test above: torch's own AdamW, which keeps its states in the param's
    # dtype (as the registry declares), passes; so do bitsandbytes' fp32-state AdamW.
    case = benchmarking.select_cases([f"adamw-clip/llama-1b/{dtype}"], quick=True)[0]
    for name in ("torch-forloop", "torch-fused", "bnb-32bit"):
        err, tol = benchmarking.check(benchmarking.PROVIDERS[name], case, torch.device("cpu"), steps=3)
        assert 0 < err <= tol, (name, dtype, err, tol)


def test_a_provider_that_writes_nan_is_marked_and_the_json_stays_valid(monkeypatch, tmp_path):
    nan = benchmarking.Provider("nan", "writes NaN", ("lion8bit",), _nan)
    monkeypatch.setitem(benchmarking.PROVIDERS, nan.name, nan)
    path = tmp_path / "run.json"
    assert benchmarking.main(["--quick", "--device", "cpu", "--cases", "lion8bit/gpt2-124m/bf16",
                           "--providers", "nan", "--json", str(path)]) == 0
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    jsonschema.validate(doc, benchmarking.JSON_SCHEMA)
    (r,) = doc["cases"][0]["results"]
    assert r["status"] == "wrong" and "non-finite" in r["reason"] and r["check_error"] is None
    assert all(r[k] is None for k in TIMINGS)


def test_a_provider_that_raises_is_reported_as_an_error(monkeypatch, tmp_path):
    broken = benchmarking.Provider("broken", "raises", ("lion",), _raises)
    monkeypatch.setitem(benchmarking.PROVIDERS, broken.name, broken)
    doc = benchmarking.run(benchmarking.select_cases(["lion/gpt2-124m/fp32"], quick=True), [broken],
                        torch.device("cpu"), benchmarking.default_config(True, torch.device("cpu")), quick=True)
    jsonschema.validate(doc, benchmarking.JSON_SCHEMA)
    (r,) = doc["cases"][0]["results"]
    assert r["status"] == "error" and "kernel exploded" in r["reason"]
    assert all(r[k] is None for k in TIMINGS)


# ---------------------------------------------------------------------------------------------
# Declared bytes and the command line.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,dtype,separate_clip,want", [
    ("adamw", torch.float32, False, 28), ("adamw-clip", torch.float32, False, 32),
    ("adamw-clip", torch.float32, True, 40), ("lamb", torch.float32, False, 40),
    ("lion", torch.float32, False, 20), ("adamw8bit", torch.float32, False, 16 + 16 / 256),
    ("lion8bit", torch.float32, False, 14 + 8 / 256),
    ("adamw", torch.bfloat16, False, 22), ("adamw-clip", torch.bfloat16, False, 24),
    ("adamw-clip", torch.bfloat16, True, 28), ("lamb", torch.bfloat16, False, 32),
    ("lion", torch.bfloat16, False, 14), ("adamw8bit", torch.bfloat16, False, 10 + 16 / 256),
    ("lion8bit", torch.bfloat16, False, 8 + 8 / 256),
])
def test_bytes_per_param_follow_the_roofline(optimizer, dtype, separate_clip, want):
    n = 1 << 20
    got = benchmarking.bytes_per_step(benchmarking.OPTIMIZERS[optimizer], ((n,),), dtype, separate_clip=separate_clip)
    assert got / n == pytest.approx(want, rel=1e-12)


def test_bytes_with_states_in_the_param_dtype_and_small_tensors():
    adamw, adamw8 = benchmarking.OPTIMIZERS["adamw"], benchmarking.OPTIMIZERS["adamw8bit"]
    assert benchmarking.bytes_per_step(adamw, ((100,),), torch.bfloat16, state_bytes=2) == 100 * 14
    # Under min_8bit_size an 8-bit optimizer keeps 32-bit states.
    assert benchmarking.bytes_per_step(adamw8, ((4095,),), torch.float32) == 4095 * 28


def test_model_shapes_have_the_advertised_sizes():
    sizes = {name: sum(torch.Size(s).numel() for s in m.full) for name, m in benchmarking.MODELS.items()}
    assert sizes == {"gpt2-124m": 124_439_808, "llama-1b": 1_235_814_400, "many-4k": 20_000 * 4096,
                     "one-82m": 20_000 * 4096}
    assert len(benchmarking.MODELS["many-4k"].full) == 20_000
    assert len(benchmarking.MODELS["one-82m"].full) == 1


def test_case_and_provider_patterns():
    names = [c.name for c in benchmarking.select_cases(["lion", "*/llama-1b/bf16"], quick=True)]
    assert "lion/gpt2-124m/fp32" in names and "lion8bit/gpt2-124m/fp32" not in names
    assert "adamw/llama-1b/bf16" in names and "adamw/llama-1b/fp32" not in names
    assert [p.name for p in benchmarking.select_providers(["torch-f*"])] == ["torch-forloop", "torch-foreach", "torch-fused",
                                                                           "torch-fused-graph"]


@pytest.mark.parametrize("argv,message", [
    (["--cases", "sgd"], "Invalid --cases pattern 'sgd'"),
    (["--providers", "apex"], "Invalid --providers pattern 'apex'"),
    (["--device", "tpu"], "Invalid --device"),
    (["--threads", "0"], "Invalid --threads"),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, message, capsys):
    assert benchmarking.main(argv) == 2
    assert message in capsys.readouterr().err


def test_list_and_schema_run_nothing(capsys):
    assert benchmarking.main(["--list", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "adamw8bit/many-4k/bf16" in out and "fusedopt-cuda" in out
    assert benchmarking.main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == benchmarking.JSON_SCHEMA


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    code = benchmarking.main(["--quick", "--device", "cpu", "--cases", "lion/gpt2-124m/fp32",
                           "--providers", "fusedopt-reference", "--plot", str(png), "--json", str(js)])
    assert code == 0
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not png.exists() and js.exists()


def _fake_run(device_name, medians):
    """A run document with ``ok`` results of the given medians: {(case, provider): ms}."""
    cases = {}
    for (case, provider), ms in medians.items():
        cases.setdefault(case, []).append(dict(provider=provider, status="ok", median_ms=ms, pct_copy=50.0))
    return dict(environment=dict(device_name=device_name),
                cases=[dict(name=c, results=rs) for c, rs in cases.items()])


def test_headlines_are_ratios_of_medians_within_a_run(tmp_path, capsys):
    run_a = _fake_run("H100", {
        ("adamw-clip/llama-1b/fp32", "torch-fused"): 30.0,
        ("adamw-clip/llama-1b/fp32", "fusedopt-triton"): 12.0,
        ("adamw-clip/llama-1b/fp32", "fusedopt-cuda"): 10.0,
        ("adamw8bit/llama-1b/bf16", "bnb-8bit"): 9.0,
        ("adamw8bit/llama-1b/bf16", "fusedopt-triton"): 4.0,
        ("adamw8bit/llama-1b/bf16", "fusedopt-cuda"): 8.0,
    })
    run_b = _fake_run("H100", {
        ("adamw/many-4k/fp32", "fusedopt-triton"): 1.3,
        ("adamw/one-82m/fp32", "fusedopt-triton"): 1.0,
        ("adamw/many-4k/fp32", "fusedopt-cuda"): 2.6,
        ("adamw/one-82m/fp32", "fusedopt-cuda"): 1.0,
    })
    text = "\n".join(benchmarking.headlines([run_a, run_b]))
    assert "2.50x torch-fused" in text and "3.00x torch-fused" in text
    assert "2.25x bnb-8bit" in text and "1.12x bnb-8bit" in text
    assert "1.30x its one-tensor time" in text and "2.60x its one-tensor time" in text
    # adam: cuda 1.2x faster on the clip case, triton 2x on many-4k, a tie on one-82m -> triton,
    # by the geometric mean (2 / 1.2) ** (1 / 3) = 1.19x
    assert re.search(r"auto adam\s+triton \(1\.19x, geometric mean of 3 cases\)", text), text
    assert re.search(r"auto adam8bit\s+triton \(2\.00x", text), text

    paths = []
    for i, doc in enumerate((run_a, run_b)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert benchmarking.main(["--headlines", *map(str, paths)]) == 0
    assert "2.50x torch-fused" in capsys.readouterr().out
    other = tmp_path / "h200.json"
    other.write_text(json.dumps(_fake_run("H200", {})))
    assert benchmarking.main(["--headlines", str(paths[0]), str(other)]) == 2
    assert "different devices" in capsys.readouterr().err


def test_table_says_what_each_row_is_and_flags_cache_resident_rows(quick_run):
    # A long provider name keeps the columns aligned; a %copy over 100 is marked with its
    # working set and explained; fusedopt's reference says it is the oracle, not a fast path.
    import copy

    _, doc, _ = quick_run
    doc = copy.deepcopy(doc)
    case = next(c for c in doc["cases"] if c["name"] == "adamw-clip/gpt2-124m/fp32")
    ref = next(r for r in case["results"] if r["provider"] == "fusedopt-reference")
    fast = dict(ref, provider="fusedopt-triton-graph", pct_copy=280.0, bytes_per_param=32.0)
    case["results"] = [r for r in case["results"] if r["provider"] != fast["provider"]] + [fast]
    text = benchmarking.format_table(doc)
    block = text.split(case["name"] + ":")[1].split("\n\n")[0].splitlines()[1:]
    assert block[0].lstrip().startswith("provider")
    starts = {line.index(" ok ") for line in block if " ok " in line}
    assert len(starts) == 1, "\n".join(block)  # the status column starts at one place
    medians = {line.index(" ok ") + len(" ok") + 10 for line in block if " ok " in line}
    row = next(line for line in block if line.lstrip().startswith("fusedopt-triton-graph "))
    assert "280.0%*" in row
    assert f"cache-resident: {32 * case['params'] / 2**20:.1f} MiB moved per step" in row
    assert "*: over 100% of the copy" in text and "not memory bandwidth" in text
    ref_row = next(line for line in block if line.lstrip().startswith("fusedopt-reference "))
    assert "the oracle, not a fast path" in ref_row
    assert len(medians) == 1


def test_plot_labels_the_reference_as_the_oracle(quick_run, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    _, doc, _ = quick_run
    labels = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, *a, **k: labels.append(k.get("label")) or real_bar(self, *a, **k))
    assert benchmarking.plot(doc, str(tmp_path / "p.png")) is None
    assert "fusedopt-reference (reference backend: the oracle, not a fast path)" in labels
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
