"""The benchmark harness (``python -m fusedopt bench``): the quick CPU run, its JSON against
the documented schema, the bytes each case declares, and the correctness check that keeps a
wrong provider from being timed."""

import importlib.metadata
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from fusedopt import benchmarking, families
from fusedopt.benchmarking import providers as bench_providers

ROOT = Path(__file__).resolve().parent.parent

# A cross-section of the quick suite that stays fast on two cores: both dtypes, 8-bit, clipping,
# both passes, the many-tensor model, and a provider that cannot run here. (Every optimizer's
# registry entry is checked against its peers below, on the check's small shapes.)
QUICK_CASES = ["adamw-clip/gpt2-124m/fp32", "adamw/many-4k/bf16", "lamb/llama-1b/fp32",
               "lion/gpt2-124m/bf16", "adamw8bit/llama-1b/bf16", "lion8bit/many-4k/fp32",
               "sgd-nesterov/gpt2-124m/bf16", "lars/llama-1b/fp32", "adagrad8bit/gpt2-124m/fp32"]
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


# Written out by hand from the rules (P param bytes, S = 4 per 32-bit state, k states; one
# pass 3P + 2kS; two passes 4P + 3kS, + P when the apply pass reads the grad; 8-bit one pass
# 3P + 2k + 8k/256, two passes 5P + 3k + 12k/256), not from the code under test.
ROOFLINE = {  # optimizer: (fp32, bf16)
    "adamw": (28, 22), "adamw-clip": (32, 24), "lamb": (40, 32), "lion": (20, 14),
    "sgd": (20, 14), "sgd-nesterov": (20, 14), "adagrad": (20, 14), "rmsprop": (20, 14),
    "rmsprop-centered": (36, 30), "lars": (28, 20),
    "adamw8bit": (16 + 16 / 256, 10 + 16 / 256), "lion8bit": (14 + 8 / 256, 8 + 8 / 256),
    "lamb8bit": (26 + 24 / 256, 16 + 24 / 256), "sgd8bit": (14 + 8 / 256, 8 + 8 / 256),
    "adagrad8bit": (14 + 8 / 256, 8 + 8 / 256), "rmsprop8bit": (14 + 8 / 256, 8 + 8 / 256),
    "lars8bit": (23 + 12 / 256, 13 + 12 / 256),
}


def test_every_optimizer_has_a_roofline_row():
    assert set(ROOFLINE) == set(benchmarking.OPTIMIZERS)


@pytest.mark.parametrize("optimizer", list(ROOFLINE))
def test_bytes_per_param_follow_the_roofline(optimizer):
    n = 1 << 20
    for dtype, want in zip((torch.float32, torch.bfloat16), ROOFLINE[optimizer]):
        got = benchmarking.bytes_per_step(benchmarking.OPTIMIZERS[optimizer], ((n,),), dtype)
        assert got / n == pytest.approx(want, rel=1e-12), (optimizer, dtype)
        assert benchmarking.bytes_per_param(benchmarking.OPTIMIZERS[optimizer], dtype) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype,want", [(torch.float32, 40), (torch.bfloat16, 28)])
def test_bytes_with_a_separate_clip(dtype, want):
    n = 1 << 20
    got = benchmarking.bytes_per_step(benchmarking.OPTIMIZERS["adamw-clip"], ((n,),), dtype, separate_clip=True)
    assert got / n == want


@pytest.mark.parametrize("cls,hp,states,want", [
    # the states kept follow the family's declaration, the passes its shape
    ("SGD", dict(lr=0.1), (), 12),                                     # no momentum: no state
    ("RMSprop", dict(lr=0.1, momentum=0.9), ("square_avg", "momentum_buffer"), 28),
    ("Adam", dict(lr=0.1, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), 36),
    ("LARS", dict(lr=0.1, momentum=0.9, nesterov=True), ("momentum_buffer",), 32),  # apply pass reads g
    ("LARS", dict(lr=0.1), (), 20),                                    # the update is the grad: 5P
    ("LARS8bit", dict(lr=0.1), (), 20),
])
def test_bytes_read_the_family(cls, hp, states, want):
    spec = benchmarking.OptSpec("x", cls, hp, hp)
    assert spec.states == states
    assert spec.passes == (2 if spec.spec.shape == families.TENSOR_NORM else 1)
    assert benchmarking.bytes_per_param(spec, torch.float32) == want


