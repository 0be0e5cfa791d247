import math
import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def fresh_generator():
    seed = secrets.randbits(62)
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


def draw_crops(h, w, n, mode):
    g = fresh_generator()
    return np.array([P.crop_params(h, w, g, mode=mode) for _ in range(n)])    # [n, 4]: top, left, ch, cw


def p_product_at_least(c, s0=0.08, r=(3 / 4, 4 / 3), grid=200_000):
    """P(s * a >= c) for s ~ U(s0, 1) and log a ~ U(log r0, log r1) (so also for s / a), by the
    midpoint rule over log a. This is the official formula's law, written from its definition:
    a crop side clips (official rule) or rounds up to the image side n exactly when s a n_h n_w >=
    (n - 1/2)^2."""
    u = np.log(r[0]) + (np.log(r[1]) - np.log(r[0])) * (np.arange(grid) + 0.5) / grid
    return float(np.clip((1 - c * np.exp(-u)) / (1 - s0), 0, 1).mean())


@pytest.mark.parametrize("h, w", [(256, 256), (32, 40)])
def test_official_crop_sizes_follow_the_official_formula(h, w):
    """One draw, sides clipped to [1, side] (official utils/auxloss_util.py): the law of each side
    (its whole CDF) and the clipped fraction (about 14% at 256 px) match the formula."""
    n = 20_000
    c = draw_crops(h, w, n, "official")
    top, left, ch, cw = c.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    assert (ch >= 1).all() and (cw >= 1).all()
    ks = 2.0 / math.sqrt(n)                          # Kolmogorov-Smirnov, p ~ 5e-4
    for side, got in ((w, cw), (h, ch)):
        # cw = min(w, round(sqrt(s a h w))): P(cw <= k) = P(s a < (k + 1/2)^2 / (h w)) for k < w
        cdf = np.array([1 - p_product_at_least((k + 0.5) ** 2 / (h * w)) for k in range(1, side)])
        emp = np.array([(got <= k).mean() for k in range(1, side)])
        assert np.abs(emp - cdf).max() < ks, np.abs(emp - cdf).max()
        p_full = p_product_at_least((side - 0.5) ** 2 / (h * w))
        assert abs((got == side).mean() - p_full) < 5 * math.sqrt(p_full * (1 - p_full) / n) + 1e-3
    both = p_product_at_least((h - 0.5) ** 2 / (h * w)) + p_product_at_least((w - 0.5) ** 2 / (h * w))
    clipped = ((ch == h) | (cw == w)).mean()
    assert abs(clipped - both) < 5 * math.sqrt(both * (1 - both) / n) + 1e-3, (clipped, both)
    if h == w == 256:
        assert 0.13 < both < 0.15 and 0.125 < clipped < 0.155      # "about 14% of its crops get clipped"
    # the window's position is uniform over the positions that fit
    free = ch < h
    frac = top[free] / (h - ch[free])
    assert abs(frac.mean() - 0.5) < 5 * math.sqrt(1 / 12 / free.sum()) + 0.01
    assert (top[~free] == 0).all()


def test_redraw_crop_keeps_the_aspect_and_rarely_fills_a_side():
    """torchvision's rule: redraw until both sides fit, so sides never clip and the aspect stays in
    [3/4, 4/3] (up to rounding); a full side only comes from rounding, far rarer than 14%."""
    n = 5_000
    top, left, ch, cw = draw_crops(256, 256, n, "redraw").T
    assert (top + ch <= 256).all() and (left + cw <= 256).all()
    aspect = cw / ch
    assert aspect.min() >= 3 / 4 * 0.97 and aspect.max() <= 4 / 3 / 0.97
    assert ((ch == 256) | (cw == 256)).mean() < 0.03
    assert (ch * cw >= 0.08 * 256 * 256 * 0.97).all()
    _, _, och, ocw = draw_crops(256, 256, n, "official").T     # the same law, one draw, clipped
    assert ((och == 256) | (ocw == 256)).mean() > 0.1


