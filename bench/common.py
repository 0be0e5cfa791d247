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
FULL = os.environ.get("PMF_BENCH_FULL") == "1"       # `pytest bench --full`: full-size CPU measurements
# Without a GPU and without --full, the device-independent benchmarks run at small shapes: at full size
# `pytest bench` ran 8 minutes on 2 cores and was killed at 24 GB (pMF-H/16's reference step).
SMALL = SMOKE or not (FULL or torch.cuda.is_available())


def ram_gib():
    """GiB of memory available now (MemAvailable; the physical total where /proc is absent)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Timing(float):
    """Milliseconds: the float is the median (what callers compare and divide), .p20 and .p80 the
    20th and 80th percentiles of the same repetitions, which record() reports beside it."""

    def __new__(cls, p20, p50, p80):
        t = super().__new__(cls, p50)
        t.p20, t.p80 = p20, p80
        return t


def time_ms(fn, warmup=10, rep=50):
    """Timing of fn(): median milliseconds with p20/p80 (triton.testing.do_bench: CUDA events,
    L2 flushed between repetitions). In a smoke run, one wall-clock call: all three are equal."""
    if SMOKE or not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return Timing(ms, ms, ms)
    import triton
    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return Timing(p20, p50, p80)


def _quantiles(prefix, t):
    if not isinstance(t, Timing):
        return {}
    return {f"{prefix}p20_ms": round(t.p20, 4), f"{prefix}p80_ms": round(t.p80, 4)}


def record(benchmark, group, name, ms, flops=None, baseline=None, unit="ms", **info):
    """Attach one measurement to pytest-benchmark and to $PMF_BENCH_OUT (one JSON line, appended and
    flushed at once, so a run cut short keeps every row measured before the cut).
    ms: a float, or a Timing from time_ms, whose p20/p80 become the row's p20_ms/p80_ms.
    baseline: (name, value) measured in the same run; the speed-up is baseline / value (medians).
    unit: what `ms` holds when it is not a time (e.g. "MiB/image" for the memory benchmark)."""
    row = {"group": group, "name": name, "ms": round(ms, 4), "unit": unit, **_quantiles("", ms), **info}
    if flops is not None:
        row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
    if baseline is not None:
        row["baseline"], row["baseline_ms"] = baseline[0], round(baseline[1], 4)
        row.update(_quantiles("baseline_", baseline[1]))
        row["speedup"] = round(baseline[1] / ms, 3)
        if flops is not None:
            row["baseline_tflops"] = round(flops / (baseline[1] * 1e-3) / 1e12, 2)
    row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else ("cpu (smoke)" if SMOKE else "cpu")
    benchmark.extra_info.update(row)
    path = os.environ.get("PMF_BENCH_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row
