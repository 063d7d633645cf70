"""The command line: `info` and `check` run and report honestly."""

import os
import re
import subprocess
import sys

import pytest
import torch

from fusedopt import build, check, cli, families
from fusedopt.progress import Progress


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fusedopt", *args], capture_output=True, text=True, timeout=900,
                          env=env)


def _plain_progress(stderr: str, what: str) -> list[tuple[int, int, str]]:
    """The plain progress lines (not a terminal) of ``what``: [(i, n, label)], checked to count
    up to a closing ``what: n/n done`` line, with no carriage returns (a log stays readable)."""
    assert "\r" not in stderr
    lines = [(int(m.group(1)), int(m.group(2)), m.group(3))
             for m in re.finditer(rf"^{what} \[(\d+)/(\d+)\] \d+s (.+)$", stderr, re.M)]
    assert lines, stderr
    assert [i for i, _, _ in lines] == sorted({i for i, _, _ in lines}), stderr
    n = lines[0][1]
    assert re.search(rf"^{what}: {n}/{n} done in \d+s$", stderr, re.M), stderr
    return lines


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
    # Not a terminal: one plain progress line per check as it starts, on stderr.
    lines = _plain_progress(out.stderr, "check")
    rows = out.stdout.count(" PASS")
    assert lines[0][2] == check._PEERS[0][1] == "reference vs torch.optim Adam, AdamW, SGD, Adagrad, RMSprop"
    assert len(lines) == lines[0][1] >= 4
    assert len(lines) == 4 + sum(" PASS" in line and "  triton " in line for line in out.stdout.splitlines()) <= rows
    # Every family, 32- and 8-bit, has a triton row: checked, or not run with resolve's reason.
    triton = [line for line in out.stdout.splitlines() if "  triton " in line]
    for config in check._CONFIGS:
        mine = [line for line in triton if line.startswith(config.label + "  ")]
        assert mine and all(line.endswith(("PASS", "not run")) for line in mine), (config.label, triton)
        if mine[0].endswith("not run"):
            assert f"triton / {config.label} / -: not run: backend 'triton' cannot run this {config.kind} step: " \
                in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a CUDA device")