def test_crop_mode_is_checked_and_reaches_the_loss():
    with pytest.raises(ValueError, match="crop mode 'center'"):
        P.crop_params(8, 8, torch.Generator(), mode="center")
    with pytest.raises(ValueError, match="crop mode"):
        P.PerceptualLoss(0, 0, weights="random", crop="center")
    loss_fn = P.PerceptualLoss(0, 0, weights="random", crop="redraw")
    assert loss_fn.crop == "redraw" and P.PerceptualLoss(0, 0, weights="random").crop == "official"
    # a seed draws the same windows in paired_random_resized_crop as in crop_params, per mode
    x = torch.randn(6, 3, 20, 20)
    for mode in P.CROP_MODES:
        g = torch.Generator().manual_seed(3)
        wins = [P.crop_params(20, 20, g, mode=mode) for _ in range(6)]
        ca, _ = P.paired_random_resized_crop(x, x, seed=3, size=20, mode=mode)
        for i, (_, _, h, w) in enumerate(wins):
            if (h, w) == (20, 20):
                assert torch.allclose(ca[i], x[i], atol=1e-4)


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


# windows of a 37 x 29 image (top, left, ch, cw): the full image, 1-pixel bands (a row, a column,
# a pixel), full-height and full-width bands (the official rule's clipped sides), corner windows
ODD_WINDOWS = torch.tensor([[0, 0, 37, 29], [5, 0, 1, 29], [0, 7, 37, 1], [36, 28, 1, 1], [0, 0, 37, 5],
                            [30, 0, 7, 29], [10, 2, 20, 27], [1, 3, 35, 24]])


def official_resample_matrix(start, length, size, side):
    """The official crop-and-resize of one axis from its definition (utils/auxloss_util.py
    _resample_crop_to_square: jax.image.scale_and_translate over the whole image, "cubic", antialias),
    written out pixel by pixel: output i of the window [start, start + length), s = length / size,
    is centred at c = start + (i + 1/2) s - 1/2; its weight on pixel j is the Keys cubic (a = -0.5)
    of |c - j| / max(s, 1), over every pixel j of the image, normalised to sum 1."""
    s = length / size
    m = np.zeros((size, side))
    for i in range(size):
        c = start + (i + 0.5) * s - 0.5
        for j in range(side):
            x = abs(c - j) / max(s, 1.0)
            m[i, j] = 1.5 * x**3 - 2.5 * x**2 + 1 if x < 1 else (-0.5 * x**3 + 2.5 * x**2 - 4 * x + 2 if x < 2 else 0)
        m[i] /= m[i].sum()
    return m


@pytest.mark.parametrize("size", [24, 41])          # mostly downsampling; mostly upsampling
def test_crop_resize_is_the_official_rule(size):
    """crop_resize and crop_resize_ref in fp64 against the closed form on odd windows of a 37 x 29
    image (tiny, full, edge-touching, 1-pixel): values of both images and the input gradient.
    Checked once against jax.image.scale_and_translate itself (jax 0.10.2 CPU, x64; the official
    _resample_crop_to_square's arguments) on 20 windows of 256-px images to 224: max difference
    1.9e-13 in values and 4.9e-13 in input gradients (6.9e-5 in values against jax's float32, the
    official precision); the earlier rule, F.interpolate on the cropped window, differed by 1.13."""
    n = len(ODD_WINDOWS)
    a = torch.randn(n, 3, 37, 29, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 3, 37, 29, dtype=torch.float64)
    cot = torch.randn(n, 3, size, size, dtype=torch.float64)
    ry = np.stack([official_resample_matrix(t, h, size, 37) for t, _, h, _ in ODD_WINDOWS.tolist()])
    rx = np.stack([official_resample_matrix(left, w, size, 29) for _, left, _, w in ODD_WINDOWS.tolist()])
    ry, rx = torch.from_numpy(ry)[:, None], torch.from_numpy(rx)[:, None]
    want_a, want_b = ry @ a.detach() @ rx.transpose(-1, -2), ry @ b @ rx.transpose(-1, -2)
    want_grad = ry.transpose(-1, -2) @ cot @ rx                 # d <out, cot> / d image
    for fn in (P.crop_resize, P.crop_resize_ref):
        oa, ob = fn((a, b), ODD_WINDOWS, size)
        grad, = torch.autograd.grad((oa * cot).sum(), a)
        for name, got, want in (("a", oa, want_a), ("b", ob, want_b), ("grad a", grad, want_grad)):
            err = (got - want).abs().max().item()
            print(f"{fn.__name__} {name}: max error {err:.2e}")
            assert err < 1e-12, (fn.__name__, name, err)


