"""The perceptual loss's paired crop: pmf_fast.perceptual.crop_resize (two batched matmuls per image,
taps built on the host) against crop_resize_ref (per sample a slice, a stack and a bicubic
antialiased F.interpolate, and their backward), forward on both images and backward for the first,
at batch 128, 256 px -> 224 (small run: batch 8). Each row also carries the launch count of each path
from torch.profiler: on a GPU its CUDA kernel and copy events; on the CPU the aten operators that
would launch one (leaf operators that are not views or allocations), less those of the host-side
window draws and tap building. TFLOP/s: the matmul path's FLOPs (pmf_fast/flops.py crop_flops), for
both rows. Device-independent (cpu_ok).
"""
import statistics
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import SMALL, device, record, time_ms
from pmf_fast.flops import crop_flops
from pmf_fast.perceptual import crop_resize, crop_resize_ref, crop_windows, resize_weights

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
                resize_weights(w[:, 0], w[:, 2], OUT)
                resize_weights(w[:, 1], w[:, 3], OUT)
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
           3 * crop_flops(SIZE, 3, OUT) * BATCH, ("per-sample F.interpolate", ref_ms), launches=counts["fast"],
           baseline_launches=counts["ref"], threads=torch.get_num_threads())
    benchmark.pedantic(lambda: None, rounds=1)
