"""`pytest bench` as a newcomer runs it on a machine without a GPU (GPU benchmarks skip, the rest run
small, the summary comes in about a minute), and every benchmark at tiny shapes on the CPU (Triton's
interpreter, PMF_BENCH_SMOKE=1) so that a broken benchmark is caught before a GPU run."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow                  # process launches or compiles: not the fast lane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, smoke, extra=()):
    env = dict(os.environ, PYTHONPATH=ROOT, PMF_BENCH_OUT=str(tmp_path / "rows.jsonl"))
    env.pop("PMF_BENCH_SMOKE", None)
    if smoke:
        env["PMF_BENCH_SMOKE"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench",
                           "--benchmark-disable", *extra], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, bench/gpu_check.sh runs the real benchmarks")
def test_pytest_bench_as_a_newcomer_runs_it():
    """`python -m pytest bench -q` with no PMF_* or Triton variables, as in a fresh clone: without a GPU
    the GPU benchmarks skip, the device-independent ones run at small shapes, and the summary line
    comes well inside the limit (45 s on 2 cores at load 5; at full size it ran 8 minutes and was
    killed at 24 GB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMF_", "TRITON_"))}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "-rs"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    elapsed = time.perf_counter() - t0
    print(f"pytest bench: {elapsed:.0f} s\n{res.stdout[-1500:]}")
    summary = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"^=* ?\d+ passed, \d+ skipped", summary) and "failed" not in summary, summary
    assert "benchmarks need a CUDA GPU" in res.stdout and "pytest bench --full" in res.stdout   # the skips say why


def test_bench_smoke(tmp_path):
    res = run_bench(tmp_path, smoke=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "rows.jsonl")]
    groups = {r["group"] for r in rows}
    assert {"attention fwd+tangent", "attention fwd+tangent tiles", "attention fwd", "attention bwd",
            "newton-schulz pMF-B step", "patch embed (image + tangent)", "saved for backward (fp32)", "train step",
            "data loader (256 px)", "paired crop (bicubic antialias)"} <= groups
    assert all(r["ms"] > 0 and r["device"] == "cpu (smoke)" for r in rows)
    kernels = ("attention", "newton-schulz", "patch embed", "saved for backward (fp32)")
    assert all(r["baseline_ms"] > 0 for r in rows if r["group"].startswith(kernels))   # measured beside
    steps = {r["name"].split()[1] for r in rows if r["group"] == "train step"}
    assert steps == {"fast", "kernels", "eager", "reference", "fast+convnext"}     # one row per way of running it
    assert all(r["images_per_s"] > 0 and "compile_s" in r for r in rows if r["group"] == "train step")
    assert all("tflops" in r for r in rows if r["unit"] == "ms")           # every timing has its FLOP rate
    timed = [r for r in rows if r["group"].startswith(("attention", "newton-schulz", "patch embed"))]
    assert all(r["p20_ms"] <= r["ms"] <= r["p80_ms"] and "baseline_p80_ms" in r for r in timed)   # time_ms quantiles
    bwd = {r["name"].split(") ")[-1] for r in rows if r["group"] == "attention bwd"}
    assert {"torch_flash", "triton", "triton_onepass", "autograd (default: triton)"} <= bwd