@pytest.mark.parametrize("size", [24, 41])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_crop_resize_matches_reference(dtype, size):
    """The batched-matmul crop equals the per-sample reference on odd windows: values of both images
    and the input gradient of the first, by the tolerance rule."""
    from tests.helpers import assert_close_by_rule
    n = len(ODD_WINDOWS)
    a64 = torch.randn(n, 3, 37, 29, dtype=torch.float64)
    b64 = torch.randn(n, 3, 37, 29, dtype=torch.float64)
    cot = torch.randn(n, 3, size, size, dtype=torch.float64)

    def run(fn, dt):
        a = a64.to(dt, copy=True).requires_grad_()
        oa, ob = fn((a, b64.to(dt)), ODD_WINDOWS, size)
        (oa * cot.to(oa.dtype)).sum().backward()
        return oa, ob, a.grad

    ref64 = run(P.crop_resize_ref, torch.float64)
    eager = run(P.crop_resize_ref, dtype)
    out = run(P.crop_resize, dtype)
    assert out[0].dtype == dtype and out[0].shape == (n, 3, size, size)
    for name, o, r, e in zip(("a", "b", "grad a"), out, ref64, eager):
        assert_close_by_rule(o, r, e, name, relative_atol=name == "grad a")


def test_resize_taps_reach_outside_the_window_only_near_its_edges():
    """The taps are the closed form's rows; a row whose support lies inside the window is aten's
    bicubic antialias row of the cropped signal (F.interpolate), so the two rules differ only in a
    band at the window's edges, where the official kernel reads the pixels beyond it."""
    side = 40
    for start, length, size in [(0, 1, 5), (3, 7, 3), (0, 40, 24), (13, 27, 56), (5, 13, 13), (2, 9, 4),
                                (39, 1, 7), (0, 40, 40), (20, 20, 9)]:
        idx, wt = P.resize_weights(torch.tensor([start]), torch.tensor([length]), size, side)
        r = torch.zeros(size, side, dtype=torch.float64).scatter_add_(1, idx[0], wt[0])
        want = torch.from_numpy(official_resample_matrix(start, length, size, side))
        assert torch.allclose(r, want, atol=1e-14, rtol=0), (start, length, size, (r - want).abs().max())
        sig = torch.randn(side, dtype=torch.float64)
        aten = F.interpolate(sig[start:start + length].view(1, 1, 1, -1), size=(1, size), mode="bicubic",
                             antialias=True, align_corners=False).flatten()
        inside = ((r[:, :start] == 0).all(1) & (r[:, start + length:] == 0).all(1))
        assert torch.allclose((r @ sig)[inside], aten[inside], atol=1e-12), (start, length, size)
        if 0 < start and start + length < side and length not in (1, size):
            assert not inside.all()                         # the edge rows read outside the window


@pytest.mark.parametrize("mode", P.CROP_MODES)
def test_paired_crop_matches_the_per_sample_loop(mode):
    """Random windows at 256 px to 224, as the loss draws them: the same windows and values."""
    from tests.helpers import assert_close_by_rule
    a, b = torch.randn(6, 3, 256, 256), torch.randn(6, 3, 256, 256)
    seed = secrets.randbits(31)
    print(f"seed {seed}")
    out = P.paired_random_resized_crop(a, b, seed, mode=mode)
    eager = P.paired_random_resized_crop(a, b, seed, mode=mode, ref=True)
    ref64 = P.paired_random_resized_crop(a.double(), b.double(), seed, mode=mode, ref=True)
    for name, o, r, e in zip("ab", out, ref64, eager):
        assert_close_by_rule(o, r, e, name)


