import math
import secrets

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pmf_fast.config import ObjectiveConfig, get_config
from pmf_fast.flops import step_flops
from pmf_fast.meanflow import pmf_loss, sample_draws, sample_t_r
from pmf_fast.model import PMFDiT


@pytest.mark.parametrize("preset, batch", [("pMF-XS/4-test", 4), ("pMF-T/4-digits", 4), ("pMF-B/16", 1)])
def test_analytic_step_flops_match_flop_counter(preset, batch):
    """The analytic count in pmf_fast/flops.py against torch.utils.flop_counter on the eager
    explicit step (targets, JVP, backward), within 5%."""
    cfg = get_config(preset)
    m = cfg.model
    model = PMFDiT(m)
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,))
    d = sample_draws(x, cfg.objective, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        loss, _ = pmf_loss(model, x, y, d, cfg.objective, m.num_classes)
        loss.backward()
    measured = counter.get_total_flops() / batch
    analytic = step_flops(m).total
    print(f"{preset}: analytic {analytic / 1e9:.3f} GFLOP/image, flop_counter {measured / 1e9:.3f}")
    assert abs(analytic - measured) / measured < 0.05


# ConvNeXt-V2-B's meta forward+backward takes 5 s on 2 cores: it runs once, with both terms
@pytest.mark.parametrize("lpips, convnext, image_size, channels",
                         [(True, "convnextv2_base", 256, 3), (True, None, 64, 1), (False, "convnextv2_atto", 48, 3)])
def test_perceptual_flops_match_flop_counter(lpips, convnext, image_size, channels):
    """The analytic perceptual count against torch.utils.flop_counter on the real networks (LPIPS'
    VGG16 trunk and timm's convnextv2_base, random weights, on the meta device: shapes only), run as
    pmf_loss runs them: the paired crop, both images forward, the prediction's input gradient, on
    the kept sample only (one of two: kept fraction 1/2)."""
    from pmf_fast.flops import perceptual_flops
    from pmf_fast.perceptual import PerceptualLoss
    batch = 2
    with torch.device("meta"):
        loss_fn = PerceptualLoss(0.4 * lpips, 0.1 * bool(convnext), weights="random",
                                 convnext_name=convnext or "convnextv2_base").to("meta")
        x = torch.randn(batch, channels, image_size, image_size)
        x_hat = torch.randn(batch, channels, image_size, image_size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        lp, cn = loss_fn(x_hat, x, seed=0, keep=torch.tensor([False, True]))
        sum(t.sum() for t in (lp, cn) if t is not None).backward()
    measured = counter.get_total_flops() / batch
    analytic = perceptual_flops(image_size, channels, lpips, convnext, kept=0.5)
    print(f"lpips {lpips}, convnext {convnext}: analytic {analytic / 1e9:.3f} GFLOP/sample, "
          f"flop_counter {measured / 1e9:.3f}")
    assert abs(analytic - measured) / measured < 0.01


@pytest.mark.parametrize("preset, over", [("pMF-B/16", {}), ("pMF-H/16", {}),
                                          ("pMF-B/16", {"data_proportion": 0.25, "tr_uniform": 0.3, "P_std": 1.3})])
def test_kept_fraction_matches_the_time_sampler(preset, over):
    """kept_fraction, the expected share of samples with t < perceptual_max_t that the perceptual
    FLOPs are counted at, against a Monte Carlo of sample_t_r (400k draws, 5 standard errors)."""
    from pmf_fast.flops import kept_fraction
    o = get_config(preset, [f"objective.{k}={v}" for k, v in over.items()]).objective
    n = 400_000
    seed = secrets.randbits(62)                          # fresh draws each run; the seed replays a failure
    t, _, _ = sample_t_r(n, o, torch.Generator().manual_seed(seed), "cpu")
    mc = (t < o.perceptual_max_t).double().mean().item()
    want = kept_fraction(o)
    print(f"{preset} {over}: kept_fraction {want:.4f}, Monte Carlo {mc:.4f} (seed {seed})")
    assert abs(mc - want) < 5 * math.sqrt(want * (1 - want) / n), f"seed {seed}: {mc} vs {want}"
    if preset == "pMF-B/16" and not over:
        assert abs(want - 0.679) < 1e-3                  # 0.5 x 0.768 (r = t) + 0.5 x 0.590 (r < t)
    assert kept_fraction(ObjectiveConfig(perceptual_max_t=1.0)) == 1.0
