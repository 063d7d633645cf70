"""The cuda backend on the host, without a GPU: why it is unavailable, which tensors it refuses,
the argument checks of every op (each error names the argument), the tables it builds, and the
fake implementations that let torch.compile trace the ops.

A CUDA build of torch imports the extension without a GPU; the ops check every input before
they touch the device, so CPU tensors exercise all checks except "is it on the GPU" itself.
The kernels run in ``test_cuda_gpu.py`` (and the backend-agnostic grid of ``test_backends.py``).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import fusedopt
from fusedopt import backends, build, cuda_backend, quant


@pytest.fixture(scope="module")
def ops():
    """torch.ops.fusedopt, built (or found in the cache) and loaded."""
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch cannot load the extension")
    if build.prebuilt() is None and build.cached() is None and build.cannot_build() is not None:
        pytest.skip(f"the extension is not built and cannot be built here: {build.cannot_build()}")
    return cuda_backend._ops()


# --------------------------------------------------------------------------------------------
# available() and unsupported(), without loading anything
# --------------------------------------------------------------------------------------------


def test_unavailable_on_cpu_tensors():
    reason = cuda_backend.available(torch.device("cpu"))
    assert reason is not None and "cpu" in reason
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cpu tensors: .*cpu"):
        backends.resolve("cuda", torch.device("cpu"))
    assert backends.resolve("auto", torch.device("cpu")).NAME == "reference"


def test_unavailable_with_a_cpu_build_of_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in cuda_backend.available(torch.device("cuda"))
    assert "CPU build" in build.cannot_build()


def test_unavailable_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_backend.available(torch.device("cuda")) == "no CUDA device is visible"


def test_unavailable_when_not_built_and_no_nvcc(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "prebuilt", lambda: None)
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    monkeypatch.setitem(cuda_backend._loaded, "path", None)
    reason = cuda_backend.available(torch.device("cuda"))
    assert reason is not None and "not built" in reason and "nvcc not found" in reason
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.build("8.0", directory=tmp_path / "x")


def test_available_when_it_can_build(monkeypatch, tmp_path):
    if build.cannot_build() is not None:
        pytest.skip(build.cannot_build())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "prebuilt", lambda: None)
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(cuda_backend._loaded, "path", None)
    assert cuda_backend.available(torch.device("cuda")) is None  # it would build on first use


@pytest.mark.parametrize(
    "tensor, words",
    [
        (torch.zeros(4), "CUDA tensors"),
        (torch.zeros(4, device="meta", dtype=torch.float64), "float64"),
    ],
    ids=["cpu", "float64"],
)
def test_unsupported(tensor, words, monkeypatch):
    # meta tensors stand in for CUDA ones (is_cuda is all that differs)
    if tensor.device.type == "meta":
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    reason = cuda_backend.unsupported(tensor)
    assert reason is not None and words in reason


def test_supported(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert cuda_backend.unsupported(torch.zeros(3, 5, device="meta", dtype=dtype)) is None
    # any layout: dense ones as flat memory, others through copies (tests/test_layouts.py)
    assert cuda_backend.unsupported(torch.zeros(4, 4, device="meta").t()) is None
    assert cuda_backend.unsupported(torch.zeros(4, 8, device="meta")[:, ::2]) is None


def test_codebook_layout():
    book = cuda_backend.codebook(torch.device("cpu"))
    assert book.shape == (4, 256) and book.dtype == torch.float32
    assert torch.equal(book[0], quant.dynamic_map(True))
    assert torch.equal(book[1], quant.dynamic_map(False))
    assert torch.equal(book[2, :255], quant.midpoints(True)) and book[2, 255] == math.inf
    assert torch.equal(book[3, :255], quant.midpoints(False)) and book[3, 255] == math.inf


# --------------------------------------------------------------------------------------------
# The build command
# --------------------------------------------------------------------------------------------


def test_build_command_reports_the_library(ops, capsys):
    archs = build.arch_list()
    assert build.main(["--arch", archs]) == 0  # found in the cache: nothing is compiled
    out = capsys.readouterr().out
    assert str(build.library_path(build.build_dir(archs))) in out and "build.log" in out


def test_build_command_fails_cleanly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    assert build.main(["--arch", "8.0", "--dir", str(tmp_path)]) == 1
    assert "nvcc not found" in capsys.readouterr().err


def _stamp(directory, torch_version, cuda_version):
    import importlib.machinery
    import json

    (directory / "_C.build").write_text(json.dumps({"torch": torch_version, "cuda": cuda_version, "archs": "9.0"}))
    library = directory / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    library.write_bytes(b"")
    return library


def test_prebuilt_is_used_only_with_the_torch_it_was_built_for(monkeypatch, tmp_path):
    """What ``FUSEDOPT_BUILD_CUDA=1 pip install .`` leaves in the package, and what ``info`` says."""
    monkeypatch.setattr(build, "package_dir", lambda: tmp_path)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))  # an empty cache
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    assert build.prebuilt() is None
    assert build.status() == "not built, and cannot be built here: nvcc not found (install the CUDA toolkit, or set CUDA_HOME to it)"
    library = _stamp(tmp_path, torch.__version__, "13.0")
    assert build.prebuilt() == library
    assert build.status() == f"built ahead of time (FUSEDOPT_BUILD_CUDA=1 pip install): {library}"
    _stamp(tmp_path, "2.0.0", "13.0")
    assert build.prebuilt() is None
    assert "is for another torch and is not used" in build.status() and "2.0.0" in build.status()
    _stamp(tmp_path, torch.__version__, "12.8")
    assert build.prebuilt() is None


def test_arch_list_default_and_override(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.arch_list() == "8.0;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert build.arch_list() == "8.6"
    assert build.build_dir("8.6") != build.build_dir("8.0;9.0")


# --------------------------------------------------------------------------------------------
# make_table
# --------------------------------------------------------------------------------------------


def test_make_table(ops):
    chunk = ops.chunk_size(0)
    sizes = [0, 1, 255, chunk, chunk + 1, 3 * chunk + 5]
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n, dtype=torch.bfloat16) for n in sizes]
    m = [torch.zeros(n) for n in sizes]
    v = [torch.zeros(n) for n in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    base = torch.zeros(300)
    params[2] = base[1:256]  # storage offset of 4 bytes: not 16-byte aligned
    salts = [3 * i + 1 for i in range(len(sizes))]
    offsets = [0, 2**32 + 5, 7, 0, 1, 3 * chunk]
    table, work = ops.make_table(params, grads, m, v, [], [], [], [], steps, 0, salts, offsets)
    assert table.dtype == torch.int64 and table.shape == (len(sizes), ops.table_width())
    assert work.dtype == torch.int32
    for i, n in enumerate(sizes):
        row = table[i].tolist()
        assert row[0] == n
        assert row[1] == (0 if i == 2 else 1), f"alignment of tensor {i}"
        assert row[2] == 0  # float32
        assert row[3:7] == [params[i].data_ptr(), grads[i].data_ptr(), m[i].data_ptr(), v[i].data_ptr()]
        assert row[7:11] == [0, 0, 0, 0]  # no max_exp_avg_sq, no absmax
        assert row[11] == steps[i].data_ptr()
        assert row[12] == salts[i]  # what salts stochastic rounding: the param's position in its group
        assert row[13] == offsets[i]  # where a shard starts in its full param: the noise's element index
    expected = [(i, c) for i, n in enumerate(sizes) for c in range(max(1, -(-n // chunk)))]
    assert [tuple(w) for w in work.tolist()] == expected


@pytest.mark.parametrize("block_size", [32, 96, 256, 4096, 4128, 8192, 65536])
def test_make_table_8bit_chunks_hold_whole_blocks(ops, block_size):
    chunk = ops.chunk_size(block_size)
    assert chunk % block_size == 0 and chunk >= 4096
    n = 2 * chunk + 7
    p = torch.randn(n)
    blocks = quant.num_blocks(n, block_size)
    codes = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
    absmax = [torch.zeros(blocks) for _ in range(2)]
    table, work = ops.make_table([p], [p.clone()], codes[:1], codes[1:], [], absmax[:1], absmax[1:], [],
                                 [torch.zeros(())], block_size)
    assert table[0, 8].item() == absmax[0].data_ptr() and table[0, 9].item() == absmax[1].data_ptr()
    assert work.tolist() == [[0, 0], [0, 1], [0, 2]]


def test_table_is_rebuilt_when_an_address_changes(ops, monkeypatch):
    built = []

    class FakePlan:
        def __init__(self, ops_, lists, block_size, salts, device):
            built.append([t.data_ptr() for t in lists["params"]])

    monkeypatch.setattr(cuda_backend, "_Plan", FakePlan)
    params = [torch.randn(5), torch.randn(7)]
    grads = [torch.randn(5), torch.randn(7)]
    state = {"exp_avg": [torch.zeros(5), torch.zeros(7)], "exp_avg_sq": [torch.zeros(5), torch.zeros(7)]}
    batch = fusedopt.step.Batch(params, grads, state, [torch.zeros(()), torch.zeros(())],
                                     {"amsgrad": False}, torch.zeros(3))
    names = ("exp_avg", "exp_avg_sq")
    lists = cuda_backend._lists(batch, names)
    first = cuda_backend._plan(batch, lists)
    assert cuda_backend._plan(batch, lists) is first and len(built) == 1  # same addresses: cached
    batch.grads[1] = grads[1].clone()  # a new grad tensor
    lists = cuda_backend._lists(batch, names)
    assert cuda_backend._plan(batch, lists) is not first and len(built) == 2
    batch.params[0].data = torch.randn(5)  # a re-bound param
    cuda_backend._plan(batch, cuda_backend._lists(batch, names))
    assert len(built) == 3


# --------------------------------------------------------------------------------------------
# Argument checks: valid CPU arguments for each op, one defect at a time; the error names the
# argument. With no defect, the op refuses the CPU tensors, naming params[0].
# --------------------------------------------------------------------------------------------


def _batch(n_states, block_size=0, p_dtype=torch.float32, g_dtype=None, sizes=(300, 5)):
    g_dtype = g_dtype or p_dtype
    params = [torch.randn(n).to(p_dtype) for n in sizes]
    grads = [torch.randn(n).to(g_dtype) for n in sizes]
    if block_size:
        states = [[torch.zeros(n, dtype=torch.uint8) for n in sizes] for _ in range(n_states)]
        absmax = [[torch.zeros(quant.num_blocks(n, block_size)) for n in sizes] for _ in range(n_states)]
    else:
        states = [[torch.zeros(n) for n in sizes] for _ in range(n_states)]
        absmax = [[] for _ in range(n_states)]
    states += [[] for _ in range(3 - n_states)]
    absmax += [[] for _ in range(3 - n_states)]
    steps = [torch.zeros(()) for _ in sizes]
    return params, grads, states, absmax, steps


def adam_args(ops, amsgrad=False, block_size=0, **kw):
    states = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if amsgrad else 2]
    flags = ("amsgrad", "decoupled_weight_decay") if amsgrad else ("decoupled_weight_decay",)
    return elementwise_args(ops, "adam", states, block_size, flags=flags, **kw)


def lion_args(ops, block_size=0, **kw):
    return elementwise_args(ops, "lion", ("exp_avg",), block_size, **kw)


def lamb_args(ops, block_size=0, **kw):
    params, grads, states, absmax, steps = _batch(2, block_size, **kw)
    table, work = ops.make_table(params, grads, *states, *absmax, steps, block_size)
    return dict(
        params=params, grads=grads, exp_avgs=states[0], exp_avg_sqs=states[1], exp_avg_absmaxes=absmax[0],
        exp_avg_sq_absmaxes=absmax[1], steps=steps, scalars=torch.tensor([1.0, 0.0, 0.0]), table=table, work=work,
        counters=torch.zeros(len(params), dtype=torch.int32),
        codebook=cuda_backend.codebook(torch.device("cpu")) if block_size else None,
        hyper=[1e-3, 0.9, 0.999, 1e-6, 0.01], hyper_tensors=[None] * 5, bias_correction=True, block_size=block_size,
        stochastic_rounding=False, seed=0,
    )


def lamb_moments_args(ops, **kw):
    args = lamb_args(ops, **kw)
    del args["stochastic_rounding"], args["seed"]  # the moments pass writes no param
    return args


def lamb_apply_args(ops, **kw):
    args = lamb_args(ops, **kw)
    args["norms"] = torch.ones(len(args["params"]), 2)
    return args


def lars_args(ops, momentum=0.9, block_size=0, **kw):
    params, grads, states, absmax, steps = _batch(1 if momentum else 0, block_size, **kw)
    table, work = ops.make_table(params, grads, *states, *absmax, steps, block_size)
    return dict(
        params=params, grads=grads, momentum_buffers=states[0], momentum_buffer_absmaxes=absmax[0], steps=steps,
        scalars=torch.tensor([1.0, 0.0, 0.0]), table=table, work=work,
        counters=torch.zeros(len(params), dtype=torch.int32),
        codebook=cuda_backend.codebook(torch.device("cpu")) if block_size else None,
        hyper=[0.1, momentum, 0.0, 1e-4, 0.02], hyper_tensors=[None] * 5, nesterov=False, block_size=block_size,
        stochastic_rounding=False, seed=0,
    )


def lars_norms_args(ops, **kw):
    args = lars_args(ops, **kw)
    del args["stochastic_rounding"], args["seed"]  # the norms pass writes no param
    return args


def lars_apply_args(ops, **kw):
    args = lars_args(ops, **kw)
    args["norms"] = torch.ones(len(args["params"]), 2)
    return args


# The hyper-parameters of each family of elementwise_, by name.
ELEMENTWISE_HYPER = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    "lion": dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0),
    "sgd": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adagrad": dict(lr=1e-2, lr_decay=0.01, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10),
    "rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9),
}


def elementwise_args(ops, family="sgd", states=("momentum_buffer",), block_size=0, flags=(), **kw):
    params, grads, lists, absmax, steps = _batch(len(states), block_size, **kw)
    table, work = ops.make_table(params, grads, *lists, *absmax, steps, block_size)
    hyper = ELEMENTWISE_HYPER[family]
    return dict(
        family=family, params=params, grads=grads, state_names=list(states), states0=lists[0], states1=lists[1],
        states2=lists[2], absmaxes0=absmax[0], absmaxes1=absmax[1], absmaxes2=absmax[2], steps=steps,
        scalars=torch.tensor([1.0, 0.0, 0.0]), table=table, work=work,
        counters=torch.zeros(len(params), dtype=torch.int32),
        codebook=cuda_backend.codebook(torch.device("cpu")) if block_size else None,
        hyper_names=list(hyper), hyper=list(hyper.values()), hyper_tensors=[None] * len(hyper), flags=list(flags),
        block_size=block_size, stochastic_rounding=False, seed=0,
    )


_RMSPROP_ALL = dict(family="rmsprop", states=("square_avg", "momentum_buffer", "grad_avg"), flags=("centered",))


def norm_args(ops, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    tensors = [torch.randn(n).to(d) for n, d in zip((300, 5, 70000), dtypes)]
    table, work = ops.make_table(tensors, [], [], [], [], [], [], [], [], 0)
    return dict(tensors=tensors, table=table, work=work, norm_type=2.0)


def _set(args, name, index, value):
    if index is None:
        args[name] = value
    else:
        args[name] = list(args[name])
        args[name][index] = value


def _noncontiguous(n, dtype=torch.float32):
    return torch.zeros(2 * n, dtype=dtype)[::2]


# (op, argument builder and its options, the defect: argument, list index or None, new value,
#  the message expected)
INVALID = [
    ("adam", {}, ("grads", None, "drop"), r"grads has 1 tensors; expected 2"),
    ("adam", {}, ("states2", None, "zeros"), r"states2 has 2 tensors; expected 0 \(the stream is not used\)"),
    ("adam", {"amsgrad": True}, ("states2", None, "drop"), r"states2 \(max_exp_avg_sq\) has 1 tensors; expected 2"),
    ("adam", {}, ("steps", None, "drop"), r"steps has 1 tensors; expected 2"),
    ("adam", {}, ("params", 0, torch.zeros(300, dtype=torch.float64)), r"params\[0\] has dtype Double"),
    ("adam", {}, ("grads", 1, torch.zeros(5, dtype=torch.int32)), r"grads\[1\] has dtype Int"),
    ("adam", {"p_dtype": torch.bfloat16, "g_dtype": torch.float32}, None, r"params\[0\] must be a CUDA tensor"),
    ("adam", {}, ("params", 1, torch.zeros(5, dtype=torch.float16)), r"params\[1\] is Half but params\[0\] is float32"),
    ("adam", {}, ("grads", 1, torch.zeros(7)), r"grads\[1\] has 7 elements; params\[1\] has 5"),
    ("adam", {}, ("params", 1, _noncontiguous(5)), r"params\[1\] must be non-overlapping and dense"),
    ("adam", {}, ("grads", 0, _noncontiguous(300)), r"grads\[0\] must be non-overlapping and dense"),
    ("adam", {}, ("states0", 0, torch.zeros(300, dtype=torch.float16)), r"states0\[0\] \(exp_avg\) must be Float, got Half"),
    ("adam", {}, ("states1", 1, torch.zeros(6)), r"states1\[1\] \(exp_avg_sq\) has 6 elements; params\[1\] has 5"),
    ("adam", {"amsgrad": True}, ("states2", 1, _noncontiguous(5)), r"states2\[1\] \(max_exp_avg_sq\) must be non-overlapping and dense"),
    ("adam", {}, ("states0", 0, torch.zeros(20, 15).t()), r"states0\[0\] \(exp_avg\) has sizes \[15, 20\] and strides \[1, 15\] but params\[0\] has sizes \[300\] and strides \[1\]; a param's grad and states must be laid out as the param"),
    ("adam", {}, ("steps", 0, torch.zeros((), dtype=torch.int64)), r"steps\[0\] must be Float, got Long"),
    ("adam", {}, ("steps", 1, torch.zeros(2)), r"steps\[1\] must have one element, got 2"),
    ("adam", {"block_size": 256}, ("states0", 1, torch.zeros(5)), r"states0\[1\] \(exp_avg\) must be Byte, got Float"),
    ("adam", {"block_size": 256}, ("absmaxes1", 0, torch.zeros(1)), r"absmaxes1\[0\] \(exp_avg_sq\) has 1 elements; params\[0\] has 300 elements, so block_size=256 needs 2"),
    ("adam", {"block_size": 256}, ("absmaxes0", None, "drop"), r"absmaxes0 \(exp_avg\) has 1 tensors; expected 2"),
    ("adam", {"block_size": 256}, ("codebook", None, None), r"codebook is required with 8-bit states"),
    ("adam", {"block_size": 256}, ("codebook", None, torch.zeros(3, 256)), r"codebook must be a contiguous \[4, 256\] tensor"),
    ("adam", {"block_size": 256}, ("block_size", None, 100), r"block_size must be 0 \(fp32 states\) or a positive multiple of 32, got 100"),
    ("adam", {"block_size": 256}, ("block_size", None, -32), r"block_size must be .*, got -32"),
    ("adam", {}, ("scalars", None, torch.zeros(2)), r"scalars must be a contiguous tensor of 3 elements"),
    ("adam", {}, ("scalars", None, torch.zeros(3, dtype=torch.float64)), r"scalars must be Float, got Double"),
    ("adam", {}, ("table", None, torch.zeros(2, 5, dtype=torch.int64)), r"table must be a contiguous \[2, 14\] tensor"),
    ("adam", {}, ("table", None, torch.zeros(2, 13, dtype=torch.int32)), r"table must be Long, got Int"),
    ("adam", {}, ("work", None, torch.zeros(3, 2, dtype=torch.int64)), r"work must be Int, got Long"),
    ("adam", {}, ("counters", None, torch.zeros(5, dtype=torch.int32)), r"counters must be a contiguous zero-filled tensor of 2 elements"),
    ("adam", {}, ("hyper", None, [1e-3, 0.9]), r"hyper and hyper_tensors must hold 5 entries each, got 2 and 5"),
    ("adam", {}, ("hyper_tensors", 0, torch.tensor(1e-3, dtype=torch.float64)), r"hyper_tensors\[0\] \(lr\) must be Float, got Double"),
    ("adam", {}, ("hyper_tensors", 1, torch.tensor([0.9, 0.9])), r"hyper_tensors\[1\] \(beta1\) must have one element, got 2"),
    ("adam", {}, ("seed", None, 2**32), r"seed must be in \[0, 2\*\*32\), got 4294967296"),
    ("adam", {}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Float"),
    ("adam", {"p_dtype": torch.bfloat16, "block_size": 256}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("adam", {}, None, r"params\[0\] must be a CUDA tensor, got a cpu tensor"),
    ("adam", {"block_size": 256, "amsgrad": True}, None, r"params\[0\] must be a CUDA tensor"),
    ("lion", {}, ("states0", 1, torch.zeros(5, dtype=torch.float16)), r"states0\[1\] \(exp_avg\) must be Float, got Half"),
    ("lion", {}, ("hyper_tensors", 3, torch.zeros(2)), r"hyper_tensors\[3\] \(weight_decay\) must have one element"),
    ("lion", {"block_size": 64}, ("absmaxes0", 1, torch.zeros(2)), r"absmaxes0\[1\] \(exp_avg\) has 2 elements; params\[1\] has 5 elements, so block_size=64 needs 1"),
    ("lion", {"p_dtype": torch.bfloat16}, ("seed", None, -1), r"seed must be in \[0, 2\*\*32\), got -1"),
    ("lion", {"p_dtype": torch.float16}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Half"),
    ("lion", {"p_dtype": torch.bfloat16}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("lion", {}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_", {}, ("exp_avg_sqs", None, "drop"), r"exp_avg_sqs has 1 tensors; expected 2"),
    ("lamb_", {"p_dtype": torch.float16, "g_dtype": torch.bfloat16}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_", {}, ("grads", 1, torch.zeros(5, dtype=torch.bfloat16)), r"grads\[1\] is BFloat16 but grads\[0\] is float32"),
    ("lamb_", {}, ("hyper_tensors", 3, torch.tensor(1e-6, dtype=torch.float16)), r"hyper_tensors\[3\] \(eps\) must be Float"),
    ("lamb_", {}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Float"),
    ("lamb_", {"p_dtype": torch.bfloat16}, ("seed", None, 2**40), r"seed must be in \[0, 2\*\*32\)"),
    ("lamb_", {}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_moments_", {}, ("exp_avgs", None, "drop"), r"exp_avgs has 1 tensors; expected 2"),
    ("lamb_moments_", {}, ("grads", 0, torch.zeros(300, dtype=torch.float64)), r"grads\[0\] has dtype Double"),
    ("lamb_moments_", {}, ("counters", None, torch.zeros(2)), r"counters must be Int, got Float"),
    ("lamb_moments_", {"p_dtype": torch.bfloat16}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_apply_", {}, ("exp_avg_sqs", 1, torch.zeros(6)), r"exp_avg_sqs\[1\] has 6 elements; params\[1\] has 5"),
    ("lamb_apply_", {}, ("steps", None, "drop"), r"steps has 1 tensors; expected 2"),
    ("lamb_apply_", {}, ("hyper", None, [1e-3]), r"hyper and hyper_tensors must hold 5 entries each, got 1 and 5"),
    ("lamb_apply_", {}, ("norms", None, torch.ones(2, 3)), r"norms must be a contiguous \[2, 2\] tensor \(from lamb_moments_\), got \[2, 3\]"),
    ("lamb_apply_", {}, ("norms", None, torch.ones(3, 2)), r"norms must be a contiguous \[2, 2\] tensor"),
    ("lamb_apply_", {}, ("norms", None, torch.ones(2, 2).t()), r"norms must be a contiguous \[2, 2\] tensor"),
    ("lamb_apply_", {}, ("norms", None, torch.ones(2, 2, dtype=torch.float64)), r"norms must be Float, got Double"),
    ("lamb_apply_", {"p_dtype": torch.float16}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Half"),
    ("lamb_apply_", {"p_dtype": torch.bfloat16}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("lamb_apply_", {"p_dtype": torch.float16}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_", {"block_size": 256}, ("exp_avg_sq_absmaxes", None, "drop"), r"exp_avg_sq_absmaxes has 1 tensors; expected 2"),
    ("lamb_", {"block_size": 256}, ("exp_avgs", 0, torch.zeros(300)), r"exp_avgs\[0\] must be Byte, got Float"),
    ("lamb_", {"block_size": 256}, ("codebook", None, None), r"codebook is required with 8-bit states \(block_size=256\)"),
    ("lamb_", {"block_size": 64}, ("exp_avg_absmaxes", 1, torch.zeros(2)), r"exp_avg_absmaxes\[1\] has 2 elements; params\[1\] has 5 elements, so block_size=64 needs 1"),
    ("lamb_", {"block_size": 256}, ("block_size", None, 48), r"block_size must be 0 \(fp32 states\) or a positive multiple of 32, got 48"),
    ("lamb_", {"block_size": 256, "p_dtype": torch.bfloat16}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("lamb_moments_", {"block_size": 256}, ("exp_avg_sqs", 1, torch.zeros(5, dtype=torch.uint8)[None].expand(2, 5)), r"exp_avg_sqs\[1\] must be non-overlapping and dense"),
    ("lamb_moments_", {"block_size": 256}, None, r"params\[0\] must be a CUDA tensor"),
    ("lamb_apply_", {}, ("grads", None, "drop"), r"grads has 1 tensors; expected 2"),
    ("lamb_apply_", {"block_size": 256}, ("exp_avg_sq_absmaxes", 0, torch.zeros(2, dtype=torch.float16)), r"exp_avg_sq_absmaxes\[0\] must be Float, got Half"),
    ("lamb_apply_", {"block_size": 256}, None, r"params\[0\] must be a CUDA tensor"),
    ("lars_", {}, ("momentum_buffers", None, "drop"), r"momentum_buffers has 1 tensors; expected 2 \(one per param\)"),
    ("lars_", {"momentum": 0.0}, ("momentum_buffers", None, "zeros"), r"momentum_buffers has 2 tensors with momentum 0; LARS keeps a momentum buffer exactly when momentum != 0"),
    ("lars_", {}, ("momentum_buffers", None, []), r"momentum_buffers has 0 tensors with momentum 0.9; LARS keeps"),
    ("lars_", {"momentum": 0.0}, ("hyper_tensors", 1, torch.tensor([0.9])), r"params\[0\] must be a CUDA tensor"),
    ("lars_", {}, ("momentum_buffers", 1, torch.zeros(5, dtype=torch.float16)), r"momentum_buffers\[1\] must be Float, got Half"),
    ("lars_", {}, ("momentum_buffers", 0, torch.zeros(20, 15).t()), r"momentum_buffers\[0\] has sizes \[15, 20\] and strides \[1, 15\] but params\[0\] has sizes \[300\]"),
    ("lars_", {}, ("grads", 1, torch.zeros(6)), r"grads\[1\] has 6 elements; params\[1\] has 5"),
    ("lars_", {}, ("steps", 0, torch.zeros((), dtype=torch.float64)), r"steps\[0\] must be Float, got Double"),
    ("lars_", {}, ("hyper", None, [0.1, 0.9, 0.0, 0.0]), r"hyper and hyper_tensors must hold 5 entries each, got 4 and 5"),
    ("lars_", {}, ("hyper_tensors", 4, torch.tensor(0.02, dtype=torch.float64)), r"hyper_tensors\[4\] \(max_unorm\) must be Float, got Double"),
    ("lars_", {}, ("hyper_tensors", 2, torch.zeros(2)), r"hyper_tensors\[2\] \(dampening\) must have one element, got 2"),
    ("lars_", {}, ("scalars", None, torch.zeros(4)), r"scalars must be a contiguous tensor of 3 elements"),
    ("lars_", {}, ("table", None, torch.zeros(3, 14, dtype=torch.int64)), r"table must be a contiguous \[2, 14\] tensor"),
    ("lars_", {}, ("counters", None, torch.zeros(2, dtype=torch.int64)), r"counters must be Int, got Long"),
    ("lars_", {}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Float"),
    ("lars_", {"p_dtype": torch.bfloat16}, ("seed", None, -1), r"seed must be in \[0, 2\*\*32\), got -1"),
    ("lars_", {"block_size": 256}, ("momentum_buffers", 1, torch.zeros(5)), r"momentum_buffers\[1\] must be Byte, got Float"),
    ("lars_", {"block_size": 256}, ("momentum_buffer_absmaxes", None, "drop"), r"momentum_buffer_absmaxes has 1 tensors; expected 2"),
    ("lars_", {"block_size": 96}, ("momentum_buffer_absmaxes", 0, torch.zeros(3)), r"momentum_buffer_absmaxes\[0\] has 3 elements; params\[0\] has 300 elements, so block_size=96 needs 4"),
    ("lars_", {"block_size": 256}, ("codebook", None, torch.zeros(4, 255)), r"codebook must be a contiguous \[4, 256\] tensor"),
    ("lars_", {}, None, r"params\[0\] must be a CUDA tensor, got a cpu tensor"),
    ("lars_", {"momentum": 0.0, "p_dtype": torch.float16}, None, r"params\[0\] must be a CUDA tensor"),
    ("lars_", {"block_size": 256, "p_dtype": torch.bfloat16}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("lars_norms_", {}, ("grads", 0, torch.zeros(300, dtype=torch.int64)), r"grads\[0\] has dtype Long"),
    ("lars_norms_", {}, ("momentum_buffers", 1, torch.zeros(4)), r"momentum_buffers\[1\] has 4 elements; params\[1\] has 5"),
    ("lars_norms_", {"block_size": 256}, None, r"params\[0\] must be a CUDA tensor"),
    ("lars_apply_", {}, ("grads", None, "drop"), r"grads has 1 tensors; expected 2"),
    ("lars_apply_", {}, ("norms", None, torch.ones(2, 3)), r"norms must be a contiguous \[2, 2\] tensor \(from lars_norms_\), got \[2, 3\]"),
    ("lars_apply_", {}, ("norms", None, torch.ones(2, 2, dtype=torch.float16)), r"norms must be Float, got Half"),
    ("lars_apply_", {"p_dtype": torch.float16}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Half"),
    ("lars_apply_", {"momentum": 0.0}, None, r"params\[0\] must be a CUDA tensor"),
    ("lars_apply_", {"block_size": 256}, None, r"params\[0\] must be a CUDA tensor"),
    ("elementwise_", {}, ("family", None, "adamw"), r"family must be one of \[adam, lion, sgd, adagrad, rmsprop\], got 'adamw'"),
    ("elementwise_", {}, ("state_names", None, ["exp_avg"]), r"state_names \[exp_avg\] are not states of sgd; it takes \[\], \[momentum_buffer\]"),
    ("elementwise_", _RMSPROP_ALL, ("state_names", None, ["square_avg", "grad_avg", "momentum_buffer"]), r"state_names \[square_avg, grad_avg, momentum_buffer\] are not states of rmsprop; it takes \[square_avg\], \[square_avg, momentum_buffer\], \[square_avg, grad_avg\], \[square_avg, momentum_buffer, grad_avg\]"),
    ("elementwise_", {}, ("hyper_names", 1, "beta1"), r"hyper_names has 'beta1'; sgd takes \[lr, momentum, dampening, weight_decay\]"),
    ("elementwise_", {}, ("hyper_names", 1, "lr"), r"hyper_names has 'lr' more than once"),
    ("elementwise_", {"family": "adagrad", "states": ("sum",)}, ("hyper_names", None, ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "epsilon"]), r"hyper_names has 'epsilon'; adagrad takes \[lr, lr_decay, weight_decay, initial_accumulator_value, eps\]"),
    ("elementwise_", {}, ("hyper", None, [1e-2, 0.9]), r"hyper and hyper_tensors must hold 4 entries each, got 2 and 4"),
    ("elementwise_", {}, ("hyper_tensors", 2, torch.tensor(0.1, dtype=torch.float64)), r"hyper_tensors\[2\] \(dampening\) must be Float, got Double"),
    ("elementwise_", {}, ("flags", None, ["nesterov", "amsgrad"]), r"flags has 'amsgrad'; sgd takes \[nesterov, maximize\]"),
    ("elementwise_", {}, ("flags", None, ["maximize", "maximize"]), r"flags has 'maximize' more than once"),
    ("elementwise_", {"family": "adagrad", "states": ("sum",)}, ("flags", None, ["nesterov"]), r"flags has 'nesterov'; adagrad takes \[maximize\]"),
    ("elementwise_", {"states": ()}, None, r"sgd with momentum=0.9 needs momentum_buffer state"),
    ("elementwise_", {}, ("hyper", 1, 0.0), r"sgd with momentum=0 takes no momentum_buffer state"),
    ("elementwise_", {"states": ()}, ("hyper", 1, 0.0), r"params\[0\] must be a CUDA tensor"),
    ("elementwise_", {"states": (), "flags": ("nesterov",)}, ("hyper", 1, 0.0), r"sgd with nesterov needs the momentum_buffer state"),
    ("elementwise_", {**_RMSPROP_ALL, "states": ("square_avg", "grad_avg")}, None, r"rmsprop with momentum=0.9 needs momentum_buffer state"),
    ("elementwise_", _RMSPROP_ALL, ("hyper", 4, 0.0), r"rmsprop with momentum=0 takes no momentum_buffer state"),
    ("adam", {}, ("flags", None, ["amsgrad"]), r"adam with amsgrad needs the max_exp_avg_sq state"),
    ("adam", {"amsgrad": True}, ("flags", None, []), r"adam without amsgrad takes no max_exp_avg_sq state"),
    ("elementwise_", _RMSPROP_ALL, ("flags", None, ["maximize"]), r"rmsprop without centered takes no grad_avg state"),
    ("elementwise_", {**_RMSPROP_ALL, "states": ("square_avg",)}, ("hyper", 4, 0.0), r"rmsprop with centered needs the grad_avg state"),
    ("elementwise_", {"family": "adagrad", "states": ("sum",)}, ("states0", 1, torch.zeros(5, dtype=torch.float16)), r"states0\[1\] \(sum\) must be Float, got Half"),
    ("elementwise_", _RMSPROP_ALL, ("states2", None, "drop"), r"states2 \(grad_avg\) has 1 tensors; expected 2"),
    ("elementwise_", {}, ("states1", None, "zeros"), r"states1 has 2 tensors; expected 0 \(the stream is not used\)"),
    ("elementwise_", {**_RMSPROP_ALL, "block_size": 64}, ("states1", 0, torch.zeros(300)), r"states1\[0\] \(momentum_buffer\) must be Byte, got Float"),
    ("elementwise_", {**_RMSPROP_ALL, "block_size": 64}, ("absmaxes2", 1, torch.zeros(2)), r"absmaxes2\[1\] \(grad_avg\) has 2 elements; params\[1\] has 5 elements, so block_size=64 needs 1"),
    ("elementwise_", {"block_size": 256}, ("codebook", None, None), r"codebook is required with 8-bit states"),
    ("elementwise_", {"states": (), "block_size": 256}, ("hyper", 1, 0.0), r"params\[0\] must be a CUDA tensor"),
    ("elementwise_", {}, ("grads", 1, torch.zeros(7)), r"grads\[1\] has 7 elements; params\[1\] has 5"),
    ("elementwise_", {}, ("table", None, torch.zeros(2, 5, dtype=torch.int64)), r"table must be a contiguous \[2, 14\] tensor"),
    ("elementwise_", {}, ("scalars", None, torch.zeros(2)), r"scalars must be a contiguous tensor of 3 elements"),
    ("elementwise_", {}, ("stochastic_rounding", None, True), r"stochastic_rounding applies to bfloat16 params; params\[0\] is Float"),
    ("elementwise_", {"p_dtype": torch.bfloat16}, ("seed", None, -1), r"seed must be in \[0, 2\*\*32\), got -1"),
    ("elementwise_", {"p_dtype": torch.bfloat16, "block_size": 256}, ("stochastic_rounding", None, True), r"params\[0\] must be a CUDA tensor"),
    ("elementwise_", {"family": "adagrad", "states": ("sum",), "flags": ("maximize",)}, None, r"params\[0\] must be a CUDA tensor"),
    ("elementwise_", _RMSPROP_ALL, None, r"params\[0\] must be a CUDA tensor"),
    ("global_norm", {}, ("tensors", None, []), r"tensors must hold at least one tensor"),
    ("global_norm", {}, ("norm_type", None, 3.0), r"norm_type must be 1, 2 or inf, got 3"),
    ("global_norm", {}, ("tensors", 1, torch.zeros(5, dtype=torch.float64)), r"tensors\[1\] has dtype Double"),
    ("global_norm", {}, ("tensors", 2, _noncontiguous(70000)), r"tensors\[2\] must be non-overlapping and dense"),
    ("global_norm", {}, ("table", None, torch.zeros(3, 13, dtype=torch.int32)), r"table must be Long"),
    ("global_norm", {}, None, r"tensors\[0\] must be a CUDA tensor"),
]

# The builder of each row's arguments, and the op it calls.
_BUILDERS = {"adam": (adam_args, "elementwise_"), "lion": (lion_args, "elementwise_"),
             "elementwise_": (elementwise_args, "elementwise_"), "lamb_": (lamb_args, "lamb_"),
             "lamb_moments_": (lamb_moments_args, "lamb_moments_"), "lamb_apply_": (lamb_apply_args, "lamb_apply_"),
             "lars_": (lars_args, "lars_"), "lars_norms_": (lars_norms_args, "lars_norms_"),
             "lars_apply_": (lars_apply_args, "lars_apply_"), "global_norm": (norm_args, "global_norm")}


def _case_id(case):
    op, options, defect, _ = case
    what = "valid-cpu" if defect is None else f"{defect[0]}{'' if defect[1] is None else f'[{defect[1]}]'}"
    extra = "-".join(f"{k}={getattr(v, '__name__', v)}".replace("torch.", "").replace(" ", "") for k, v in options.items())
    return "-".join(filter(None, [op, what, extra]))


@pytest.mark.parametrize("case", INVALID, ids=[_case_id(c) for c in INVALID])
def test_invalid_arguments(ops, case):
    builder, options, defect, message = case
    build_args, op = _BUILDERS[builder]
    args = build_args(ops, **options)
    if defect is not None:
        name, index, value = defect
        if value == "drop":
            args[name] = args[name][:-1]
        elif value == "zeros":
            args[name] = [torch.zeros(p.shape) for p in args["params"]]
        else:
            _set(args, name, index, value)
    with pytest.raises(RuntimeError, match=f"fusedopt.{re.escape(op)}: {message}"):
        getattr(ops, op)(**args)


def test_invalid_make_table(ops):
    p = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: grads has 1 tensors; expected none or one per param \(2\)"):
        ops.make_table(p, p[:1], [], [], [], [], [], [], [], 0)
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: block_size must be .*got 48"):
        ops.make_table(p, p, [], [], [], [], [], [], [], 48)
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: salts has 1 entries; expected none or one per param \(2\)"):
        ops.make_table(p, p, [], [], [], [], [], [], [], 0, [0])
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: salts\[1\] must be in \[0, 2\*\*32\), got -1"):
        ops.make_table(p, p, [], [], [], [], [], [], [], 0, [0, -1])
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: offsets has 3 entries; expected none or one per param \(2\)"):
        ops.make_table(p, p, [], [], [], [], [], [], [], 0, [], [0, 1, 2])
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: offsets\[0\] must be >= 0, got -4"):
        ops.make_table(p, p, [], [], [], [], [], [], [], 0, [0, 1], [-4, 0])
    with pytest.raises(RuntimeError, match=r"fusedopt.make_table: params\[1\] has dtype Long"):
        ops.make_table([p[0], torch.zeros(3, dtype=torch.long)], [], [], [], [], [], [], [], [], 0)


def test_invalid_quantize(ops):
    book = cuda_backend.codebook(torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"quantize_blockwise: x must be Float, got Half"):
        ops.quantize_blockwise(torch.zeros(8, dtype=torch.float16), book, True, 256)
    with pytest.raises(RuntimeError, match=r"quantize_blockwise: block_size must be positive, got 0"):
        ops.quantize_blockwise(torch.zeros(8), book, True, 0)
    with pytest.raises(RuntimeError, match=r"quantize_blockwise: codebook must be a contiguous \[4, 256\]"):
        ops.quantize_blockwise(torch.zeros(8), book[:2], True, 256)
    with pytest.raises(RuntimeError, match=r"quantize_blockwise: x must be a CUDA tensor"):
        ops.quantize_blockwise(torch.zeros(8), book, True, 256)


def test_an_optimizer_step_on_cpu_tensors_raises_naming_the_backend():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = fusedopt.AdamW([p], backend="cuda")
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


# --------------------------------------------------------------------------------------------
# Fake implementations: the ops trace with fake CUDA tensors (what torch.compile does)
# --------------------------------------------------------------------------------------------


def test_fake_make_table_matches_the_real_one(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for block_size in (0, 96, 256):
        args = adam_args(ops, amsgrad=True, block_size=block_size, sizes=(300, 5, 70000, 0))
        names = cuda_backend._TABLE_LISTS
        real = ops.make_table(*(args[n] for n in names), block_size)
        with FakeTensorMode() as mode:
            fake = ops.make_table(*([mode.from_tensor(t) for t in args[n]] for n in names), block_size)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
        assert [t.dtype for t in fake] == [t.dtype for t in real]


def _fake_cuda(value):
    """An empty CUDA tensor (under FakeTensorMode: a fake one) shaped like ``value``; lists
    element-wise; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    if isinstance(value, list):
        return [_fake_cuda(v) for v in value]
    return value


