#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100: the GPU-shape kernel tests (bf16 included), the fast
# step's parity tests, and the benchmarks (kernels, memory, whole training step), written to bench/results/<date>_<card>.{md,json} (commit them). Usage:
#   bash bench/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')" || exit 1
mkdir -p bench/results
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
prefix="bench/results/$(date +%Y-%m-%d)_${card}"
rows="$prefix.jsonl"; rm -f "$rows"

timeout 150 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_newton_schulz.py \
    tests/test_patch_embed.py tests/test_fast_step.py 2>&1 | tee "$prefix.tests.log"
summary=$(tail -n 1 "$prefix.tests.log")

# most important first: a run cut short by the timeout keeps every row written so far
PMF_BENCH_OUT="$rows" timeout 320 python -m pytest -q -p no:cacheprovider bench/bench_attention.py \
    bench/bench_newton_schulz.py bench/bench_patch_embed.py bench/bench_train_step.py bench/bench_memory.py \
    bench/bench_data.py \
    --benchmark-json="$prefix.benchmark.json" 2>&1 | tee "$prefix.bench.log"

python bench/report.py "$rows" "$summary" "$prefix"
echo "report: $prefix.md"