def test_bytes_with_states_in_the_param_dtype_and_small_tensors():
    adamw, adamw8 = benchmarking.OPTIMIZERS["adamw"], benchmarking.OPTIMIZERS["adamw8bit"]
    assert benchmarking.bytes_per_step(adamw, ((100,),), torch.bfloat16, state_bytes=2) == 100 * 14
    # Under min_8bit_size an 8-bit optimizer keeps 32-bit states (two passes: LAMB's 40).
    assert benchmarking.bytes_per_step(adamw8, ((4095,),), torch.float32) == 4095 * 28
    assert benchmarking.bytes_per_step(benchmarking.OPTIMIZERS["lamb8bit"], ((4095,),), torch.float32) == 4095 * 40
    # A short last block still has its absmax.
    assert benchmarking.bytes_per_step(adamw8, ((4097,),), torch.float32) == 4097 * 16 + 17 * 16


def test_readme_roofline_table_is_the_computed_one():
    # The README's table is `python -m fusedopt bench --roofline`, row for row.
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- roofline: python -m fusedopt bench --roofline -->\n", "\n<!-- /roofline -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == benchmarking.roofline_table()
    rows = {line.split("|")[1].strip(" `"): line.split("|")[5:7] for line in table.splitlines()[2:]}
    assert set(rows) == set(benchmarking.OPTIMIZERS)
    for name, (fp32, bf16) in rows.items():  # the hand-written figures, to 0.01
        for cell, want in zip((fp32, bf16), ROOFLINE[name]):
            assert abs(float(cell.split()[0]) - want) <= 0.005, (name, cell, want)


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
    (["--cases", "adafactor"], "Invalid --cases pattern 'adafactor'"),
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
    assert re.search(r"lars8bit/one-82m/bf16 .* 13\.\d+ B/param", out)
    assert benchmarking.main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == benchmarking.JSON_SCHEMA
    assert benchmarking.main(["--roofline"]) == 0
    assert capsys.readouterr().out == benchmarking.roofline_table() + "\n"


def test_every_family_has_cases_and_a_bench_file():
    # The families come from the spec; each has 32- and 8-bit cases, a pytest-benchmark file,
    # and its cases' kinds are the backends' kinds.
    for name, family in families.FAMILIES.items():
        mine = benchmarking.optimizers_of(name)
        assert {benchmarking.OPTIMIZERS[o].quantized for o in mine} == {False, True}, name
        assert f'fb.optimizers_of("{name}")' in (ROOT / "bench" / f"bench_{name}.py").read_text()
    for o in benchmarking.OPTIMIZERS.values():
        assert o.kind == o.spec.kind(o.quantized) and o.kind in families.kinds()
    with pytest.raises(ValueError, match="Invalid family: 'adafactor'"):
        benchmarking.optimizers_of("adafactor")


def test_peers_are_read_from_the_peer():
    # torch's providers take the cases whose fusedopt class torch.optim has, with the flag the
    # provider needs; bitsandbytes' the cases of its classes; fusedopt's every case.
    by = {p.name: set(p.optimizers) for p in benchmarking.PROVIDERS.values()}
    assert by["torch-fused"] == {"adamw", "adamw-clip", "sgd", "sgd-nesterov", "adagrad"}
    assert by["torch-foreach"] == by["torch-forloop"] == by["torch-fused"] | {"rmsprop", "rmsprop-centered"}
    assert by["torch-fused-graph"] == {"adamw", "adamw-clip"}
    assert by["bnb-8bit"] == {o for o, s in benchmarking.OPTIMIZERS.items() if s.quantized}
    assert by["bnb-32bit"] == {o for o, s in benchmarking.OPTIMIZERS.items() if not s.quantized}
    for backend in ("reference", "triton", "cuda"):
        assert by[f"fusedopt-{backend}"] == set(benchmarking.OPTIMIZERS)


