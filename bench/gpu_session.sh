#!/usr/bin/env bash
# The GPU session's runbook, in stages: what a lent H100/H200 must run, in as few device calls
# as fit the limits (10 minutes a call, 30 minutes a session, 8 files back per call).
#
#   bash bench/gpu_session.sh wheels            # here, before the first call: peers' wheels into .whl/
#
# then, on the GPU machine (the device tool's `run`, with carry [".whl"]), one call each:
#
#   bash bench/gpu_session.sh setup tests       # install, build the extension, pytest -m gpu
#   bash bench/gpu_session.sh setup large sanitizer
#   bash bench/gpu_session.sh setup bench gpt2-124m one-82m many-4k
#   bash bench/gpu_session.sh setup bench llama-1b
#   bash bench/gpu_session.sh setup bench 'sgd*/gpt2-124m/*' 'adagrad*/gpt2-124m/*'   # case globs
#   bash bench/gpu_session.sh setup example
#
# Everything a stage writes goes to $OUT (logs, JSON, PNG), which the device tool brings back;
# copy what counts into bench/results/ and commit it with the device, versions and commit
# (the JSON records them). `python -m fusedopt bench --headlines bench/results/<device>-*.json`
# then prints the goal ratios and the auto table of all of one device's runs together.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedopt-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=/tmp/fusedopt-site
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# Packages the GPU image lacks (it has torch, triton, pytest, pytest-benchmark, matplotlib,
# ninja, setuptools; nothing can be downloaded there).
WHEELS=(bitsandbytes==0.50.2 lion-pytorch==0.2.5 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py)

stage_wheels() {
    rm -rf .whl && mkdir -p .whl
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    local platforms=()
    for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    ls -la .whl
}

stage_setup() {
    if [ -d .whl ] && [ ! -d "$SITE" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"; } | tee "$OUT/device.txt"
    "$PY" -m fusedopt build 2>&1 | tail -5 | tee -a "$OUT/device.txt"
    "$PY" -m fusedopt info 2>&1 | tee -a "$OUT/device.txt"
    git rev-parse HEAD >> "$OUT/device.txt" 2>/dev/null || true
}

# pytest-timeout is in the GPU image; elsewhere the runs go without a per-test limit.
timeout_arg() { "$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=$1" || true; }

stage_tests() {
    "$PY" -m fusedopt check 2>&1 | tee "$OUT/check.txt" || echo "(check failed: see check.txt)"
    "$PY" -m fusedopt bench --quick 2>&1 | tail -40 | tee "$OUT/bench-quick.txt" || echo "(bench --quick failed)"
    "$PY" -m pytest -m "gpu and not large" -q -ra $(timeout_arg 300) -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" \
        || echo "(gpu tests failed: see gpu-tests.log; the stages after this one still run)"
}

stage_large() {
    "$PY" -m pytest -m large -q -ra $(timeout_arg 400) -p no:cacheprovider 2>&1 | tee "$OUT/large-tests.log" \
        || echo "(large tests failed: see large-tests.log)"
}

stage_sanitizer() {
    "$PY" -m pytest tests/test_cuda_gpu.py -k sanitizer -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/sanitizer.log" \
        || echo "(sanitizer tests failed: see sanitizer.log)"
}

stage_bench() {
    local models=("$@")
    [ ${#models[@]} -gt 0 ] || models=(gpt2-124m)
    local name
    name=$(IFS=-; echo "${models[*]}")
    local cases=()
    # A model name runs every optimizer on it; an optimizer/model/dtype glob (with a /) runs
    # those cases only, e.g. 'sgd*/gpt2-124m/*' 'lars*/*/fp32' for new families within a call.
    for m in "${models[@]}"; do [[ $m == */* ]] && cases+=("$m") || cases+=("*/$m/*"); done
    name=${name//[^A-Za-z0-9_.-]/_}
    "$PY" -m fusedopt bench --cases "${cases[@]}" --json "$OUT/bench-$name.json" --plot "$OUT/bench-$name.png" \
        2>&1 | tee "$OUT/bench-$name.txt"
}

stage_example() {
    "$PY" examples/finetune.py --amp --out "$OUT/example" 2>&1 | tee "$OUT/example.log"
}

[ $# -gt 0 ] || { sed -n '2,18p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
    stage=$1
    shift
    case "$stage" in
        wheels|setup|tests|large|sanitizer|example) "stage_$stage" ;;
        bench)
            args=()
            while [ $# -gt 0 ] && [[ "$1" != wheels && "$1" != setup && "$1" != tests && "$1" != large \
                  && "$1" != sanitizer && "$1" != example && "$1" != bench ]]; do
                args+=("$1")
                shift
            done
            stage_bench "${args[@]}"
            ;;
        *) echo "unknown stage: $stage" >&2; exit 2 ;;
    esac
done
