"""Images/s of the data loaders at 256 px on the same folder of JPEGs (re-encoded crops of
scikit-learn's bundled photos): DALI ("mixed" GPU decoding on a GPU, CPU decoding elsewhere) and
PIL with N workers. Compare with bench_train_step's images/s. Target on an H100 host: DALI >= 3,000
images/s per GPU. Loader throughput is a property of the host, so these also run on the CPU.
"""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench.common import SMOKE, record
from pmf_fast.data import make_loader
from pmf_fast.data.dali import HAVE_DALI

N_IMAGES = 64 if SMOKE else 1024
BATCH = 16 if SMOKE else 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from sklearn.datasets import load_sample_images
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for c in range(4):
        os.makedirs(root / f"class{c}")
    for i in range(N_IMAGES):
        ph = photos[i % 2]
        top, left = rng.integers(0, 100), rng.integers(0, 200)
        Image.fromarray(ph[top:top + 320, left:left + 420]).save(root / f"class{i % 4}" / f"{i}.jpg", quality=90)
    return str(root)


def images_per_s(loader, batches):
    next(loader)                                            # start-up outside the timing
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = next(loader)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batches * x.shape[0] / (time.perf_counter() - t0)


@pytest.mark.cpu_ok
@pytest.mark.parametrize("kind, workers", [("pil", 0), ("pil", 8)] + ([("dali", 4)] if HAVE_DALI else []))
def test_loader_throughput(benchmark, folder, kind, workers):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader, n, _ = make_loader(folder, 256, BATCH, 0, 1, 0, device, workers, kind, log=lambda s: None)
    batches = max(2, min(n // BATCH - 1, 15))
    rate = images_per_s(loader, batches)
    decoder = "mixed (GPU)" if kind == "dali" and device == "cuda" else "cpu"
    record(benchmark, "data loader (256 px)", f"{kind}, {workers} workers/threads, {decoder} decoding",
           1000.0 / rate, unit="ms/image", images_per_s=round(rate, 1), cpus=os.cpu_count())
    benchmark.pedantic(lambda: None, rounds=1)
