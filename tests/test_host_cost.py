"""bench/host_cost.py: the eager host-cost benchmark, run in-process without valgrind on a tiny
problem (the callgrind child is not run here: it takes minutes)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "host_cost.py"


@pytest.fixture(scope="module")
def host_cost():
    spec = importlib.util.spec_from_file_location("host_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _triton_on_cpu():
    try:
        from fusedopt.kernels import backend
    except ImportError:
        return False
    return backend.INTERPRET


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_json_has_what_it_promises(host_cost, backend, tmp_path):
    if backend == "triton" and not _triton_on_cpu():
        pytest.skip("the Triton backend reaches CPU tensors only with TRITON_INTERPRET=1")
    out = tmp_path / "hc.json"
    host_cost.main(["--tensors", "50", "--steps", "2", "--wall-steps", "2", "--warmup", "1",
                    "--backend", backend, "--no-callgrind", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["schema"] == host_cost.SCHEMA
    assert doc["config"] == {**doc["config"], "tensors": 50, "numel": 16, "dtype": "float32",
                             "optimizer": "AdamW", "backend": backend, "wall_steps": 2}
    for mode in host_cost.MODES:
        wall = doc["wall_ms"][mode]
        assert len(wall["per_step"]) == 2 and all(t > 0 for t in wall["per_step"])
        assert wall["median"] == pytest.approx(sorted(wall["per_step"])[0] / 2 + sorted(wall["per_step"])[1] / 2)
    if backend == "triton":
        # One launch (the elementwise kernel, running Adam, advancing the steps too) per step,
        # intercepted by the stub.
        assert doc["launches_per_step"] == {m: {"elementwise_kernel": 1.0} for m in host_cost.MODES}
    else:
        assert doc["launches_per_step"] == {m: {} for m in host_cost.MODES}
    assert doc["instructions"] is None
    env = doc["environment"]
    assert env["torch"] and "commit" in env and "dirty" in env and "triton" in env
    assert doc["stubbed"] and doc["counted"]


def test_stub_restores_the_kernels(host_cost):
    if not _triton_on_cpu():
        pytest.skip("the Triton backend reaches CPU tensors only with TRITON_INTERPRET=1")
    from fusedopt.kernels import common, elementwise

    before = (elementwise.elementwise_kernel, common.advance_step)
    with host_cost.stubbed_launches("triton"):
        assert elementwise.elementwise_kernel is not before[0] and common.advance_step is not before[1]
    assert (elementwise.elementwise_kernel, common.advance_step) == before


def test_parse_dumps(host_cost, tmp_path):
    (tmp_path / "callgrind.out.1").write_text(
        "version: 1\ndesc: Trigger: Client Request: same#0\nevents: Ir\nsummary: 1234\n")
    (tmp_path / "callgrind.out.2").write_text(
        "version: 1\ndesc: Trigger: Client Request: new#1\nevents: Ir\ntotals: 99\n")
    (tmp_path / "callgrind.out").write_text("version: 1\ndesc: Trigger: Program termination\nsummary: 5\n")
    assert host_cost._parse_dumps(tmp_path) == {"same#0": 1234, "new#1": 99}


def test_bad_arguments(host_cost):
    with pytest.raises(SystemExit):
        host_cost.parse_args(["--tensors", "0"])
    with pytest.raises(ValueError, match="--optimizer"):
        host_cost.measure(host_cost.parse_args(["--tensors", "2", "--optimizer", "Nope", "--backend", "reference"]),
                          host_cost._WallClock(), 1)
