"""The whole training step (targets, JVP, loss, backward, Muon + AdamW): fast against reference
eager and reference compiled, measured in the same run. bf16 autocast, 256 px, 1 GPU.
Reports ms/step, images/s, achieved TFLOP/s from the analytic count (pmf_fast/flops.py, checked
against torch.utils.flop_counter in tests/test_flops.py) and MFU against the card's bf16 GEMM rate
measured in the same run. Targets (H100): fast >= 3x reference eager and >= 1.5x reference
compiled in images/s; MFU >= 40%.
"""
import time

import pytest
import torch

from bench.common import SMOKE, device, record
from pmf_fast.config import get_config
from pmf_fast.flops import step_flops
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.muon import build_optimizers

CASES = [("pMF-XS/4-test", 4)] if SMOKE else [("pMF-B/16", 128), ("pMF-L/16", 64)]
IMPLS = ["fast", "reference", "reference-compiled"]
_GEMM = {}


def gemm_tflops():
    """The card's dense bf16 GEMM rate (8192^3), measured once per run."""
    if "rate" not in _GEMM:
        if SMOKE or not torch.cuda.is_available():
            _GEMM["rate"] = float("nan")
        else:
            import triton
            a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
            _GEMM["rate"] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    return _GEMM["rate"]


def step_ms(preset, impl, batch, steps=10, warmup=3):
    """Median-free mean ms of `steps` full steps after `warmup` (compile happens in warm-up)."""
    cfg = get_config(preset, ["objective.lpips_weight=0", "objective.convnext_weight=0"])
    m, dev = cfg.model, device()
    torch.manual_seed(0)
    model = PMFDiT(m).to(dev).set_impl("fast" if impl == "fast" else "eager")
    opts = build_optimizers(model, cfg.optim)
    jvp = "fast" if impl == "fast" else "reference"
    loss_fn = pmf_loss if (impl == "reference" or SMOKE) else torch.compile(pmf_loss)
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=dev) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda")

    def one():
        with amp:
            loss, _ = loss_fn(model, x, y, sample_draws(x, cfg.objective, gen), cfg.objective, m.num_classes, None, jvp)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    for _ in range(1 if SMOKE else warmup):
        one()
    if dev == "cuda":
        torch.cuda.synchronize()
    n = 1 if SMOKE else steps
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def fitting_batch(preset, impl, batch):
    """Largest batch <= `batch` (halving) that fits, with its ms/step."""
    while batch >= 1:
        try:
            return batch, step_ms(preset, impl, batch)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"{preset} {impl}: not even batch 1 fits")


@pytest.mark.parametrize("preset, batch", CASES, ids=[c[0] for c in CASES])
def test_train_step(benchmark, preset, batch):
    flops_img = step_flops(get_config(preset).model).total
    rate = gemm_tflops()
    results = {}
    for impl in IMPLS:                  # a failing baseline (e.g. compile of torch.func.jvp) is reported, not fatal
        try:
            results[impl] = fitting_batch(preset, impl, batch)
        except Exception as e:
            if impl == "fast":
                raise
            record(benchmark, "train step", f"{preset} {impl}: failed", float("nan"),
                   error=f"{type(e).__name__}: {str(e)[:200]}")
    b_fast, ms_fast = results["fast"]
    for impl in [i for i in ("reference", "reference-compiled") if i in results]:
        b, ms = results[impl]
        ips_fast, ips = b_fast / ms_fast * 1e3, b / ms * 1e3
        # speed-up in images/s (batches may differ when the reference needs a smaller one to fit)
        record(benchmark, "train step", f"{preset} fast (batch {b_fast}) vs {impl} (batch {b})",
               ms_fast, flops_img * b_fast, (impl, ms * b_fast / b),
               images_per_s=round(ips_fast, 1), baseline_images_per_s=round(ips, 1),
               gemm_bf16_tflops=round(rate, 1) if rate == rate else None,
               mfu=round(flops_img * ips_fast / 1e12 / rate, 3) if rate == rate else None,
               gflop_per_image=round(flops_img / 1e9, 1))
    benchmark.pedantic(lambda: None, rounds=1)
