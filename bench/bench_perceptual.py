"""The perceptual losses.

test_paired_crop: pmf_fast.perceptual.crop_resize (two batched matmuls per image, taps built on the
host) against crop_resize_ref (per sample the dense resampling matrices from the official formula),
forward on both images and backward for the first, at batch 128, 256 px -> 224 (small run: batch
8). Each row also carries the launch count of each path from torch.profiler: on a GPU its CUDA
kernel and copy events; on the CPU the aten operators that would launch one (leaf operators that
are not views or allocations), less those of the host-side window draws and tap building.
TFLOP/s: the matmul path's FLOPs (pmf_fast/flops.py crop_flops), for both rows.

test_perceptual_share_of_step: one training step (pmf_loss forward and backward, eager) without the
perceptual terms, with them on every sample then masked by t (as the official code), and with them
on the kept samples only (t < 0.8, gathered), at the B/16 time sampler; the share of the step the
perceptual terms take, before and after. GPU: pMF-B/16, batch 32, LPIPS-VGG and ConvNeXt-V2-B at
224, bf16 autocast. CPU: pMF-T/4-digits at 64 px RGB, batch 16, LPIPS-VGG and ConvNeXt-V2-atto at
32 px (the perceptual FLOPs per sample 0.32x the model's per image; B/16's ratio is 0.37).
Both device-independent (cpu_ok).
"""
import statistics
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import SMALL, SMOKE, device, record, time_ms
from pmf_fast.config import get_config
from pmf_fast.flops import crop_flops, kept_fraction, perceptual_flops, step_flops
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.perceptual import PerceptualLoss, crop_resize, crop_resize_ref, crop_windows, resize_weights

BATCH, SIZE, OUT = (8 if SMALL else 128), 256, 224
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
             "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::unsqueeze",
             "aten::squeeze", "aten::select", "aten::slice", "aten::transpose", "aten::t", "aten::permute",
             "aten::detach", "aten::alias", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
             "aten::split", "aten::unbind", "aten::item", "aten::_local_scalar_dense", "aten::result_type",
             "aten::is_pinned", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::stride"}


def launches(fn):
    """Kernel launches of fn() (see the module docstring)."""
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    return sum(e.name.startswith("aten::") and e.name not in NO_KERNEL and not e.cpu_children for e in prof.events())


def cpu_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@pytest.mark.cpu_ok
def test_paired_crop(benchmark):
    dev = device()
    a = torch.rand(BATCH, 3, SIZE, SIZE, device=dev) * 2 - 1
    b = torch.rand(BATCH, 3, SIZE, SIZE, device=dev) * 2 - 1
    leaf = a.clone().requires_grad_()
    cot = torch.randn(BATCH, 3, OUT, OUT, device=dev)
    seed = [0]

    def step(fn):
        def run():
            seed[0] += 1
            windows = crop_windows(SIZE, SIZE, BATCH, seed[0])
            oa, ob = fn((leaf, b), windows, OUT)
            ((oa * cot).sum() + ob.sum()).backward()
            leaf.grad = None
        return run

    def host_only(matrices):
        def run():
            w = crop_windows(SIZE, SIZE, BATCH, 1)
            if matrices:
                resize_weights(w[:, 0], w[:, 2], OUT, SIZE)
                resize_weights(w[:, 1], w[:, 3], OUT, SIZE)
        return run

    fast, ref = step(crop_resize), step(crop_resize_ref)
    fast(), ref()                                              # warm-up
    counts = {name: launches(fn) - (0 if torch.cuda.is_available() else launches(host_only(name == "fast")))
              for name, fn in (("fast", fast), ("ref", ref))}
    if dev == "cuda":
        ms, ref_ms = time_ms(fast), time_ms(ref)
    else:
        reps = 1 if SMALL else 3
        ms, ref_ms = cpu_ms(fast, reps), cpu_ms(ref, reps)
    record(benchmark, "paired crop (bicubic antialias)", f"batch {BATCH}, {SIZE} px -> {OUT}, fwd + bwd", ms,
           3 * crop_flops(SIZE, 3, OUT) * BATCH, ("per-sample dense formula", ref_ms), launches=counts["fast"],
           baseline_launches=counts["ref"], threads=torch.get_num_threads())
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.cpu_ok
def test_perceptual_share_of_step(benchmark):
    dev = device()
    cuda = dev == "cuda"
    preset, batch, crop, convnext = (("pMF-B/16", 32, 224, "convnextv2_base") if cuda else
                                     ("pMF-T/4-digits", 16, 32, "convnextv2_atto"))
    px = 32 if SMOKE else 64                                 # the smoke run only checks that it runs
    m = get_config(preset, [] if cuda else [f"model.image_size={px}", "model.in_channels=3"]).model
    o = get_config("pMF-B/16").objective                     # the B/16 time sampler, t < 0.8, both terms on
    torch.manual_seed(0)
    model = PMFDiT(m).to(dev)
    loss_fn = PerceptualLoss(o.lpips_weight, o.convnext_weight, "random", convnext, size=crop).to(dev)
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=dev) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def masked(x_hat, x_, seed, keep):                     # every sample through the networks, then x mask
        return tuple(v * keep.to(v.device, v.dtype) for v in loss_fn(x_hat, x_, seed))

    variants = {"none": None, "masked": masked, "gathered": loss_fn}
    kept = []

    def step(perceptual, seed):
        gen = torch.Generator(dev).manual_seed(seed)
        d = sample_draws(x, o, gen, torch.Generator().manual_seed(seed))
        if perceptual is loss_fn:
            kept.append((d.t < o.perceptual_max_t).float().mean().item())
        sync()
        t0 = time.perf_counter()
        with amp:
            loss, _ = pmf_loss(model, x, y, d, o, m.num_classes, perceptual)
        loss.backward()
        sync()
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1e3

    for fn in variants.values():                           # warm-up
        step(fn, 0)
    kept.clear()
    reps = 10 if cuda else (1 if SMOKE else 3 if SMALL else 8)
    times = {k: [] for k in variants}
    for seed in range(1, reps + 1):                        # interleaved, the same draws for each variant
        for name, fn in variants.items():
            times[name].append(step(fn, seed))
    ms = {k: statistics.median(v) for k, v in times.items()}
    share = {k: (ms[k] - ms["none"]) / ms[k] for k in ("masked", "gathered")}
    model_f = step_flops(m).total
    per_sample = perceptual_flops(m.image_size, m.in_channels, True, convnext, size=crop)
    frac = kept_fraction(o)
    flop_share = {"masked": per_sample / (model_f + per_sample),
                  "gathered": frac * per_sample / (model_f + frac * per_sample)}
    where = f"{preset}{'' if cuda else f' {px} px RGB'}, batch {batch}, LPIPS + {convnext} at {crop}"
    useful = batch * (model_f + frac * per_sample)         # the step's work at the expected kept fraction, both rows
    for name, label in (("masked", "every sample, masked"), ("gathered", "kept samples only")):
        record(benchmark, "perceptual share of a step", f"{where}: {label}", ms[name], flops=useful,
               baseline=("every sample, masked", ms["masked"]) if name == "gathered" else None,
               step_without_perceptual_ms=round(ms["none"], 2), perceptual_share=round(share[name], 3),
               flop_share=round(flop_share[name], 3), kept_measured=round(statistics.mean(kept), 3),
               kept_expected=round(frac, 3), threads=torch.get_num_threads())
    benchmark.pedantic(lambda: None, rounds=1)
