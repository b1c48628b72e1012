#!/usr/bin/env bash
# One-call GPU check for a fresh machine with python3 + torch + triton and no network.
#
#   PYTHONPATH=. bash benchmarks/device_check.sh OUT_DIR            # on the GPU machine, from the repo root
#   bash benchmarks/device_check.sh OUT_DIR --cpu-dry-run           # same stages on the CPU, tiny selections
#
# Stages, each under `timeout` and inside one overall deadline (DEADLINE_S, default 470 s < 8 minutes):
#   1. environment report (nvidia-smi, versions);
#   2. wheels from .whl/ (if any) installed offline into a temp folder put on PYTHONPATH;
#   3. build in place: `IWM_FAST_CUDA=1 python3 setup.py build_ext --inplace` (the C++/CUDA mask sampler);
#      a failed build is logged and the run goes on with the Python fallback;
#   4. the kernel tests on CUDA (bf16 included; TRITON_INTERPRET unset, so Triton compiles for the GPU);
#   5. `python3 -m iwm_fast.bench.run --quick --device cuda --out OUT_DIR`: e2e first (the headline), attention
#      last (its autotuning is the long pole; a time limit keeps the shapes it finished); its quick set ends
#      with two rotary rows (V-JEPA 2 ViT-L at N = 2048, and the frame-causal AC predictor at N = 2064);
#   6. the rest of the test suite with the time left.
# OUT_DIR gets, flat: device_check.log, the run's CSV, _summary.md, _speedup.png and _e2e.png.
# The last lines printed are a table of the stages and the benchmark's short table.
set -u -o pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [--cpu-dry-run]" >&2
    exit 2
fi
OUT=$1
DRY=0
[ "${2:-}" = "--cpu-dry-run" ] && DRY=1
[ "${IWM_DEVICE_CHECK_CPU:-0}" = "1" ] && DRY=1
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/device_check.log"
: >"$LOG"
{  # everything below goes to the terminal and the log; the pipe makes the script wait for tee

DEADLINE_S=${DEADLINE_S:-470}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
    PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    DEVICE=cpu
    export TRITON_INTERPRET=1    # the CPU runs Triton kernels under the interpreter
    KERNEL_TESTS=${KERNEL_TESTS:-"tests/test_bench.py::test_naive_attention_matches_float64_softmax tests/test_bench.py::test_file_names_carry_date_and_gpu"}
    REST_TESTS=${REST_TESTS:-"tests/test_bench.py::test_runner_rejects_unknown_names"}
    BENCH_ONLY=${BENCH_ONLY:-masks,gather}
else
    PYTHON=${PYTHON:-python3}
    DEVICE=cuda
    unset TRITON_INTERPRET       # kernels compile for the GPU; tests/conftest.py leaves it unset with CUDA
    KERNEL_TESTS=${KERNEL_TESTS:-""}
    REST_TESTS=${REST_TESTS:-""}
    BENCH_ONLY=${BENCH_ONLY:-e2e,masks,gather,ema,attention}  # attention last: its autotuning is the long pole
fi

STAGES=()
note() { STAGES+=("$(printf '%-14s %-34s %5ss' "$1" "$2" "$3")"); }
left() { echo $((DEADLINE_S - SECONDS)); }
cap() {  # cap SECONDS RESERVE: a stage's timeout, at most SECONDS, leaving RESERVE for later stages
    local l; l=$(( $(left) - $2 ))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -lt 10 ] && l=10  # `timeout 0` would mean no limit at all
    echo "$l"
}
stage() { echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $*"; }

# ---- 1. environment -------------------------------------------------------------------------------------
stage "environment (dry run: $DRY, device: $DEVICE, python: $PYTHON)"
t0=$SECONDS
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
    --format=csv 2>&1
command -v nvcc >/dev/null && nvcc --version | tail -2
timeout 60 "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for m in ("pytest", "numpy", "yaml", "matplotlib", "sklearn", "PIL", "tensorboard", "ninja"):
    try:
        __import__(m)
    except Exception as e:
        print("missing python package:", m, f"({e})")
EOF
env_rc=$?
note environment "$([ $env_rc = 0 ] && echo ok || echo "rc $env_rc")" $((SECONDS - t0))

# ---- 2. wheels ------------------------------------------------------------------------------------------
t0=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
    stage "offline wheels from .whl/"
    SITE=$(mktemp -d /tmp/iwm_site.XXXXXX)
    if timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
        note wheels ok $((SECONDS - t0))
    else
        note wheels "FAILED (continuing)" $((SECONDS - t0))
    fi
else
    note wheels "none needed (.whl/ empty)" 0
fi

# ---- 3. build -------------------------------------------------------------------------------------------
stage "build: setup.py build_ext --inplace"
t0=$SECONDS
if [ "$DRY" = 1 ] && [ "${DRY_BUILD:-0}" != 1 ]; then
    note build "skipped in dry run (DRY_BUILD=1)" 0
else
    if [ "$DRY" = 1 ]; then  # prove the build command without touching the tree's extension
        BUILD_ARGS=(build_ext --build-lib "$(mktemp -d)" --build-temp "$(mktemp -d)")
        export IWM_FAST_CUDA=0
    else
        BUILD_ARGS=(build_ext --inplace)
        export IWM_FAST_CUDA=1
        export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    fi
    if timeout "$(cap 200 240)" "$PYTHON" setup.py "${BUILD_ARGS[@]}" >"$OUT/build.tmp" 2>&1; then
        tail -3 "$OUT/build.tmp"
        note build ok $((SECONDS - t0))
    else
        rc=$?
        tail -40 "$OUT/build.tmp"
        echo "BUILD FAILED (rc $rc): continuing with the Python mask sampler"
        note build "FAILED rc $rc (Python fallback)" $((SECONDS - t0))
    fi
    rm -f "$OUT/build.tmp"
    unset IWM_FAST_CUDA
fi
timeout 60 "$PYTHON" -c "
from iwm_fast.masks import _ops
print('extension loaded:', _ops.HAS_EXT, '| CUDA op:', _ops.cuda_available_in_ext(), '|', _ops.IMPORT_ERROR or '')"

# ---- 4. kernel tests ------------------------------------------------------------------------------------
PYTEST_ARGS=(-q -p no:cacheprovider -rfEs --durations=10)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=120)
if [ -z "$KERNEL_TESTS" ]; then
    for f in tests/test_attention.py tests/test_block_causal.py tests/test_rope.py tests/test_rope_patch.py \
             tests/test_gather.py tests/test_ema.py tests/test_masks.py tests/test_masks_ext.py tests/test_models.py; do
        [ -f "$f" ] && KERNEL_TESTS="$KERNEL_TESTS $f"
    done
