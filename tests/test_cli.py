"""The command line: `info` and `check` run and report honestly."""

import subprocess
import sys

import pytest

from fusedopt import check, cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fusedopt", *args], capture_output=True, text=True, timeout=900)


def test_info_lists_every_backend():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for name in ("triton", "cuda", "reference"):
        assert f"  {name} " in out.stdout
    assert "auto on cpu: reference" in out.stdout
    assert "\ncuda extension: " in out.stdout  # where the cuda backend finds it (build.status)


def test_check_passes_on_this_machine():
    out = _run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout
    assert "FAIL" not in out.stdout


def test_check_table_marks_failures_and_exits_nonzero(monkeypatch, capsys):
    bad = check.Row("Broken vs peer", "reference", "float32", 1.0, "param 0: 3 elements out of tolerance", False)
    monkeypatch.setattr(check, "run", lambda device: [bad])
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0 passed, 1 failed" in out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_bench_is_dispatched_with_its_own_options(tmp_path):
    out = _run("bench", "--quick", "--cases", "adamw/gpt2-124m/fp32", "--providers", "torch-fused", "fusedopt-reference",
               "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "r.json").exists()
    assert "need a GPU" in out.stdout


def _fake_backend(monkeypatch, name, lr_factor):
    """Register a backend under ``name`` that is the reference with lr scaled by lr_factor."""
    import types

    from fusedopt import backends, reference

    def wrap(family):
        def run(batch):
            group = dict(batch.group, lr=batch.group["lr"] * lr_factor)
            getattr(reference, family)(type(batch)(**{**batch.__dict__, "group": group}))
        return run

    module = types.SimpleNamespace(NAME=name, DESCRIPTION="test double", available=lambda device: None,
                                   adam=wrap("adam"), lamb=wrap("lamb"), lion=wrap("lion"),
                                   global_norm=reference.global_norm)
    monkeypatch.setitem(sys.modules, "fusedopt_test_double", module)
    monkeypatch.setitem(backends._MODULES, name, "fusedopt_test_double")


@pytest.mark.parametrize("lr_factor, must_fail", [(1.0, ()), (1.01, ("float32",)), (1.1, ("float32", "bfloat16"))])
def test_check_compares_a_backend_step_by_step(monkeypatch, lr_factor, must_fail):
    # A 1% error in lr moves a bf16 param by less than its two-ulp tolerance in one step, so
    # only fp32 rows can see it; a 10% error must fail every row.
    import torch

    _fake_backend(monkeypatch, "triton", lr_factor)
    rows = check._backend_rows("triton", torch.device("cpu"))
    assert len(rows) == 2 * len(check._CONFIGS)
    for r in rows:
        if r.dtype in must_fail:
            assert r.ok is False, check.format_rows(rows)
        elif not must_fail:
            assert r.ok is True, check.format_rows(rows)
