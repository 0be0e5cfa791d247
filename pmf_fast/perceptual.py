"""Perceptual losses on the u-head's x prediction (paper App. A; official utils/auxloss_util.py):
LPIPS-VGG (the `lpips` package) and the ConvNeXt-V2-Base pooled-feature loss (timm), both on one
paired random-resized crop to 224 (scale (0.08, 1), ratio (3/4, 4/3); by default the official
one-draw rule with clipped sides, see crop_params; resampled bicubic with antialias over the whole
image as the official jax.image.scale_and_translate, see resize_weights), images in [-1, 1] without
ImageNet normalisation, networks frozen in eval mode, run on the samples with t < perceptual_max_t
only (kept_rows).

Nothing downloads. Weight files:
  VGG16 (LPIPS trunk): vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints/ (torchvision's cache),
      from https://download.pytorch.org/models/vgg16-397923af.pth ; LPIPS's own linear heads ship
      inside the lpips wheel.
  ConvNeXt-V2-Base: the official loss uses facebook/convnextv2-base-22k-224 (Hugging Face), file
      model.safetensors or pytorch_model.bin; timm checkpoints of convnextv2_base load as well.
      Give the file with PMF_CONVNEXT_WEIGHTS=/path/to/file, or put it at
      $TORCH_HOME/pmf_fast/convnextv2-base-22k-224.safetensors.
With objective.perceptual_weights=random both trunks are randomly initialised (tests, offline demos).
"""
import contextlib
import math
import os
import re

import torch
import torch.nn as nn


def _torch_home():
    return os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))


VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CONVNEXT_HF = "https://huggingface.co/facebook/convnextv2-base-22k-224 (model.safetensors)"


def _missing(what, path, url, how):
    return FileNotFoundError(f"{what} weights not found at {path}. Download {url} and {how}. "
                             "Or set objective.lpips_weight=0 / convnext_weight=0 to train without this term, "
                             "or objective.perceptual_weights=random for a smoke test.")


# ----------------------------------------------------------------------------- paired crop
CROP_MODES = ("official", "redraw")


def crop_params(h, w, gen, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), mode="official"):
    """One crop window (top, left, ch, cw) of an h x w image, drawn with the CPU generator `gen`.

    Both modes draw an area fraction s ~ U(scale) and a log-uniform aspect a in `ratio`, and take
    cw = round(sqrt(s a h w)), ch = round(sqrt(s h w / a)) (round half to even, as jnp.round).
    "official": one draw, each side clipped to [1, image side] (official utils/auxloss_util.py
        paired_random_resized_crop): at 256 x 256 about 14% of the crops have a clipped side, whose
        window is then a full-width or full-height band.
    "redraw": torchvision's RandomResizedCrop.get_params: up to 10 draws until both sides fit,
        else the central square.
    The window's position is uniform over the positions that keep it inside the image."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode {mode!r}: use one of {CROP_MODES}")
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(1 if mode == "official" else 10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=gen).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=gen).item())
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if mode == "official":
            cw, ch = min(max(cw, 1), w), min(max(ch, 1), h)
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    s = min(h, w)                                       # fallback: central square
    return (h - s) // 2, (w - s) // 2, s, s


def crop_windows(h, w, n, seed, mode="official"):
    """n crop windows [n, 4] (top, left, ch, cw) drawn in order from a CPU generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([crop_params(h, w, gen, mode=mode) for _ in range(n)], dtype=torch.int64)


