#!/usr/bin/env bash
# The GPU machine's package versions, on a CPU: run before each GPU window, so a version difference
# fails here and not on the card's clock (docs/testing.md).
#   bash bench/gpu_versions_lane.sh
# Makes (once; reused after) a venv with the GPU image's torch 2.11.0 and triton 3.6.0 and its test
# packages, without the ones that image lacks (lpips, torch-fidelity, DALI, flash-attn), numpy < 2.4
# (triton 3.6's interpreter fails with numpy 2.4: the GPU itself does not interpret), installs this
# project into it without its dependencies, then runs: the interpreter kernel tests, the static sm_90
# resource test, the self-test, and the GPU check's dry run. Ends with every skipped test and why.
# Knobs: PMF_LANE_VENV (default /tmp/pmf-gpu-versions-venv), PMF_LANE_DIR (logs; default a new
# folder under /tmp). Exit status: 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${PMF_LANE_VENV:-/tmp/pmf-gpu-versions-venv}
out=${PMF_LANE_DIR:-$(mktemp -d /tmp/pmf-gpu-lane.XXXXXX)}
mkdir -p "$out"
base=$(command -v python3 || command -v python) || { echo "lane: no python3 or python on PATH"; exit 1; }

# ------------------------------------------------------------ the venv (pip's own cache makes a rebuild fast)
t0=$SECONDS
if [[ ! -x "$venv/bin/python3" ]] || ! "$venv/bin/python3" -c "import torch, triton, sys
sys.exit(torch.__version__.split('+')[0] != '2.11.0' or triton.__version__ != '3.6.0')" 2>/dev/null; then
    rm -rf "$venv"
    "$base" -m venv "$venv" || exit 1
    "$venv/bin/python3" -m pip install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.4" pytest pytest-benchmark \
        timm scikit-learn scipy pillow tqdm safetensors >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
fi
"$venv/bin/python3" -m pip install -q --no-deps -e . >>"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
build=$((SECONDS - t0))
"$venv/bin/python3" -c "import torch, triton, numpy; print(f'lane: torch {torch.__version__}, triton '
    f'{triton.__version__}, numpy {numpy.__version__}')"
echo "lane: venv ready in $build s ($venv)"

# ------------------------------------------------------------ the tests, each part in its own log
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PATH="$venv/bin:$PATH"
failed=() t1=$SECONDS
part() {   # part NAME CMD...: run, keep the log, one line of result
    local name=$1 t=$SECONDS
    shift
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local summary
    summary=$(grep -E '^Status:' "$out/$name.log" | tail -1)     # the GPU check's own line, else pytest's
    [[ -n "$summary" ]] || summary=$(grep -E '[0-9]+ (passed|failed)|checks within bound' "$out/$name.log" | tail -1)
    echo "lane: $name: exit $rc after $((SECONDS - t)) s: $summary"
    ((rc == 0)) || failed+=("$name")
}
pytest_args=(-q -rs -p no:cacheprovider)
part kernels python3 -m pytest "${pytest_args[@]}" tests/test_attention.py tests/test_newton_schulz.py \
    tests/test_patch_embed.py tests/test_fast_step.py tests/test_selftest.py
part resources python3 -m pytest "${pytest_args[@]}" tests/test_kernel_resources.py
part selftest python3 -m pmf_fast.selftest --json "$out/selftest.json"
part gpu_check env PMF_GPU_CHECK_DRY=1 PMF_RESULTS_DIR="$out/results" OUT= bash bench/gpu_check.sh
grep -q "^Status: complete" "$out/gpu_check.log" || failed+=("gpu_check (not complete)")
grep -q "^No failures reported." "$out/gpu_check.log" || failed+=("gpu_check (failures reported)")
echo "lane: tests took $((SECONDS - t1)) s (venv $build s); logs in $out"

echo "lane: skipped, and why:"
# -rs lines of the test parts, -v lines of the GPU check's stages ("path::test SKIPPED (reason)")
cat "$out"/kernels.log "$out"/resources.log "$out"/results/*.log 2>/dev/null | grep -E "SKIPPED" \
    | sed -E 's/^.*SKIPPED/SKIPPED/; s/ *\[ *[0-9]+%\]$//' | sort | uniq -c
if ((${#failed[@]})); then
    echo "lane: FAILED: ${failed[*]}"
    exit 1
fi
echo "lane: all parts passed"