@pytest.mark.parametrize("interpret", [None, "1"], ids=["plain", "TRITON_INTERPRET=1"])
def test_info_reports_what_a_users_script_sees(interpret):
    # `info` must not switch Triton's interpreter on for itself: its verdict on triton for CPU
    # tensors is what a script of the user's gets in the same environment.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    info = _run("info", env=env)
    assert info.returncode == 0, info.stderr
    verdict = re.search(r"^  triton\s+cpu\s+(\S+)", info.stdout, re.M).group(1)
    script = ("import torch, fusedopt\n"
              "p = torch.randn(300, requires_grad=True); p.grad = torch.randn(300)\n"
              "fusedopt.AdamW([p], backend='triton').step()\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert verdict == ("available" if ran.returncode == 0 else "unavailable:"), (info.stdout, ran.stderr)
    assert verdict == ("available" if interpret else "unavailable:")
    # ... and says what `check` and `bench` do differently on their own.
    assert ("set\nTRITON_INTERPRET=1 for themselves" in info.stdout) is (not interpret)


def test_check_says_it_switched_the_interpreter_on(monkeypatch, capsys):
    monkeypatch.setattr(check, "run", lambda device, progress=None: [])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "interpreter" not in out
    else:
        assert f"note: {cli.INTERPRETER_NOTE}" in out
        assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("command", ["build", "check", "bench"])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "usage: python -m fusedopt " + command in out
    assert len(out.split("\n\n")[1]) > 80  # a description, not only the usage line


def test_build_reports_each_ninja_step(monkeypatch, tmp_path, capsys):
    # The compile runs in a subprocess; a stand-in prints what ninja prints and makes the
    # library, so the progress lines can be checked without nvcc's minutes.
    fake = tmp_path / "cuda"
    monkeypatch.setattr(build, "cannot_build", lambda: None)
    monkeypatch.setattr(build, "find_cuda_home", lambda: fake)
    monkeypatch.setattr(build, "find_ninja", lambda: sys.executable)
    monkeypatch.setattr(build, "_BUILD_SCRIPT", "\n".join([
        "import json, pathlib, sys",
        "d = pathlib.Path(json.loads(sys.argv[1])['directory'])",
        "print('Emitting ninja build file')",
        "print('[1/3] /cuda/bin/nvcc -c /src/adam.cu -o adam.cuda.o')",
        "print('[2/3] c++ -c /src/ops.cpp -o ops.o')",
        "print('[3/3] c++ adam.cuda.o ops.o -shared -o fusedopt_C.so')",
        "(d / 'fusedopt_C.so').write_bytes(b'')",
    ]))
    assert build.main(["--dir", str(tmp_path / "b"), "--arch", "8.0"]) == 0
    err = capsys.readouterr().err
    lines = _plain_progress(err, "build")
    assert [label for _, _, label in lines] == ["adam.cuda.o (a few minutes in all)", "ops.o", "fusedopt_C.so"]
    assert build.ninja_step("[12/40] c++ -c x.cpp -o x.o") == (12, 40, "x.o")
    assert build.ninja_step("Building extension module fusedopt_C...") is None


def test_progress_on_a_terminal_is_a_bar(capsys):
    import io

    class Term(io.StringIO):
        def isatty(self):
            return True

    term = Term()
    with Progress(4, "check", stream=term, log=term) as progress:
        progress.start("triton: AdamW, float32")
        progress.advance()
        progress.write("a line of output")
    shown = term.getvalue()
    assert "\r" in shown and "1/4" in shown and "triton: AdamW, float32" in shown
    assert "a line of output\n" in shown
    assert "check [1/4]" not in shown  # not the plain lines


def test_check_table_marks_failures_and_exits_nonzero(monkeypatch, capsys):
    bad = check.Row("Broken vs peer", "reference", "float32", 1.0, "param 0: 3 elements out of tolerance", False)
    monkeypatch.setattr(check, "run", lambda device, progress=None: [bad])
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
    lines = _plain_progress(out.stderr, "bench")
    assert [label for _, _, label in lines] == ["adamw/gpt2-124m/fp32 torch-fused", "adamw/gpt2-124m/fp32 fusedopt-reference"]


def _fake_backend(monkeypatch, name, lr_factor, has=tuple(families.FAMILIES)):
    """Register a backend under ``name`` that is the reference with lr scaled by lr_factor,
    with a step for each family in ``has`` (default: every family of the spec)."""
    import types

    from fusedopt import backends, reference

    def wrap(family):
        def run(batch):
            group = dict(batch.group, lr=batch.group["lr"] * lr_factor)
            reference.STEPS[family](type(batch)(**{**batch.__dict__, "group": group}))
        return run

    module = types.SimpleNamespace(NAME=name, DESCRIPTION="test double", available=lambda device: None,
                                   global_norm=reference.global_norm, STEPS={f: wrap(f) for f in has})
    monkeypatch.setitem(backends.LOADERS, name, lambda: module)


@pytest.mark.parametrize("lr_factor, must_fail", [(1.0, ()), (1.01, ("float32",)), (1.1, ("float32", "bfloat16"))])
def test_check_compares_a_backend_step_by_step(monkeypatch, lr_factor, must_fail):
    # A 1% error in lr moves a bf16 param by less than its two-ulp tolerance in one step, so
    # only fp32 rows can see it; a 10% error must fail every row.
    import torch

    _fake_backend(monkeypatch, "triton", lr_factor)
    rows = check._backend_rows("triton", torch.device("cpu"))
    assert len(rows) == 2 * len(check._CONFIGS)
    # every family of the spec, 32- and 8-bit, with every state it declares
    assert {c.kind for c in check._CONFIGS} == set(families.kinds())
    for r in rows:
        if r.dtype in must_fail:
            assert r.ok is False, check.format_rows(rows)
        elif not must_fail:
            assert r.ok is True, check.format_rows(rows)


def test_check_says_which_families_a_backend_lacks(monkeypatch, capsys):
    # A backend with Lion's step only: every other family's rows say why they were not run
    # (backends.resolve's reason) and the command still passes on the rows that ran.
    _fake_backend(monkeypatch, "triton", 1.0, has=("lion",))
    rows = check._backend_rows("triton", torch.device("cpu"))
    ran = [r for r in rows if r.ok is not None]
    assert {r.check for r in ran} == {c.label for c in check._CONFIGS if c.kind.startswith("lion")}
    assert all(r.ok for r in ran) and len(ran) == 4
    for config in check._CONFIGS:
        if not config.kind.startswith("lion"):
            (row,) = [r for r in rows if r.check == config.label]
            family = config.cls._spec.name
            assert row.ok is None and row.dtype == "-"
            assert row.detail == f"not run: backend 'triton' cannot run this {config.kind} step: it has no {family} step"
    monkeypatch.setattr(check, "run", lambda device, progress=None: rows)
    assert cli.main(["check", "--device", "cpu"]) == 0
    assert f"4 passed, 0 failed, {len(rows) - 4} not run" in capsys.readouterr().out


def test_check_configs_keep_every_state():
    # Read from the spec: each family's first class with 32- and 8-bit states, every flag on
    # and a momentum where the family has one, so every declared state is kept and compared.
    for config in check._CONFIGS[:-1]:  # the last: the clip, on the flags' defaults
        family = config.cls._spec
        group = {**config.kwargs}
        for flag in ("amsgrad", "centered", "nesterov"):
            if flag in family.flags and flag in group:
                assert group[flag] is True
        opt = config.make([torch.randn(5000, requires_grad=True)], "reference")
        kept = set(family.state_names(opt.param_groups[0]))
        assert kept == {s.name for s in family.states}, config.label
    assert [c.cls.__name__ for c in check._CONFIGS[:2]] == ["Adam", "Adam8bit"]
    assert check._CONFIGS[-1].kwargs["max_grad_norm"] == 1.0
    # Each at the lr that moves a param by about check.MOVE of its size in one step.
    for config in check._CONFIGS:
        p = torch.randn(5000, generator=torch.Generator().manual_seed(1), requires_grad=True)
        p0 = p.detach().clone()
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(2))
        config.make([p], "reference").step()
        moved = float((p.detach() - p0).abs().mean() / p0.abs().mean())
        assert check.MOVE / 2 < moved < 2 * check.MOVE, (config.label, moved)


@pytest.mark.parametrize("switch", [[], pytest.param(["--full"], marks=pytest.mark.full),
                                    pytest.param("FUSEDOPT_FULL_TESTS=1", marks=pytest.mark.full)],
                         ids=["default", "--full", "env"])
def test_the_test_command_has_a_full_tier(switch):
    # A full-tier case skips by default with a reason that says how to run it, and runs with
    # --full or FUSEDOPT_FULL_TESTS=1.
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_FULL_TESTS"}
    if isinstance(switch, str):
        env[switch.split("=")[0]] = "1"
        switch = []
    case = "tests/test_backends.py::test_global_norm[fp32-inf-cpu-triton]"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", case, *switch],
                         capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if switch or "FUSEDOPT_FULL_TESTS" in env:
        assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
    else:
        assert "1 skipped" in out.stdout, out.stdout + out.stderr
        assert "full tier only: run `python -m pytest --full` (or FUSEDOPT_FULL_TESTS=1)" in out.stdout
