"""The whole training step (targets, JVP, loss, backward, Muon + NAdamW), one row per way of running
it, each written as soon as it is measured. bf16 autocast, 256 px, 1 GPU, perceptual losses off
unless the row says so.

    fast             explicit tangents on the Triton kernels, every block compiled (dist.compile_blocks)
    kernels          the same kernels, nothing compiled
    eager            explicit tangents in plain PyTorch (train.impl=eager)
    reference        torch.func.jvp over the primal forward, math attention, at the largest batch
                     (halving) that fits; an out-of-memory is a recorded result
    fast+convnext    fast with the ConvNeXt-V2 feature loss (random weights: speed only; real runs
                     use it for t < 0.8; LPIPS is not on the GPU image)

Each row: compile seconds (first step minus a steady one), ms/step at p20/p50/p80, images/s,
TFLOP/s from the analytic count (pmf_fast/flops.py, checked against torch.utils.flop_counter in
tests/test_flops.py), MFU against the card's bf16 GEMM rate measured in the same run, and peak
memory. MFU both ways: `mfu` counts the model's FLOPs only, `mfu_step` the whole step's (the
perceptual networks too: +94 GFLOP/image for ConvNeXt-V2-B beside pMF-B/16's 504). Targets
(H100/H200): fast >= 4x eager in images/s at B/16, MFU >= 40%, first step compiled in <= 30 s.
"""
import statistics
import time

import pytest
import torch

from bench.common import SMOKE, device, record
from pmf_fast.config import get_config
from pmf_fast.dist import parallelize
from pmf_fast.flops import step_flops, whole_step_flops
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import build_optimizers

VARIANTS = ["fast", "eager", "kernels", "reference", "fast+convnext"]   # most important first: a cut
CASES = ([("pMF-XS/4-test", 4, v) for v in VARIANTS] if SMOKE else     # check keeps the rows before it
         [("pMF-B/16", b, v) for b in (128, 64) for v in VARIANTS]
         + [("pMF-L/16", 64, "fast"), ("pMF-H/16", 32, "fast")])
_GEMM = {}
_COMPILED = {}                                  # the preset whose graphs Dynamo holds now
# the smoke run checks the code with the smallest ConvNeXt-V2 (base: 22 s of the CPU smoke run)
CONVNEXT = "convnextv2_atto" if SMOKE else "convnextv2_base"


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


def measure(preset, variant, batch, steps=8):
    """(compile s, [ms of each timed step], peak GiB) of full training steps."""
    impl = {"kernels": "fast", "fast+convnext": "fast"}.get(variant, variant)
    overrides = ["objective.lpips_weight=0", f"objective.convnext_weight={0.1 if variant == 'fast+convnext' else 0}",
                 "objective.perceptual_weights=random"]
    cfg = get_config(preset, overrides)
    m, dev = cfg.model, device()
    if _COMPILED.get("preset") != preset:
        # Dynamo keeps at most 8 graphs per function (recompile_limit) and a block graph per mode and
        # batch size: B/16's two batch sizes use 6, so L/16's would be the 9th, and the compiled
        # Newton-Schulz (4-5 shapes per preset) would fall back to eager. A new preset starts clean.
        torch._dynamo.reset()
        _COMPILED["preset"] = preset
    torch.manual_seed(0)
    model = PMFDiT(m).to(dev).set_impl(impl)
    # each variant names its own compile (train.py's comes from dist.step_settings: fast on CUDA compiles);
    # the CPU smoke run skips compiling (tests/test_compile.py covers it)
    step_model = parallelize(model, compile=variant != "kernels" and impl == "fast" and not SMOKE,
                             device=torch.device(dev))
    opts = build_optimizers(model, cfg.optim)
    perceptual = None
    if variant == "fast+convnext":
        from pmf_fast.perceptual import PerceptualLoss
        perceptual = PerceptualLoss(0.0, 0.1, "random", CONVNEXT).to(dev)
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=dev) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=dev)
    gen, cpu_gen = torch.Generator(dev).manual_seed(0), torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def one():
        t0 = time.perf_counter()
        with amp:
            loss, _ = pmf_loss(step_model, x, y, sample_draws(x, cfg.objective, gen, cpu_gen), cfg.objective,
                               m.num_classes, perceptual, impl)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) * 1e3

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = one()
    times = [one() for _ in range(1 if SMOKE else steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return max(0.0, (first - statistics.median(times)) / 1e3), times, peak


@pytest.mark.parametrize("preset, batch, variant", CASES, ids=[f"{p}-b{b}-{v}" for p, b, v in CASES])
def test_train_step(benchmark, preset, batch, variant):
    m = get_config(preset).model
    flops_img = step_flops(m).total
    flops_step = whole_step_flops(m, convnext=CONVNEXT if variant == "fast+convnext" else None)
    rate = gemm_tflops()
    b = batch
    while True:                                   # the reference halves its batch until it fits
        try:
            compile_s, times, peak = measure(preset, variant, b)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            record(benchmark, "train step", f"{preset} {variant} batch {b}: out of memory", float("nan"))
            if variant != "reference" or b == 1:
                return
            b //= 2
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    ms = statistics.median(times)
    ips = b / ms * 1e3
    record(benchmark, "train step", f"{preset} {variant} batch {b}", ms, flops_img * b,
           p20_ms=round(q[1], 3), p80_ms=round(q[7], 3), compile_s=round(compile_s, 1), images_per_s=round(ips, 1),
           peak_gib=round(peak, 2), gflop_per_image=round(flops_img / 1e9, 1),
           gemm_bf16_tflops=round(rate, 1) if rate == rate else None,
           gflop_per_image_step=round(flops_step / 1e9, 1), tflops_step=round(flops_step * ips / 1e12, 2),
           mfu=round(flops_img * ips / 1e12 / rate, 3) if rate == rate else None,
           mfu_step=round(flops_step * ips / 1e12 / rate, 3) if rate == rate else None)
    benchmark.pedantic(lambda: None, rounds=1)
