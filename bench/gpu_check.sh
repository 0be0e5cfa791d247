#!/usr/bin/env bash
# The GPU check: the numbers and tests that need a CUDA GPU, most important first, in a fixed time.
#   bash bench/gpu_check.sh           # <= 6 min on one H100/H200: (a) pMF-B/16 train-step rows,
#                                     # (b) kernel benchmarks, (c) GPU tests, (d) attention tiles,
#                                     # L/16 and H/16 rows
#   bash bench/gpu_check.sh --quick   # <= 3 min: (a) only
# Run from anywhere, on a machine with a CUDA GPU. Writes bench/results/<date>_<card>.{md,json,jsonl,log}
# (commit them) and copies them to $OUT when that is set. Each benchmark row is
# appended to the .jsonl when it is measured; the report (.md, .json) is rewritten after every stage
# and by the exit trap, so a check that is cut short or killed (TERM, INT) still leaves one.
# Knobs: PMF_GPU_CHECK_SECONDS (the whole budget; default 345, --quick 170), PMF_RESULTS_DIR,
# PMF_GPU_CHECK_DRY=1 (no GPU needed: the same stages at smoke shapes on the CPU, to test this script).
# What every row means: bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
budget=${PMF_GPU_CHECK_SECONDS:-$((quick ? 170 : 345))}   # stages stop here; the report takes ~5 s more
b16="pMF-B/16" later="pMF-L/16 or pMF-H/16"               # pytest -k over bench_train_step.py's ids
if [[ "${PMF_GPU_CHECK_DRY:-0}" == 1 ]]; then
    export PMF_BENCH_SMOKE=1 TRITON_INTERPRET=1
    card=cpu-dry b16="pMF-XS"                              # the smoke run's one train-step case
else
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')" || exit 1
    card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
fi
dir=${PMF_RESULTS_DIR:-bench/results}
mkdir -p "$dir"
prefix="$dir/$(date +%Y-%m-%d)_${card}$([[ $quick == 1 ]] && echo _quick)"
rows="$prefix.jsonl" log="$prefix.log"
: >"$rows"; : >"$log"
export PMF_BENCH_OUT="$rows"
start=$SECONDS child="" status="running" stage="start"

report() {   # rewrite the report from what has been written so far
    python bench/report.py "$rows" "$log" "$prefix" --status "$1" --seconds $((SECONDS - start)) >/dev/null \
        2>>"$log" || echo "report.py failed: see $log"
}
finish() {
    trap - EXIT TERM INT
    if [[ -n "$child" ]]; then
        kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null
        echo "=== stopped during $stage" >>"$log"
    fi
    report "$status"
    if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then     # the GPU machine's output folder: 4 files
        cp "$prefix".{md,json,jsonl,log} "$OUT"/ 2>/dev/null
    fi
    cat "$prefix.md"
    echo "report: $prefix.md"
}
trap finish EXIT
trap 'status="killed (SIGTERM) during: $stage"; exit 143' TERM
trap 'status="interrupted (SIGINT) during: $stage"; exit 130' INT

# run_stage LIMIT NAME PYTEST-ARGS...: one pytest run under `timeout` (cut to the budget left), its
# output in a section of $log (-v: a line per test as it ends, so a stage cut by its limit shows how
# far it got; -rfE: every failure named; --durations: the slowest tests, to retune the limits), then
# the report rewritten. The run is in the background so that a signal reaches the trap at once
# (bash runs traps only between commands).
run_stage() {
    local limit=$1 left=$((budget - (SECONDS - start))) t0=$SECONDS rc
    stage=$2
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 5)); then                             # the report shows it as skipped
        echo "=== $stage (limit 0 s)" >>"$log"
        echo "=== exit 124 after 0 s" >>"$log"
        return
    fi
    echo "[$((SECONDS - start)) s] $stage (limit $limit s)"
    echo "=== $stage (limit $limit s)" >>"$log"
    timeout -k 5 "$limit" python -m pytest -v -rfE --durations=15 -p no:cacheprovider --benchmark-disable "$@" \
        >>"$log" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=""
    # on a line of its own: a run cut by its limit leaves its last line unfinished (-v's test name)
    printf '\n=== exit %s after %s s\n' "$rc" $((SECONDS - t0)) >>"$log"
    report "running, after: $stage"
}

# Stage limits are each stage's cap; the budget (345 s) cuts the later stages to what is left, so the
# attention tiles and the L/16 and H/16 rows run only on time the earlier stages did not use. The
# limits are estimates (the last GPU run, on an H200, never reached a train-step row): retune them
# from the "after N s" of a complete report.
# (a) the pMF-B/16 training step: every row the train-step benchmark has for B/16
run_stage 150 "train step: $b16" bench/bench_train_step.py -k "$b16"
if ((quick == 0)); then
    # (b) kernels against their baselines in the same run, then the memory count
    run_stage 55 "kernel benchmarks" bench/bench_attention.py bench/bench_newton_schulz.py bench/bench_patch_embed.py \
        -k "not tiles"
    run_stage 10 "memory benchmark" bench/bench_memory.py
    # (c) the GPU tests, one file at a time, each under its own limit
    run_stage 45 "GPU tests: tests/test_attention.py" tests/test_attention.py
    run_stage 15 "GPU tests: tests/test_newton_schulz.py" tests/test_newton_schulz.py
    run_stage 25 "GPU tests: tests/test_patch_embed.py" tests/test_patch_embed.py
    run_stage 45 "GPU tests: tests/test_fast_step.py" tests/test_fast_step.py
    # (d) attention's candidate tiles (a compile each), then the larger presets with whatever time is left
    run_stage 40 "attention tiles" bench/bench_attention.py -k tiles
    run_stage 600 "train step: $later" bench/bench_train_step.py -k "$later"
fi
stage="end" status="complete"
