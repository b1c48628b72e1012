#!/usr/bin/env bash
# The GPU check: one call on a fresh GPU machine (python3 with torch and triton, no network) that answers every
# speed goal inside 8 minutes. docs/gpu_check.md gives the plan (which stage runs in which second on an H100)
# and which goal each row answers.
#
#   bash benchmarks/device_check.sh OUT_DIR                  # on the GPU machine
#   bash benchmarks/device_check.sh OUT_DIR --cpu-dry-run    # every stage and benchmark, tiny shapes, interpreter
#
# Stages, in order: environment; the C++/CUDA mask sampler's build (in the background, joined before e2e);
# attention; EMA and gather; the end-to-end step (a)-(d); the tests with the time left; the summary. ONE time
# budget: DEADLINE_S (470 s on a GPU) for the stages, each run under `timeout` with its share of it, capped by
# what is left; the benchmarks write each row to OUT_DIR's CSV as it is measured, so a stage stopped at its
# share keeps every finished row. A stage that fails or overruns its share prints FAILED and the script exits
# non-zero (the tests stage may stop at the budget: it reports what passed). OUT_DIR gets device_check.log,
# the CSV, summary.md and the benchmark's own summary and plots.
set -u -o pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ] || { [ $# -ge 2 ] && [ "$2" != "--cpu-dry-run" ]; }; then
    echo "usage: $0 OUT_DIR [--cpu-dry-run]" >&2
    exit 2
fi
DRY=0
[ "${2:-}" = "--cpu-dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
LOG="$OUT/device_check.log"
cd "$ROOT" || exit 2
: >"$LOG"

{  # everything below goes to the terminal and the log

export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
    PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    DEVICE=cpu
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1 IWM_FAST_TEST_THREADS=1  # 2 cores: no spinning thread pools
    DEADLINE_S=${DEADLINE_S:-900}
    SHARE_ENV=60 SHARE_ATTENTION=360 SHARE_EMA_GATHER=120 SHARE_E2E=240
    TEST_ARGS=(tests/test_attention.py tests/test_bench.py -k "far_below or tail_is_walked or traffic or reach_the_csv")
else
    PYTHON=${PYTHON:-python3}
    DEVICE=cuda
    unset TRITON_INTERPRET  # the kernels compile for the GPU
    DEADLINE_S=${DEADLINE_S:-470}
    SHARE_ENV=20 SHARE_ATTENTION=150 SHARE_EMA_GATHER=50 SHARE_E2E=220
    TEST_ARGS=(-m "not interpreter" tests/test_attention.py tests/test_block_causal.py tests/test_rope.py
               tests/test_gather.py tests/test_ema.py tests/test_ops_opcheck.py)
fi
BENCH=("$PYTHON" -m iwm_fast.bench.run --quick --device "$DEVICE" --out "$OUT" --append --no-isolate --no-plots)
STAGES=()
FAILED=0
note() { STAGES+=("$(printf '%-12s %5ss  %s' "$1" "$2" "$3")"); }
stage() { echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $*"; }

run_stage() {  # run_stage NAME SHARE_S CMD...: CMD under `timeout`, for its share or what is left if less
    local name=$1 share=$2 left limit t0 rc
    shift 2
    left=$((DEADLINE_S - SECONDS))
    limit=$((share < left ? share : left))
    if [ "$limit" -lt 5 ]; then
        echo "FAILED: $name: no time left in the budget"
        note "$name" 0 "FAILED: no time left"
        FAILED=1
        return
    fi
    stage "$name (up to $limit s)"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" = 0 ]; then
        note "$name" $((SECONDS - t0)) ok
    else
        case $rc in 124 | 137) why="overran its $limit s" ;; *) why="exit $rc" ;; esac
        echo "FAILED: $name: $why"
        note "$name" $((SECONDS - t0)) "FAILED: $why"
        FAILED=1
    fi
}

# ---- environment ----------------------------------------------------------------------------------------
environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
        --format=csv
    "$PYTHON" - <<'EOF'
import importlib.util, os, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| cpus", os.cpu_count())
import triton; print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
    from torch.nn.attention import SDPBackend
    print("sdpa backends:", ", ".join(b.name for b in SDPBackend))
missing = [m for m in ("pytest", "numpy", "yaml", "matplotlib", "sklearn", "PIL") if importlib.util.find_spec(m) is None]
print("missing python packages:", ", ".join(missing) or "none")
EOF
}
export PYTHON
export -f environment
run_stage environment "$SHARE_ENV" bash -c environment

# ---- build (background) ---------------------------------------------------------------------------------
BUILD_PID=
if [ "$DRY" = 1 ]; then
    note build 0 "skipped in the dry run"
else
    stage "build: setup.py build_ext --inplace, in the background (joined before e2e)"
    BUILD_T0=$SECONDS
    IWM_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-6} nice -n 10 "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 &
    BUILD_PID=$!
fi
join_build() {
    [ -z "$BUILD_PID" ] && return
    local waited=0
    while kill -0 "$BUILD_PID" 2>/dev/null && [ $waited -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$BUILD_PID" 2>/dev/null; then
        kill "$BUILD_PID"
        wait "$BUILD_PID" 2>/dev/null
        echo "FAILED: build: still running at e2e; e2e runs the Python mask sampler"
        note build $((SECONDS - BUILD_T0)) "FAILED: not done in time (Python mask sampler)"
        FAILED=1
    elif wait "$BUILD_PID"; then
        tail -2 "$OUT/build.log"
        note build $((SECONDS - BUILD_T0)) ok
    else
        tail -30 "$OUT/build.log"
        echo "FAILED: build (log: build.log); e2e runs the Python mask sampler"
        note build $((SECONDS - BUILD_T0)) "FAILED (Python mask sampler)"
        FAILED=1
    fi
}

# ---- benchmarks -----------------------------------------------------------------------------------------
run_stage attention "$SHARE_ATTENTION" "${BENCH[@]}" --only attention
run_stage ema+gather "$SHARE_EMA_GATHER" "${BENCH[@]}" --only ema,gather
join_build
"$PYTHON" -c "from iwm_fast.masks import _ops; print('mask sampler extension:', _ops.HAS_EXT)"
# e2e: the kernels on their pinned tiles (no autotuning inside the budget; the attention stage's autotuned row
# measures what tuning gains); compile threads from every core.
IWM_FAST_ATTN_TILES=pinned run_stage e2e "$SHARE_E2E" "${BENCH[@]}" --only e2e

# ---- tests with the time left ---------------------------------------------------------------------------
left=$((DEADLINE_S - SECONDS))
if [ "$left" -ge 20 ]; then
    stage "tests ($left s left): ${TEST_ARGS[*]}"
    t0=$SECONDS
    IWM_FAST_ATTN_TILES=pinned timeout --kill-after=10 "$left" "$PYTHON" -m pytest -p no:cacheprovider -rfE -v \
        "${TEST_ARGS[@]}" >"$OUT/tests.log" 2>&1
    rc=$?
    passed=$(grep -c " PASSED" "$OUT/tests.log")
    failed=$(grep -cE " (FAILED|ERROR)( |$)" "$OUT/tests.log")
    grep -E " (FAILED|ERROR)( |$)|^(FAILED|ERROR) " "$OUT/tests.log" | head -20
    if [ "$failed" -gt 0 ] || { [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; }; then
        echo "FAILED: tests: $failed failed (exit $rc; log: tests.log)"
        note tests $((SECONDS - t0)) "FAILED: $passed passed, $failed failed"
        FAILED=1
    elif [ "$rc" != 0 ]; then
        note tests $((SECONDS - t0)) "$passed passed, none failed; stopped at the budget"
    else
        note tests $((SECONDS - t0)) "$passed passed"
    fi
else
    note tests 0 "no time left ($left s)"
fi

# ---- summary --------------------------------------------------------------------------------------------
CSV=$(ls -t "$OUT"/*.csv 2>/dev/null | head -1)
echo
echo "=== device check finished in ${SECONDS}s (budget $DEADLINE_S s for the stages); files in $OUT:"
ls -1 "$OUT"
if [ -n "$CSV" ]; then
    echo
    timeout 60 "$PYTHON" -m iwm_fast.bench.report "$CSV" "$OUT/summary.md" || { echo "FAILED: summary"; FAILED=1; }
fi
echo
printf '%s\n' "${STAGES[@]}"
[ "$FAILED" = 0 ] && echo "device check: every stage ok" || echo "device check: FAILED (see the stages above)"
exit "$FAILED"
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