fi
stage "kernel tests on $DEVICE:$KERNEL_TESTS"
t0=$SECONDS
# shellcheck disable=SC2086
timeout "$(cap 150 200)" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" $KERNEL_TESTS 2>&1 | tail -150
rc=${PIPESTATUS[0]}
note kernel-tests "$([ $rc = 0 ] && echo passed || ([ $rc = 124 ] && echo "TIMED OUT" || echo "FAILED rc $rc"))" \
    $((SECONDS - t0))

# ---- 5. benchmarks --------------------------------------------------------------------------------------
stage "benchmarks: iwm_fast.bench.run --quick --device $DEVICE --only $BENCH_ONLY"
t0=$SECONDS
BUDGET=$(cap 300 40)
timeout $((BUDGET + 15)) "$PYTHON" -m iwm_fast.bench.run --quick --device "$DEVICE" --out "$OUT" --isolate \
    --only "$BENCH_ONLY" --deadline "$BUDGET" --timeout 240
rc=$?
note benchmarks "$([ $rc = 0 ] && echo ok || echo "rc $rc")" $((SECONDS - t0))

# ---- 6. the rest of the test suite ----------------------------------------------------------------------
t0=$SECONDS
if [ -z "$REST_TESTS" ]; then
    REST_TESTS="tests"
    for f in $KERNEL_TESTS; do REST_TESTS="$REST_TESTS --ignore=$f"; done
fi
if [ "$(left)" -gt 40 ]; then
    stage "rest of the test suite ($(left) s left): $REST_TESTS"
    # shellcheck disable=SC2086
    timeout "$(cap 600 10)" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" $REST_TESTS 2>&1 | tail -80
    rc=${PIPESTATUS[0]}
    note other-tests "$([ $rc = 0 ] && echo passed || ([ $rc = 124 ] && echo "TIMED OUT" || echo "FAILED rc $rc"))" \
        $((SECONDS - t0))
else
    note other-tests "skipped: no time left" 0
fi

# ---- summary --------------------------------------------------------------------------------------------
echo
echo "=== device check finished in ${SECONDS}s; files in $OUT:"
ls -1 "$OUT"
echo
printf '%s\n' "${STAGES[@]}"
CSV=$(ls -t "$OUT"/*.csv 2>/dev/null | head -1)
if [ -n "$CSV" ]; then
    echo
    timeout 60 "$PYTHON" -m iwm_fast.bench.report "$CSV"
fi
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