def _cpu_peers():
    return [p for p in benchmarking.PROVIDERS.values()
            if not p.name.startswith("fusedopt-") and p.reason(torch.device("cpu"), True) is None]


@pytest.mark.parametrize("optimizer", list(benchmarking.OPTIMIZERS))
def test_every_optimizer_passes_the_check_against_its_cpu_peers(optimizer):
    # Each case's hyper-parameters run on every peer that has the optimizer: the peer agrees
    # with fusedopt's reference, or differs as its known_differences say (and still does), or
    # refuses the hyper-parameters with a reason; the reference agrees with itself exactly.
    cpu = torch.device("cpu")
    spec = benchmarking.OPTIMIZERS[optimizer]
    case = next(c for c in benchmarking.all_cases(quick=True) if c.optimizer is spec)
    err, _ = benchmarking.check(benchmarking.PROVIDERS["fusedopt-reference"], case, cpu, steps=2)
    assert err == 0.0
    for peer in _cpu_peers():
        if optimizer not in peer.optimizers:
            continue
        why = peer.unsupported(spec, cpu)
        if why is not None:
            assert "refuses these hyper-parameters" in why and optimizer == "rmsprop-centered", (peer.name, why)
            continue
        err, tol = benchmarking.check(peer, case, cpu, steps=3)
        if optimizer in peer.known_differences:
            assert err > tol, (peer.name, "no longer differs: drop its known difference")
        else:
            assert err <= tol, (peer.name, err, tol)  # (Lion's sign update may agree exactly)


def test_a_case_a_provider_cannot_run_is_unavailable_with_the_reason(monkeypatch):
    # A backend without the family's kernels (a stand-in that has only Lion's) is reported
    # with backends.resolve's reason, not as an error.
    import types

    from fusedopt import backends, reference

    module = types.SimpleNamespace(NAME="triton", DESCRIPTION="stand-in", available=lambda device: None,
                                   STEPS={"lion": reference.lion}, global_norm=reference.global_norm)
    monkeypatch.setitem(backends.LOADERS, "triton", lambda: module)
    cpu = torch.device("cpu")
    provider = benchmarking.PROVIDERS["fusedopt-triton"]
    assert provider.unsupported(benchmarking.OPTIMIZERS["lion8bit"], cpu) is None
    why = provider.unsupported(benchmarking.OPTIMIZERS["sgd"], cpu)
    assert why == "backend 'triton' cannot run this sgd step: it has no sgd step"
    stand_in = benchmarking.Provider("stand-in", "fusedopt's triton without SGD", ("sgd",),
                                     bench_providers._fusedopt_make("triton"),
                                     unsupported=provider.unsupported)
    case = benchmarking.select_cases(["sgd/gpt2-124m/fp32"], quick=True)[0]
    r = benchmarking.measure(stand_in, case, cpu, benchmarking.default_config(True, cpu), 1.0, quick=True)
    assert r["status"] == "unavailable" and r["reason"] == why
    assert all(r[k] is None for k in TIMINGS)


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
    # Where torch has no fused step (RMSprop), the fastest other provider; 8-bit forms of the
    # new families against bitsandbytes'; the auto table per kind, read from the family.
    run_c = _fake_run("H100", {
        ("rmsprop/gpt2-124m/fp32", "torch-forloop"): 9.0,
        ("rmsprop/gpt2-124m/fp32", "torch-foreach"): 6.0,
        ("rmsprop/gpt2-124m/fp32", "fusedopt-triton"): 2.0,
        ("sgd8bit/gpt2-124m/fp32", "bnb-8bit"): 5.0,
        ("sgd8bit/gpt2-124m/fp32", "fusedopt-triton"): 2.0,
        ("sgd8bit/gpt2-124m/fp32", "fusedopt-cuda"): 1.0,
    })
    text = "\n".join(benchmarking.headlines([run_c]))
    assert "3.00x torch-foreach" in text and "torch-forloop" not in text
    assert "2.50x bnb-8bit" in text and "5.00x bnb-8bit" in text
    assert re.search(r"auto sgd8bit\s+cuda \(2\.00x", text), text

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
