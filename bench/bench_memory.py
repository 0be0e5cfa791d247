"""Bytes saved for backward per image by one training step (targets, JVP, loss), fast against
reference, counted with torch.autograd.graph.saved_tensors_hooks: unique storages, parameters
excluded. Device-independent, so it runs on the CPU too (fp32; the custom ops save the same tensors
whether their Triton kernel or their eager fallback runs). Target: fast <= 50% of reference.
"""
import contextlib
import os

import pytest
import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

from bench.common import SMALL, SMOKE, ram_gib, record
from pmf_fast.config import get_config
from pmf_fast.dist import apply_checkpointing
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT


@contextlib.contextmanager
def eager_fallbacks():
    """Kernel ops fall back to their eager twins on CPU tensors outside the interpreter."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


def saved_bytes_per_image(preset, impl, batch=1, device="cpu", autocast_dtype=None, checkpointing="none"):
    """checkpointing "blocks": each block keeps only its inputs (x, and x_dot on the tangent pass),
    which the checkpoint holds directly rather than through saved-tensor hooks, so they are counted
    by a forward pre-hook; what a block saves is recomputed in backward and not counted."""
    cfg = get_config(preset)
    m = cfg.model
    torch.manual_seed(0)
    model = PMFDiT(m).to(device).set_impl("fast" if impl == "fast" else "eager")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=device)
    # a CPU generator for the crop seed beside the device one, as train.py's TrainState: sample_draws
    # refuses a CUDA generator alone (tests/test_fast_step.py runs this set-up as on a GPU)
    d = sample_draws(x, cfg.objective, torch.Generator(device).manual_seed(0), torch.Generator().manual_seed(0))
    seen = {}

    def pack(t):
        u = t
        while is_functorch_wrapped_tensor(u):               # torch.func.jvp saves wrapped (dual) tensors
            u = get_unwrapped(u)
        try:
            s = u.detach().untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
        except RuntimeError:
            # under torch.func.jvp a few saved weights have no Python-visible storage: parameters
            # are excluded anyway; anything else is counted by its size
            if tuple(u.shape) not in param_shapes:
                seen[id(t)] = u.numel() * u.element_size()
        return t

    if checkpointing == "blocks":
        apply_checkpointing(model)

        def keep_inputs(block, args):
            if torch.is_grad_enabled():
                for t in args:
                    if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in params:
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        for block in model.blocks():
            block.register_forward_pre_hook(keep_inputs)
    amp = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with eager_fallbacks() if device == "cpu" else contextlib.nullcontext(), amp, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = pmf_loss(model, x, y, d, cfg.objective, m.num_classes, None,
                           "reference" if impl == "reference" else "fast")
    del loss
    return sum(seen.values()) / batch


# small run (smoke, or a CPU without --full): the tiny preset (smoke) or the CPU default's (seconds)
SMALL_PRESET = "pMF-XS/4-test" if SMOKE else "pMF-T/4-digits"
PRESETS = [SMALL_PRESET] if SMALL else ["pMF-B/16", "pMF-H/16"]
# peak GiB on the CPU of the reference step at batch 1 (fp32): B/16 measured 3.8 on 2 cores; L/16 and
# H/16 scaled by width x depth (H/16's full-size run was killed at 24 GB on a 24 GiB machine)
CPU_PEAK_GIB = {"pMF-B/16": 4, "pMF-L/16": 11, "pMF-H/16": 26}


def skip_unless_fits(preset, on_cpu):
    need, have = CPU_PEAK_GIB.get(preset, 1), ram_gib()
    if on_cpu and need > have:
        pytest.skip(f"{preset} needs about {need} GiB of memory on the CPU, {have:.1f} GiB available")


GPU_GIB = 80


def state_bytes(preset):
    """Bytes per GPU of the training state on one rank: fp32 parameters and gradients, Muon's fp32
    momentum or the NAdamW group's two fp32 moments, and the fp32 EMAs (3 in the paper presets)."""
    from pmf_fast.optimizers import split_params
    cfg = get_config(preset)
    with torch.device("meta"):
        model = PMFDiT(cfg.model)
    muon, adamw = split_params(model)
    n_muon, n_adam = sum(p.numel() for p in muon), sum(p.numel() for p in adamw)
    n = n_muon + n_adam
    return 4 * (2 * n + n_muon + 2 * n_adam + len(cfg.train.ema_halflives_kimg) * n)


@pytest.mark.cpu_ok
@pytest.mark.parametrize("preset", [SMALL_PRESET] if SMALL else ["pMF-B/16", "pMF-L/16", "pMF-H/16"])
@pytest.mark.parametrize("checkpointing", ["none", "blocks"])
def test_batch_that_fits(benchmark, preset, checkpointing):
    """Saved bytes per image of the fast step under bf16 autocast, and the per-GPU batch that fits in
    80 GB beside the training state (one rank, nothing sharded): a model, not a measurement of a
    GPU's peak (the backward's transient buffers and the allocator's slack come on top)."""
    skip_unless_fits(preset, on_cpu=True)
    per_image = saved_bytes_per_image(preset, "fast", autocast_dtype=torch.bfloat16, checkpointing=checkpointing)
    fixed = state_bytes(preset)
    fits = max(0, int((GPU_GIB * 2**30 - fixed) // per_image))
    record(benchmark, "saved for backward (bf16 autocast)", f"{preset} checkpointing={checkpointing}",
           per_image / 2**20, None, unit="MiB/image", state_gib=round(fixed / 2**30, 1),
           batch_fitting_80gb=fits)
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.cpu_ok
@pytest.mark.parametrize("preset", PRESETS)
def test_saved_bytes(benchmark, preset):
    dev = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"     # same count, the GPU is quicker
    skip_unless_fits(preset, on_cpu=dev == "cpu")
    ref = saved_bytes_per_image(preset, "reference", device=dev)
    fast = saved_bytes_per_image(preset, "fast", device=dev)
    ratio = fast / ref
    benchmark.extra_info.update(preset=preset, fast_mib_per_image=fast / 2**20, reference_mib_per_image=ref / 2**20,
                                ratio=ratio)
    record(benchmark, "saved for backward (fp32)", preset, fast / 2**20, None,
           ("reference (torch.func.jvp, math attention)", ref / 2**20), unit="MiB/image", ratio=round(ratio, 3))
    benchmark.pedantic(lambda: None, rounds=1)
    assert ratio <= 0.5, f"fast step saves {ratio:.0%} of the reference's bytes (target <= 50%)"
