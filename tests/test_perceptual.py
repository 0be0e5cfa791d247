import pytest
import torch

from pmf_fast import perceptual as P
from pmf_fast.config import get_config
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT


def test_paired_crop_is_shared():
    a = torch.rand(3, 3, 32, 40) * 2 - 1
    ca, cb = P.paired_random_resized_crop(a, a + 1.0, seed=5, size=24)
    assert ca.shape == (3, 3, 24, 24)
    assert torch.allclose(cb, ca + 1.0, atol=1e-5)   # same window for both (bicubic weights sum to 1)
    ca2, _ = P.paired_random_resized_crop(a, a, seed=6, size=24)
    assert not torch.allclose(ca, ca2)                # a new seed gives a new window


def test_crop_params_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = P.crop_params(256, 256, g)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 256
        assert 0.08 * 256 * 256 * 0.9 <= h * w <= 256 * 256
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_convnext_hf_map_matches_transformers():
    """A random Hugging Face ConvNextV2 (the layout of facebook/convnextv2-base-22k-224) mapped onto
    timm's ConvNeXt-V2 gives the same pooled, LayerNormed features."""
    transformers = pytest.importorskip("transformers", reason="pip install .[dev] brings transformers")
    import timm.models.convnext as tc
    dims, depths = [8, 16, 32, 64], [1, 2, 1, 1]
    hf_cfg = transformers.ConvNextV2Config(hidden_sizes=dims, depths=depths, layer_norm_eps=1e-6, num_labels=5)
    hf = transformers.ConvNextV2ForImageClassification(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():                    # randomise everything, GRN and norms included
            p.normal_(0, 0.2)
    ours = tc.ConvNeXt(depths=depths, dims=dims, use_grn=True, ls_init_value=None, num_classes=0).eval()
    ours.load_state_dict(P.convnext_hf_to_timm(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf.convnextv2(pixel_values=x).pooler_output
        out = P.convnext_features(ours, x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


def test_lpips_loads_local_vgg(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    feats = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(feats, tmp_path / "hub" / "checkpoints" / P.VGG_FILE)
    net = P.build_lpips("pretrained")
    own = net.net.state_dict()
    assert len(own) == len(feats) == 26
    assert torch.equal(own["slice1.0.weight"], feats["features.0.weight"])
    assert torch.equal(own["slice5.28.bias"], feats["features.28.bias"])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_missing_weights_name_file_place_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("PMF_CONVNEXT_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*download\.pytorch\.org"):
        P.build_lpips("pretrained")
    with pytest.raises(FileNotFoundError, match=r"convnextv2-base-22k-224.*PMF_CONVNEXT_WEIGHTS"):
        P.build_convnext("pretrained")


def test_perceptual_terms_in_the_loss():
    loss_fn = P.PerceptualLoss(0.4, 0.1, weights="random", convnext_name="convnextv2_atto")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    lp, cn = loss_fn(x_hat, x, seed=1)
    assert lp.shape == cn.shape == (2,) and (lp > 0).all() and (cn > 0).all()
    (lp.sum() + cn.sum()).backward()
    assert x_hat.grad.abs().sum() > 0
    same_lp, same_cn = loss_fn(x, x, seed=1)
    assert same_lp.abs().max() < 1e-6 and same_cn.abs().max() < 1e-6

    cfg = get_config("pMF-XS/4-test", ["model.in_channels=3", "objective.perceptual_max_t=0.9",
                                        "objective.lpips_weight=0.4", "objective.convnext_weight=0.1"])
    model = PMFDiT(cfg.model)
    xb = torch.rand(4, 3, 16, 16) * 2 - 1
    d = sample_draws(xb, cfg.objective, torch.Generator().manual_seed(0))
    d.t = torch.tensor([0.3, 0.95, 0.5, 0.99])           # two samples above the threshold
    d.r = d.t * 0.5
    _, logs = pmf_loss(model, xb, torch.tensor([0, 1, 2, 3]), d, cfg.objective, 10, perceptual=loss_fn)
    assert "lpips" in logs and "convnext" in logs and logs["lpips"] > 0