def _keys_cubic(x, a=-0.5):
    """The Keys cubic kernel (a = -0.5, as aten's antialiased bicubic and PIL)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, size, side):
    """Bicubic antialias taps of a 1-d crop-and-resize of each window [start, start + length) of an
    axis of `side` pixels to `size`, as the official code resamples (utils/auxloss_util.py:
    jax.image.scale_and_translate over the whole image, method "cubic", antialias): with
    s = length / size, output i is centred at c = start + (i + 1/2) s - 1/2 in pixel indices, and its
    weights are the Keys cubic (a = -0.5) of (c - j) / max(s, 1) over every pixel j of the axis
    (support 2 max(s, 1): widened when downsampling), normalised to sum 1. So near a window's edge
    the taps read pixels outside the window; only the image's edges cut the kernel. (jax also zeroes
    an output whose centre lies outside [-1/2, side - 1/2] and a row whose weights sum to about 0:
    neither happens for a window inside the image.) Host-side, fp64.
    start, length: int64 [n]. Returns (index [n, size, K] into the axis, weight [n, size, K]),
    K the widest window; the padding taps have weight 0."""
    length = length.double()[:, None, None]
    scale = length / size
    widen = scale.clamp(min=1)                                  # antialias: the kernel is stretched
    i = torch.arange(size, dtype=torch.float64)[None, :, None]
    center = start.double()[:, None, None] + scale * (i + 0.5) - 0.5
    lo = (torch.floor(center - 2 * widen) + 1).clamp(min=0)     # first pixel strictly inside the support
    hi = torch.minimum(torch.ceil(center + 2 * widen) - 1, torch.full_like(center, side - 1))
    k = torch.arange(int((hi - lo).max()) + 1, dtype=torch.float64)
    j = lo + k                                                   # [n, size, K] pixels of the axis
    wt = torch.where(j <= hi, _keys_cubic((center - j) / widen), torch.zeros(()))
    wt = wt / wt.sum(-1, keepdim=True)
    return torch.minimum(j, hi).long(), wt


def resize_matrices(windows, h, w, size, device, dtype):
    """Per-sample resampling matrices Ry [n, size, h] and Rx [n, size, w] of the windows [n, 4]
    (top, left, ch, cw): crop-and-resize of image i is Ry[i] @ image_i @ Rx[i]^T. The taps are built
    on the host and copied asynchronously (pinned) before a scatter on the device: no device sync."""
    out = []
    for start, length, side in ((windows[:, 0], windows[:, 2], h), (windows[:, 1], windows[:, 3], w)):
        idx, wt = resize_weights(start, length, size, side)
        wt = wt.to(dtype)
        if torch.device(device).type == "cuda":
            idx, wt = idx.pin_memory(), wt.pin_memory()
        idx, wt = idx.to(device, non_blocking=True), wt.to(device, non_blocking=True)
        # scatter_add: padding taps repeat an index with weight 0, which adds nothing whatever the order
        out.append(torch.zeros(len(windows), size, side, device=device, dtype=dtype).scatter_add_(2, idx, wt))
    return out


def crop_resize(images, windows, size=224):
    """Crop window i of sample i of each image batch in `images` (same shape [n, C, h, w]) and resize
    it to size x size (the official bicubic antialias rule, resize_weights) as two batched matmuls:
    out_i = Ry_i @ image_i @ Rx_i^T. Equal to crop_resize_ref (tests/test_perceptual.py: values and
    input gradients); at batch 128, 256 px it replaces a per-sample loop's ~1000 launches per
    forward+backward (bench/README.md). Computes in fp32 (fp64 inputs: fp64) outside autocast, so the
    resampling never runs in bf16 (with TF32 allowed, as train.py allows it on GPUs, the matmuls
    round to TF32: finer than the bf16 the networks then see under autocast)."""
    h, w = images[0].shape[-2:]
    dtype = torch.promote_types(images[0].dtype, torch.float32)
    ry, rx = resize_matrices(windows, h, w, size, images[0].device, dtype)
    dev = images[0].device.type
    with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext():
        # each image apart: the backward then resamples only the ones that need a gradient
        return tuple(ry[:, None] @ (x.to(dtype) @ rx[:, None].transpose(-1, -2)) for x in images)


def resample_matrix_ref(start, length, size, side, dtype=torch.float64):
    """The official rule written out: row i holds, for every pixel j of the axis, the Keys cubic of
    (c_i - j) / max(s, 1), c_i = start + (i + 1/2) s - 1/2, s = length / size, normalised to sum 1."""
    s = length / size
    rows = []
    for i in range(size):
        c = start + (i + 0.5) * s - 0.5
        row = _keys_cubic((c - torch.arange(side, dtype=torch.float64)) / max(s, 1.0))
        rows.append(row / row.sum())
    return torch.stack(rows).to(dtype)


def crop_resize_ref(images, windows, size=224):
    """The eager reference of crop_resize: per sample, the dense resampling matrices of both axes
    from the formula (resample_matrix_ref) applied to the whole image."""
    h, w = images[0].shape[-2:]
    dtype = torch.promote_types(images[0].dtype, torch.float32)
    outs = [[] for _ in images]
    for i, (top, left, ch, cw) in enumerate(windows.tolist()):
        ry = resample_matrix_ref(top, ch, size, h, dtype).to(images[0].device)
        rx = resample_matrix_ref(left, cw, size, w, dtype).to(images[0].device)
        for out, x in zip(outs, images):
            out.append(ry @ x[i].to(dtype) @ rx.T)
    return tuple(torch.stack(out) for out in outs)


def paired_random_resized_crop(a, b, seed, size=224, mode="official", ref=False):
    """The same random crop of each image pair, resized to size x size (bicubic, antialias). One
    window per sample, drawn from a CPU generator seeded with `seed` (no device sync). ref: the
    per-sample dense formula (crop_resize_ref) instead of the batched matmuls."""
    windows = crop_windows(a.shape[-2], a.shape[-1], a.shape[0], seed, mode)
    return (crop_resize_ref if ref else crop_resize)((a, b), windows, size)


# ----------------------------------------------------------------------------- networks
def build_lpips(weights="pretrained"):
    import lpips
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if weights == "pretrained":
        path = os.path.join(_torch_home(), "hub", "checkpoints", VGG_FILE)
        if not os.path.isfile(path):
            raise _missing("VGG16 (LPIPS)", path, VGG_URL, f"put it at {path}")
        vgg = torch.load(path, map_location="cpu", weights_only=True)
        # lpips splits vgg16.features into slices that keep the layer indices: net.slice{k}.{i}
        own = net.net.state_dict()
        mapped = {}
        for k in own:
            i = k.split(".", 2)[1:]                     # slice1.0.weight -> ["0", "weight"]
            mapped[k] = vgg[f"features.{i[0]}.{i[1]}"]
        net.net.load_state_dict(mapped)
    return net.eval().requires_grad_(False)


def convnext_hf_to_timm(state: dict) -> dict:
    """Map a Hugging Face ConvNextV2 state dict (facebook/convnextv2-*) onto timm's convnextv2 names.
    The classifier is dropped (the loss uses the pooled, LayerNormed features)."""
    out = {}
    block = r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
    rules = [
        (r"^convnextv2\.embeddings\.patch_embeddings\.(weight|bias)$", r"stem.0.\1"),
        (r"^convnextv2\.embeddings\.layernorm\.(weight|bias)$", r"stem.1.\1"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(weight|bias)$",
         r"stages.\1.downsample.\2.\3"),
        (block + r"dwconv\.(weight|bias)$", r"stages.\1.blocks.\2.conv_dw.\3"),
        (block + r"layernorm\.(weight|bias)$", r"stages.\1.blocks.\2.norm.\3"),
        (block + r"pwconv1\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc1.\3"),
        (block + r"grn\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.grn.\3"),
        (block + r"pwconv2\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc2.\3"),
        (r"^convnextv2\.layernorm\.(weight|bias)$", r"head.norm.\1"),
    ]
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        for pat, rep in rules:
            if re.match(pat, k):
                new = re.sub(pat, rep, k)
                out[new] = v.reshape(-1) if ".grn." in new else v     # HF GRN params are [1, 1, 1, C]
                break
        else:
            raise ValueError(f"unexpected key {k!r} in a Hugging Face ConvNextV2 checkpoint")
    return out


def _read_weights(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))


def build_convnext(weights="pretrained", name="convnextv2_base"):
    import timm
    net = timm.create_model(name, pretrained=False, num_classes=0)
    if weights == "pretrained":
        path = os.environ.get("PMF_CONVNEXT_WEIGHTS",
                              os.path.join(_torch_home(), "pmf_fast", "convnextv2-base-22k-224.safetensors"))
        if not os.path.isfile(path):
            raise _missing("ConvNeXt-V2-Base", path, CONVNEXT_HF,
                           "set PMF_CONVNEXT_WEIGHTS to the file or put it at that path")
        state = _read_weights(path)
        if any(k.startswith("convnextv2.") for k in state):
            state = convnext_hf_to_timm(state)
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def convnext_features(net, x):
    """Global-average-pooled, LayerNormed features with the head removed ([B, 1024] for base)."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


