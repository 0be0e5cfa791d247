"""Shared benchmark helpers: timing with triton.testing.do_bench (CUDA events, L2 flushed),
TFLOP/s from FLOP formulas written in code, and one JSON line per measurement.

Every benchmark measures its baselines in the same run on the same card. Results go to
pytest-benchmark's extra_info (see --benchmark-json) and, when PMF_BENCH_OUT is set, to that
JSON-lines file, which bench/report.py turns into bench/results/<date>_<card>.{md,json}.
"""
import json
import os
import time

import torch

SMOKE = os.environ.get("PMF_BENCH_SMOKE") == "1"     # CPU smoke run: tiny shapes, no timing claims


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def time_ms(fn, warmup=10, rep=50):
    """Median milliseconds of fn()."""
    if SMOKE or not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def record(benchmark, group, name, ms, flops=None, baseline=None, unit="ms", **info):
    """Attach one measurement to pytest-benchmark and to $PMF_BENCH_OUT.
    baseline: (name, value) measured in the same run; the speed-up is baseline / value.
    unit: what `ms` holds when it is not a time (e.g. "MiB/image" for the memory benchmark)."""
    row = {"group": group, "name": name, "ms": round(ms, 4), "unit": unit, **info}
    if flops is not None:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
    if baseline is not None:
        row["baseline"], row["baseline_ms"] = baseline[0], round(baseline[1], 4)
        row["speedup"] = round(baseline[1] / ms, 3)
        if flops is not None:
            row["baseline_tflops"] = round(flops / (baseline[1] * 1e-3) / 1e12, 2)
    row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    benchmark.extra_info.update(row)
    path = os.environ.get("PMF_BENCH_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row
