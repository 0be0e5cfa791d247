"""`pytest bench` runs the benchmarks on a CUDA GPU. Without one, the GPU benchmarks skip and the
device-independent ones (cpu_ok) run at small shapes in about a minute; `pytest bench --full` runs
those at full size (bench/README.md: time and memory). PMF_BENCH_SMOKE=1 runs every benchmark at tiny
shapes on the CPU, in Triton's interpreter, to check the code."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the device-independent benchmarks at full size on the CPU (bench/README.md)")


def pytest_configure(config):
    if config.getoption("--full"):
        os.environ["PMF_BENCH_FULL"] = "1"               # read by bench/common.py, imported after this


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("PMF_BENCH_SMOKE") == "1":
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (set PMF_BENCH_SMOKE=1 for a CPU smoke run)")
    for item in items:
        if "cpu_ok" not in item.keywords:         # device-independent measurements run anywhere
            item.add_marker(skip)