@pytest.mark.gpu(reason="the device sync check needs a CUDA GPU")
def test_crop_resize_does_not_sync():
    a = torch.randn(8, 3, 64, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        oa, _ = P.paired_random_resized_crop(a, a.detach(), seed=3, size=32)
        oa.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, _ = P.paired_random_resized_crop(a, a.detach(), seed=3, size=32, ref=True)
    assert torch.allclose(oa, ref, atol=1e-4)


def test_kept_rows_pad_to_a_few_sizes():
    """Kept samples first, in order, then dropped ones as padding; the row count takes at most
    PERCEPTUAL_BUCKETS values over every kept count, never below the count, at most one bucket above."""
    for n in (1, 7, 10, 128, 130):
        step = -(-n // P.PERCEPTUAL_BUCKETS)
        sizes = set()
        for k in range(n + 1):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.randperm(n)[:k]] = True
            rows, kept = P.kept_rows(keep)
            assert kept == k and k <= len(rows) <= min(n, k + step - 1) and len(set(rows.tolist())) == len(rows)
            assert torch.equal(rows[:k], keep.nonzero().flatten()) and not keep[rows[k:]].any()
            sizes.add(len(rows))
        assert len(sizes - {0}) <= P.PERCEPTUAL_BUCKETS, (n, sizes)


@pytest.mark.slow
def test_compiled_networks_compile_once_per_bucket():
    """The networks compiled (dynamic=False) see one batch shape per bucket: over every kept count
    0..16 of a batch of 16 (bucket 2) they compile 8 graphs, not 16, within dynamo's recompile limit."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    loss_fn = P.PerceptualLoss(0.4, 0.1, weights="random", convnext_name="convnextv2_atto", size=32)
    counter = CompileCounter()
    loss_fn.distances = torch.compile(loss_fn.distances, backend=counter, dynamic=False)
    x = torch.rand(16, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        for k in range(17):
            keep = torch.zeros(16, dtype=torch.bool)
            keep[torch.randperm(16)[:k]] = True
            lp, cn = loss_fn(x + 0.1 * torch.randn_like(x), x, seed=k, keep=keep)
            assert ((lp > 0) == keep).all() and ((cn > 0) == keep).all()
    assert counter.frame_count == 8, counter.frame_count
    torch._dynamo.reset()


@pytest.mark.gpu(reason="the pinned host copy of the kept mask and its CUDA event need a GPU")
def test_kept_mask_reaches_the_host_and_the_gather_equals_masking_on_cuda(dev="cuda"):
    """On a GPU the kept mask comes to the host through start_host_copy (pinned, an event), and the
    networks on the kept samples give the distances and input gradient of every sample masked (fp64,
    so no TF32 convolution picks a batch-size-dependent result)."""
    keep_dev = torch.rand(12, device=dev) < 0.6
    keep = P.start_host_copy(keep_dev)()
    assert keep.device.type == "cpu" and torch.equal(keep, keep_dev.cpu())
    loss_fn = P.PerceptualLoss(0.4, 0.1, weights="random", convnext_name="convnextv2_atto", size=32).to(dev).double()
    x = torch.rand(12, 3, 40, 40, device=dev, dtype=torch.float64) * 2 - 1
    x_hat = (x + 0.2 * torch.randn_like(x)).requires_grad_()
    gathered = loss_fn(x_hat, x, 5, keep)
    masked = [v * keep_dev for v in loss_fn(x_hat, x, 5)]
    for got, want in zip(gathered, masked):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    g1, = torch.autograd.grad(sum(v.sum() for v in gathered), x_hat)
    g2, = torch.autograd.grad(sum(v.sum() for v in masked), x_hat)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14) and (g1[~keep_dev] == 0).all()
