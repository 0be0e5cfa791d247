#!/usr/bin/env bash
# The GPU check: the numbers and tests that need a CUDA GPU, most important first, in a fixed time.
#   bash bench/gpu_check.sh           # <= 9.5 min on one H100/H200: (0) the kernel self-test,
#                                     # (a) pMF-B/16 train-step rows, (b) kernel benchmarks, memory,
#                                     # (c) GPU tests, (d) attention tiles, L/16 and H/16 rows
#   bash bench/gpu_check.sh --quick   # <= 3 min: (0) and (a) only
# Run from anywhere, on a machine with a CUDA GPU; python3 or python, whichever is there; no git
# needed (the commit: $PMF_COMMIT, or bench/results/COMMIT from `python bench/report.py --stamp` run
# before the tree is copied). Writes bench/results/<date>_<card>.{md,json,jsonl,log,selftest.json}
# (commit them) and copies them to $OUT when that is set. Each benchmark row is
# appended to the .jsonl when it is measured; the report (.md, .json) is rewritten after every stage
# and by the exit trap, so a check that is cut short or killed (TERM, INT) still leaves one.
# Knobs: PMF_GPU_CHECK_SECONDS (the whole budget; default 560, --quick 170), PMF_RESULTS_DIR,
# PMF_GPU_CHECK_DRY=1 (no GPU needed: the same stages at smoke shapes on the CPU, to test this script).
# What every row means: bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
# COLUMNS: pytest cuts -rfE's failure lines to the terminal width (80 without a terminal)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=400
py=$(command -v python3 || command -v python) || { echo "gpu_check: neither python3 nor python is on PATH"; exit 1; }

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
budget=${PMF_GPU_CHECK_SECONDS:-$((quick ? 170 : 560))}   # stages stop here; the report takes ~5 s more
b16="pMF-B/16"                                             # pytest -k over bench_train_step.py's ids
dry=${PMF_GPU_CHECK_DRY:-0} fast_lane=()
if [[ "$dry" == 1 ]]; then
    export PMF_BENCH_SMOKE=1 TRITON_INTERPRET=1
    card=cpu-dry b16="pMF-XS"                              # the smoke run's one train-step case
    fast_lane=(-m "not slow")      # the interpreter is slow: tests/test_fast_step.py alone ran past 45 s
else
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')" || exit 1
    card=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
fi
dir=${PMF_RESULTS_DIR:-bench/results}
mkdir -p "$dir"
prefix="$dir/$(date +%Y-%m-%d)_${card}$([[ $quick == 1 ]] && echo _quick)"
rows="$prefix.jsonl" log="$prefix.log"
: >"$rows"; : >"$log"
export PMF_BENCH_OUT="$rows"
start=$SECONDS child="" status="running" stage="start"

report() {   # rewrite the report from what has been written so far
    "$py" bench/report.py "$rows" "$log" "$prefix" --status "$1" --seconds $((SECONDS - start)) >/dev/null \
        2>>"$log" || echo "report.py failed: see $log"
}
finish() {
    trap - EXIT TERM INT
    if [[ -n "$child" ]]; then
        kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null
        echo "=== stopped during $stage" >>"$log"
    fi
    report "$status"
    if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then     # the GPU machine's output folder: 5 files
        cp "$prefix".{md,json,jsonl,log,selftest.json} "$OUT"/ 2>/dev/null
    fi
    cat "$prefix.md"
    echo "report: $prefix.md"
}
trap finish EXIT
trap 'status="killed (SIGTERM) during: $stage"; exit 143' TERM
trap 'status="interrupted (SIGINT) during: $stage"; exit 130' INT

# run LIMIT NAME CMD...: one command under `timeout` (cut to the budget left), its output in a section
# of $log, then the report rewritten. The command runs in the background so that a signal reaches
# the trap at once (bash runs traps only between commands).
run() {
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
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1 &
    child=$!
    wait "$child"
    rc=$?
    child=""
    # on a line of its own: a run cut by its limit leaves its last line unfinished (-v's test name)
    printf '\n=== exit %s after %s s\n' "$rc" $((SECONDS - t0)) >>"$log"
    report "running, after: $stage"
}
# run_stage LIMIT NAME PYTEST-ARGS...: one pytest process (-v: a line per test as it ends, so a stage
# cut by its limit shows how far it got; -rfE: every failure named; --durations: the slowest tests, to
# retune the limits). One process per preset for the train-step rows: each compiles its own block and
# Newton-Schulz graphs (3 block graphs per batch size, 4-5 NS shapes), within Dynamo's 8 per function.
run_stage() {
    local limit=$1 name=$2
    shift 2
    run "$limit" "$name" "$py" -m pytest -v -rfE --durations=15 -p no:cacheprovider --benchmark-disable "$@"
}

# Stage limits are each stage's cap; the budget (560 s, within a 10-minute call) cuts the later stages
# to what is left, so the attention tiles and the L/16 and H/16 rows run only on time the earlier
# stages did not use. Limits from counts: a Triton compile takes ~3 s on an H200; the self-test
# compiles ~30 kernels (attention and patch embedding per dtype and shape, Newton-Schulz, the fast
# step's), tests/test_attention.py ~46; the host-CPU memory count took 14.5 s for B/16 alone.
# (0) every kernel and the fast step against eager: a wrong kernel makes every number after it moot
run 120 "selftest" "$py" -m pmf_fast.selftest --json "$prefix.selftest.json"
# (a) the pMF-B/16 training step: every row the train-step benchmark has for B/16
run_stage 150 "train step: $b16" bench/bench_train_step.py -k "$b16"
if ((quick == 0)); then
    # (b) kernels against their baselines in the same run, then the memory count for B/16
    run_stage 55 "kernel benchmarks" bench/bench_attention.py bench/bench_newton_schulz.py bench/bench_patch_embed.py \
        -k "not tiles"
    run_stage 30 "memory benchmark: B/16" bench/bench_memory.py -k "not L/16 and not H/16"
    # (c) the GPU tests, one file at a time, each under its own limit; then every gpu-marked test
    # elsewhere (the CUDA loader, the perceptual crop's no-sync check)
    run_stage 15 "GPU tests: tests/test_newton_schulz.py" tests/test_newton_schulz.py "${fast_lane[@]}"
    run_stage 25 "GPU tests: tests/test_patch_embed.py" tests/test_patch_embed.py "${fast_lane[@]}"
    run_stage 45 "GPU tests: tests/test_fast_step.py" tests/test_fast_step.py "${fast_lane[@]}"
    run_stage 30 "GPU tests: -m gpu (data, perceptual)" tests/test_data_prepared.py tests/test_perceptual.py -m gpu
    run_stage 180 "GPU tests: tests/test_attention.py" tests/test_attention.py "${fast_lane[@]}"
    # (d) attention's candidate tiles (a compile each), then the larger presets with whatever time is left
    run_stage 40 "attention tiles" bench/bench_attention.py -k tiles
    if [[ "$dry" != 1 ]]; then                         # the smoke run has no L/16 or H/16 case
        run_stage 300 "train step: pMF-L/16" bench/bench_train_step.py -k "pMF-L/16"
        run_stage 300 "train step: pMF-H/16" bench/bench_train_step.py -k "pMF-H/16"
        run_stage 120 "memory benchmark: L/16, H/16" bench/bench_memory.py -k "L/16 or H/16"
    fi
fi
stage="end" status="complete"
