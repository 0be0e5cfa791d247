"""The fast training step (model.jvp on the Triton kernels, compiled) against the reference
(torch.func.jvp over model.forward, eager math attention): same weights, same draws.
On CPU the kernels run in Triton's interpreter; fp32, tiny model."""
import copy

import pytest
import torch

from pmf_fast.config import get_config
from pmf_fast.meanflow import JVP, pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import build_optimizers
from tests.helpers import assert_close_by_rule, wake_up

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # on a GPU the real kernels run (fp32, IEEE dots)


def generators(seed):
    """(gen, cpu_gen) as train.py's TrainState makes them: the objective's draws on DEV, the crop
    seed on the CPU (sample_draws refuses a CUDA generator alone: reading it back would sync)."""
    return torch.Generator(DEV).manual_seed(seed), torch.Generator().manual_seed(seed)


def setup(B=4, seed=0):
    torch.manual_seed(seed)
    cfg = get_config("pMF-XS/4-test")
    model = wake_up(PMFDiT(cfg.model).to(DEV))
    m = cfg.model
    x = torch.rand(B, m.in_channels, m.image_size, m.image_size, device=DEV) * 2 - 1
    y = torch.randint(0, m.num_classes, (B,), device=DEV)
    draws = sample_draws(x, cfg.objective, *generators(seed + 1))
    return cfg, model, x, y, draws


def as64(d):
    d = copy.copy(d)
    for k in ("t", "r", "e", "omega", "t_min", "t_max"):
        setattr(d, k, getattr(d, k).double())
    return d


def step(model, x, y, d, cfg, impl, fn=pmf_loss):
    model.zero_grad()
    loss, logs = fn(model, x, y, d, cfg.objective, cfg.model.num_classes, None, impl)
    loss.backward()
    return logs, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fast_matches_reference_u_and_tangent():
    cfg, model, x, y, d = setup()
    fast = copy.deepcopy(model).set_impl("fast")
    z, v_c = (1 - d.t.view(-1, 1, 1, 1)) * x + d.t.view(-1, 1, 1, 1) * d.e, torch.randn_like(x)
    args = (v_c, d.t, d.r, d.omega, d.t_min, d.t_max, y)
    args64 = [a.double() if a.is_floating_point() else a for a in args]
    u64, du64, v64 = JVP["reference"](copy.deepcopy(model).double(), z.double(), *args64)
    u32, du32, v32 = JVP["reference"](model, z, *args)
    uf, duf, vf = JVP["fast"](fast, z, *args)
    assert_close_by_rule(uf, u64, u32, "u")
    assert_close_by_rule(duf, du64, du32, "du/dt")
    assert_close_by_rule(vf, v64, v32, "v (aux head)")
    assert not duf.requires_grad and uf.requires_grad


def test_fast_matches_reference_loss_and_every_gradient():
    cfg, model, x, y, d = setup()
    logs64, g64 = step(copy.deepcopy(model).double(), x.double(), y, as64(d), cfg, "reference")
    logs32, g32 = step(model, x, y, d, cfg, "reference")
    logsf, gf = step(copy.deepcopy(model).set_impl("fast"), x, y, d, cfg, "fast")
    for k in logs64:
        assert_close_by_rule(logsf[k], logs64[k], logs32[k], k)
    assert gf.keys() == g64.keys()
    for n in g64:
        assert_close_by_rule(gf[n], g64[n], g32[n], f"grad {n}", relative_atol=True)


@pytest.mark.slow
def test_compiled_fast_step_equals_eager():
    """Catches tangents silently dropped by the compiler (pytorch#192985): inductor, fullgraph."""
    cfg, model, x, y, d = setup()
    model.set_impl("fast")
    logs_e, g_e = step(model, x, y, d, cfg, "fast")
    compiled = torch.compile(pmf_loss, fullgraph=True)
    logs_c, g_c = step(model, x, y, d, cfg, "fast", compiled)
    for k in logs_e:
        assert torch.allclose(logs_c[k], logs_e[k], rtol=1e-5, atol=1e-6), k
    for n in g_e:
        assert torch.allclose(g_c[n], g_e[n], rtol=1e-4, atol=1e-6), n


