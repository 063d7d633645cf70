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
