import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pmf_fast.config import get_config
from pmf_fast.flops import step_flops
from pmf_fast.meanflow import pmf_loss, sample_draws
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
    pmf_loss runs them: the paired crop, both images forward, the prediction's input gradient."""
    from pmf_fast.flops import perceptual_flops
    from pmf_fast.perceptual import PerceptualLoss
    batch = 2
    with torch.device("meta"):
        loss_fn = PerceptualLoss(0.4 * lpips, 0.1 * bool(convnext), weights="random",
                                 convnext_name=convnext or "convnextv2_base").to("meta")
        x = torch.randn(batch, channels, image_size, image_size)
        x_hat = torch.randn(batch, channels, image_size, image_size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        lp, cn = loss_fn(x_hat, x, seed=0)
        sum(t.sum() for t in (lp, cn) if t is not None).backward()
    measured = counter.get_total_flops() / batch
    analytic = perceptual_flops(image_size, channels, lpips, convnext)
    print(f"lpips {lpips}, convnext {convnext}: analytic {analytic / 1e9:.3f} GFLOP/sample, "
          f"flop_counter {measured / 1e9:.3f}")
    assert abs(analytic - measured) / measured < 0.01