def test_ops_run_on_fake_cuda_tensors(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = [("elementwise_", adam_args(ops, amsgrad=True, block_size=256)), ("elementwise_", lion_args(ops)),
            ("elementwise_", elementwise_args(ops, block_size=256, **_RMSPROP_ALL)), ("lamb_", lamb_args(ops)),
            ("lamb_moments_", lamb_moments_args(ops, block_size=256)), ("lamb_apply_", lamb_apply_args(ops)),
            ("lars_", lars_args(ops, block_size=256)), ("lars_norms_", lars_norms_args(ops)),
            ("lars_apply_", lars_apply_args(ops, momentum=0.0)), ("global_norm", norm_args(ops))]
    with FakeTensorMode():
        for op, args in real:
            out = getattr(ops, op)(**{k: _fake_cuda(v) for k, v in args.items()})
            if op == "global_norm":
                assert out.shape == () and out.dtype == torch.float32 and out.device.type == "cuda"
            elif op in ("lamb_moments_", "lars_norms_"):  # each tensor's sums of p^2 and u^2
                assert out.shape == (2, 2) and out.dtype == torch.float32 and out.device.type == "cuda"
            else:
                assert out is None
        codes, absmax = ops.quantize_blockwise(_fake_cuda(torch.zeros(1000)), _fake_cuda(torch.zeros(4, 256)), True, 256)
        assert codes.shape == (1000,) and codes.dtype == torch.uint8 and absmax.shape == (4,)


def test_a_step_traces_into_one_graph(ops):
    """make_fx in fake mode (what torch.compile's tracing does) records the ops themselves."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = adam_args(ops)
    names = list(args)

    def step(*values):
        kw = dict(zip(names, values))
        ops.elementwise_(**kw)
        return ops.global_norm(kw["grads"], kw["table"], kw["work"], 2.0)

    graph = make_fx(step, tracing_mode="fake")(*(args[n] for n in names))
    assert "fusedopt.elementwise_" in graph.code and "fusedopt.global_norm" in graph.code


@pytest.mark.parametrize("family, first, block_size", [("lamb", "moments_", 0), ("lars", "norms_", 256)])
def test_sharded_two_pass_traces_into_one_graph(ops, family, first, block_size):
    """The sharded LAMB / LARS path (the first pass, a sum over the shards, apply) traces as the
    ops themselves, the reduction between them (here a stand-in for the all-reduce)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = _BUILDERS[family + "_"][0](ops, block_size=block_size)
    names = list(args)

    def step(*values):
        kw = dict(zip(names, values))
        rounding = {k: kw.pop(k) for k in ("stochastic_rounding", "seed")}  # the apply pass's
        norms = getattr(ops, family + "_" + first)(**kw)
        norms = norms * 2  # what an all-reduce over two equal shards would make of them
        getattr(ops, family + "_apply_")(**kw, norms=norms, **rounding)

    graph = make_fx(step, tracing_mode="fake")(*(args[n] for n in names))
    assert f"fusedopt.{family}_{first}" in graph.code and f"fusedopt.{family}_apply_" in graph.code