# ----------------------------------------------------------------------------- kept samples
# The networks run on the samples with t < perceptual_max_t only (the rest are multiplied by 0 in
# the loss: about a third at the B/16 time sampler, pmf_fast/flops.py kept_fraction), their count
# rounded up to a multiple of ceil(n / PERCEPTUAL_BUCKETS): at most 8 batch shapes, within
# torch._dynamo's default recompile limit of 8 should the networks be compiled, for on average
# half a bucket (1/16 of the batch) of padding rows.
PERCEPTUAL_BUCKETS = 8


def kept_rows(keep, buckets=PERCEPTUAL_BUCKETS):
    """The rows the networks run on for the host bool mask keep [n]: the kept samples in order, then
    dropped ones as padding up to the kept count rounded up to a multiple of ceil(n / buckets).
    Returns (rows int64 [m], the kept count k <= m)."""
    n = keep.numel()
    kept, dropped = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    step = -(-n // buckets)
    return torch.cat([kept, dropped])[:min(n, -(-len(kept) // step) * step)], len(kept)


def start_host_copy(x):
    """Queue a copy of x to the host; returns a function that waits for it and gives the copy. On a
    GPU read it after queuing more work: pmf_loss queues the copy of the kept-sample mask before the
    model's forward and reads it after, so the wait ends while the GPU still runs that forward and
    the GPU does not idle for it (the one host sync the gather needs: its shapes are the count)."""
    if x.device.type != "cuda":
        return lambda: x.cpu()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read():
        done.synchronize()
        return host
    return read


class PerceptualLoss(nn.Module):
    """Per-sample LPIPS and ConvNeXt feature distances; a term whose weight is 0 is not built."""

    def __init__(self, lpips_weight, convnext_weight, weights="pretrained", convnext_name="convnextv2_base",
                 crop="official", size=224):
        super().__init__()
        if crop not in CROP_MODES:
            raise ValueError(f"crop mode {crop!r}: use one of {CROP_MODES}")
        self.crop = crop                               # objective.perceptual_crop
        self.size = size                               # crop side the networks see (224 as trained)
        self.lpips = build_lpips(weights) if lpips_weight > 0 else None
        self.convnext = build_convnext(weights, convnext_name) if convnext_weight > 0 else None

    def distances(self, a, b):
        """(LPIPS [m], ConvNeXt [m]) of the cropped pairs a, b [m, C, size, size]; None for a term off."""
        if a.shape[1] == 1:                            # grayscale data: the nets take RGB
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        lp = self.lpips(a, b).flatten() if self.lpips is not None else None
        cn = None
        if self.convnext is not None:
            diff = convnext_features(self.convnext, a) - convnext_features(self.convnext, b)
            cn = diff.to(torch.promote_types(diff.dtype, torch.float32)).square().sum(-1)    # bf16 -> fp32
        return lp, cn

    def forward(self, x_hat, x, seed: int, keep=None):
        """Per-sample distances [n] of x_hat and x under the paired crop of `seed`. keep: a host bool
        mask [n] (start_host_copy); the crop and the networks then run on the kept samples only
        (kept_rows) and the other samples get exactly 0, as multiplying by the mask gives. Every
        sample keeps its window: all n are drawn, in order, and the kept ones picked."""
        n, dev = x_hat.shape[0], x_hat.device
        windows = crop_windows(x_hat.shape[-2], x_hat.shape[-1], n, seed, self.crop)
        rows, k = kept_rows(torch.ones(n, dtype=torch.bool) if keep is None else keep.cpu())
        if k == 0:                                     # nothing below the threshold: no crop, no networks
            zero = x_hat.new_zeros(n, dtype=torch.promote_types(x_hat.dtype, torch.float32))
            return tuple(None if net is None else zero for net in (self.lpips, self.convnext))
        rows_dev = (rows.pin_memory() if dev.type == "cuda" else rows).to(dev, non_blocking=True)
        a, b = crop_resize((x_hat[rows_dev], x[rows_dev]), windows[rows], self.size)
        dists = self.distances(a.to(x_hat.dtype), b.to(x_hat.dtype))
        # the padding rows (past k) are dropped, so no gradient reaches them
        return tuple(None if d is None else d.new_zeros(n).index_copy(0, rows_dev[:k], d[:k]) for d in dists)