@pytest.mark.slow
def test_a_few_optimizer_steps_stay_together():
    cfg, model, x, y, _ = setup()
    runs = {}
    for impl in ("reference", "fast"):
        m = copy.deepcopy(model).set_impl(impl)
        opts = build_optimizers(m, cfg.optim)
        gens = generators(5)
        for _ in range(3):
            d = sample_draws(x, cfg.objective, *gens)
            step(m, x, y, d, cfg, impl)
            opts.step()
        runs[impl] = dict(m.named_parameters())
    moved = max((runs["reference"][n] - model.state_dict()[n]).abs().max().item() for n in runs["reference"])
    gap = max((runs["reference"][n] - runs["fast"][n]).abs().max().item() for n in runs["reference"])
    print(f"largest parameter change {moved:.3e}, largest fast-reference gap {gap:.3e}")
    assert moved > 1e-3 and gap < 1e-3 * moved


@pytest.mark.slow
def test_fast_step_saves_at_most_half_the_reference():
    """The memory target at the real pMF-B/16 shapes (one image, fp32, CPU): bytes saved for backward."""
    from bench.bench_memory import saved_bytes_per_image
    ref = saved_bytes_per_image("pMF-B/16", "reference")
    fast = saved_bytes_per_image("pMF-B/16", "fast")
    print(f"saved for backward per image: fast {fast / 2**20:.0f} MiB, reference {ref / 2**20:.0f} MiB")
    assert fast <= 0.5 * ref


class CudaClaimingGenerator(torch.Generator):
    """A CPU generator that, when made for a device, says it is on CUDA: the device generator that
    a GPU machine's torch.Generator(DEV) is; torch.Generator() stays on the CPU."""

    def __init__(self, device=None):
        super().__init__()
        self._device = torch.device("cpu" if device is None else "cuda")

    @property
    def device(self):
        return self._device


def test_draw_set_up_gives_a_cpu_generator_beside_a_cuda_one(monkeypatch):
    """sample_draws refuses a CUDA generator without a CPU one for the crop seed (reading it back
    would sync every step). This file's set-up and bench/bench_memory.py's run here as on a GPU
    machine, their device generators on "CUDA", so a caller that passes no cpu_gen fails on a CPU."""
    from bench.bench_memory import saved_bytes_per_image
    if DEV == "cpu":                                  # on a GPU they are on CUDA already
        monkeypatch.setattr(torch, "Generator", CudaClaimingGenerator)
    cfg, _, x, _, _ = setup()
    with pytest.raises(ValueError, match="cpu_gen"):   # the check runs: the device generator is on "CUDA"
        sample_draws(x, cfg.objective, torch.Generator(DEV).manual_seed(0))
    assert saved_bytes_per_image("pMF-XS/4-test", "fast") > 0


@pytest.mark.gpu(reason="host-device syncs exist only with a GPU")
def test_a_training_step_does_not_sync_the_host():
    """Between train.py's stop checks a step (draws, targets, JVP, loss, backward, Muon + AdamW,
    EMAs) must queue GPU work without waiting for it: any sync raises under the debug mode."""
    from pmf_fast.dist import parallelize
    from pmf_fast.ema import EMAs
    cfg, model, x, y, _ = setup(B=8)
    model.set_impl("fast")
    step_model = parallelize(model, compile=True)
    opts = build_optimizers(model, cfg.optim)
    emas = EMAs(model, cfg.train.ema_halflives_kimg, 8)
    gen, cpu_gen = generators(0)

    def one(step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = pmf_loss(step_model, x, y, sample_draws(x, cfg.objective, gen, cpu_gen), cfg.objective,
                               cfg.model.num_classes, None, "fast")
        loss.backward()
        opts.step()
        opts.zero_grad()
        emas.update(model, step)
    one(1)                                       # compile and first-step allocations outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3):
            one(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
