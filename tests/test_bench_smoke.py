"""`pytest bench` needs a GPU; this runs the same benchmark code at tiny shapes on the CPU
(Triton's interpreter, PMF_BENCH_SMOKE=1) so that a broken benchmark is caught before a GPU run,
and checks that without the smoke flag every benchmark skips cleanly."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, smoke, extra=()):
    env = dict(os.environ, PYTHONPATH=ROOT, PMF_BENCH_OUT=str(tmp_path / "rows.jsonl"))
    env.pop("PMF_BENCH_SMOKE", None)
    if smoke:
        env["PMF_BENCH_SMOKE"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench",
                           "--benchmark-disable", *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, bench/gpu_check.sh runs the real benchmarks")
def test_bench_skips_without_gpu(tmp_path):
    # the device-independent memory benchmark runs on the CPU at full pMF shapes: minutes, not a test
    res = run_bench(tmp_path, smoke=False, extra=["-m", "not cpu_ok"])
    assert res.returncode == 0, res.stdout[-2000:]
    assert "skipped" in res.stdout and "passed" not in res.stdout.splitlines()[-1]


def test_bench_smoke(tmp_path):
    res = run_bench(tmp_path, smoke=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "rows.jsonl")]
    groups = {r["group"] for r in rows}
    assert {"attention fwd+tangent", "attention fwd+tangent tiles", "attention fwd", "attention bwd",
            "newton-schulz pMF-B step", "patch embed (image + tangent)", "saved for backward (fp32)", "train step",
            "data loader (256 px)"} <= groups
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
