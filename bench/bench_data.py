"""Images/s of the data loaders at 256 px, all rows in one run on the same images (re-encoded crops of
scikit-learn's bundled photos): the prepared loader (memory-mapped uint8 shards, pmf_fast/data/
shards.py), the PIL folder loader with N workers, and DALI (GPU decoding on a GPU, CPU decoding
elsewhere). Also the time to prepare 1,000 images and the disk bytes per image, from which the
ImageNet totals and a node's needs follow (docs/data.md). Target: prepared >= 20x the PIL loader.
Loader throughput is a property of the host, so these also run on the CPU (cpu_ok).
"""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench.common import SMALL, record
from pmf_fast.data import make_loader
from pmf_fast.data.dali import HAVE_DALI
from pmf_fast.data.prepare import prepare
from pmf_fast.data.shards import open_prepared

N_IMAGES = 64 if SMALL else 1024     # small: smoke, or a CPU without --full
BATCH = 16 if SMALL else 128
SIZE = 256
IMAGENET = 1_281_167                                 # ImageNet-1k train images
GPU_RATES = (600, 800)                               # images/s per GPU at the target step rate (B/16, >= 40% MFU)
rates = {}                                           # name -> images/s, for the speed-up rows


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


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("prepared") / "dst")
    t0 = time.perf_counter()
    prepare(folder, dst, SIZE, workers=os.cpu_count(), log=lambda s: None, progress=False)
    return dst, time.perf_counter() - t0


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
def test_prepare_time_and_sizes(benchmark, prepared):
    dst, seconds = prepared
    ds = open_prepared(dst)
    on_disk = sum(os.path.getsize(os.path.join(dst, e["file"])) for e in ds.manifest["shards"])
    per_image = on_disk / len(ds)
    record(benchmark, "prepare (256 px)", f"{os.cpu_count()} worker processes, JPEG 420x320 -> 256 px",
           seconds * 1000 / len(ds) * 1000, unit="ms/1000 images", cpus=os.cpu_count(),
           images=len(ds), bytes_per_image=round(per_image, 1),
           imagenet_gb={s: round(IMAGENET * s * s * 3 / 1e9, 1) for s in (256, 512)},
           node_8gpu_images_per_s=[8 * r for r in GPU_RATES],
           node_8gpu_gb_per_s_256px=[round(8 * r * SIZE * SIZE * 3 / 1e9, 2) for r in GPU_RATES])
    benchmark.pedantic(lambda: None, rounds=1)


ROWS = [("pil", 0), ("pil", 8)] + ([("dali", 4)] if HAVE_DALI else []) + [("prepared", 1), ("prepared", 2)]


@pytest.mark.cpu_ok
@pytest.mark.parametrize("kind, workers", ROWS)
def test_loader_throughput(benchmark, folder, prepared, kind, workers):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = prepared[0] if kind == "prepared" else folder
    loader, n, _ = make_loader(data, image_size=SIZE, batch_per_rank=BATCH, device=device, num_workers=workers,
                               loader="pil" if kind == "prepared" else kind, log=lambda s: None)
    batches = max(2, min(n // BATCH - 1, 8 if kind != "prepared" else 40))
    rate = images_per_s(loader, batches)
    rates[f"{kind}, {workers}"] = rate
    what = {"prepared": "memory-mapped uint8 shards, gather threads", "pil": "PIL decode + ADM crop, workers",
            "dali": f"DALI {'mixed (GPU)' if device == 'cuda' else 'CPU'} decoding, threads"}[kind]
    pil = max((v for k, v in rates.items() if k.startswith("pil")), default=None)
    record(benchmark, "data loader (256 px)", f"{kind}: {what} = {workers}", 1000.0 / rate, unit="ms/image",
           images_per_s=round(rate, 1), cpus=os.cpu_count(), load_avg=round(os.getloadavg()[0], 2),
           **({"speedup_vs_best_pil": round(rate / pil, 1)} if pil and kind == "prepared" else {}))
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.cpu_ok
def test_prepared_gather_throughput(benchmark, prepared):
    """The host's whole share of a GPU run on prepared data: gathering the batch's uint8 images from
    the memory-mapped shards into the (pinned) buffer; the conversion to float runs on the GPU."""
    from pmf_fast.data import ShardedBatches
    ds = open_prepared(prepared[0])
    batches = ShardedBatches(len(ds), BATCH, 0, 1, 0)
    buf = np.empty((BATCH, SIZE, SIZE, 3), np.uint8)
    ds.gather(batches.indices(0, 0).tolist(), buf)
    n = 40 if not SMALL else 3
    t0 = time.perf_counter()
    for i in range(n):
        ds.gather(batches.indices(i // batches.per_epoch, i % batches.per_epoch).tolist(), buf)
    rate = n * BATCH / (time.perf_counter() - t0)
    rates["prepared gather"] = rate
    pil = max((v for k, v in rates.items() if k.startswith("pil")), default=None)
    record(benchmark, "data loader (256 px)", "prepared: gather uint8 only (the host's share on a GPU)",
           1000.0 / rate, unit="ms/image", images_per_s=round(rate, 1), gb_per_s=round(rate * SIZE * SIZE * 3 / 1e9, 2),
           cpus=os.cpu_count(), load_avg=round(os.getloadavg()[0], 2),
           **({"speedup_vs_best_pil": round(rate / pil, 1)} if pil else {}))
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.cpu_ok
def test_prepared_speedup_over_pil(benchmark):
    """The ratio of the rows above (measured in this run): the prepared loader's best against PIL's best."""
    prep = max((v for k, v in rates.items() if k.startswith("prepared,")), default=None)
    pil = max((v for k, v in rates.items() if k.startswith("pil")), default=None)
    if prep is None or pil is None:
        pytest.skip("run with the throughput rows (pytest bench/bench_data.py)")
    record(benchmark, "data loader (256 px)", "prepared loader / PIL loader (best rows, float batches on the CPU)",
           pil / prep, unit="ratio (PIL ms / ours)", speedup=round(prep / pil, 1),
           prepared_images_per_s=round(prep, 1), pil_images_per_s=round(pil, 1),
           gather_only_speedup=round(rates.get("prepared gather", 0) / pil, 1))
    benchmark.pedantic(lambda: None, rounds=1)
