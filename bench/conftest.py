"""`pytest bench` runs the benchmarks on a CUDA GPU and skips cleanly elsewhere
(PMF_BENCH_SMOKE=1 runs them at tiny shapes on the CPU, in Triton's interpreter, to check the code)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("PMF_BENCH_SMOKE") == "1":
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (set PMF_BENCH_SMOKE=1 for a CPU smoke run)")
    for item in items:
        if "cpu_ok" not in item.keywords:         # device-independent measurements run anywhere
            item.add_marker(skip)
