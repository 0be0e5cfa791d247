"""Perceptual losses on the u-head's x prediction (paper App. A; official utils/auxloss_util.py):
LPIPS-VGG (the `lpips` package) and the ConvNeXt-V2-Base pooled-feature loss (timm), both on one
paired random-resized crop to 224 (scale (0.08, 1), ratio (3/4, 4/3), bicubic with antialias; by
default the official one-draw rule with clipped sides, see crop_params), images in [-1, 1] without
ImageNet normalisation, networks frozen in eval mode.

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
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def paired_random_resized_crop(a, b, seed, size=224, mode="official"):
    """The same random crop of each image pair, resized to size x size (bicubic, antialias). One
    window per sample, drawn from a CPU generator seeded with `seed` (no device sync)."""
    gen = torch.Generator().manual_seed(seed)
    outs_a, outs_b = [], []
    for i in range(a.shape[0]):
        top, left, ch, cw = crop_params(a.shape[-2], a.shape[-1], gen, mode=mode)
        pair = torch.stack([a[i, :, top:top + ch, left:left + cw], b[i, :, top:top + ch, left:left + cw]])
        pair = F.interpolate(pair.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        outs_a.append(pair[0])
        outs_b.append(pair[1])
    return torch.stack(outs_a), torch.stack(outs_b)


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
    rules = [
        (r"^convnextv2\.embeddings\.patch_embeddings\.(weight|bias)$", r"stem.0.\1"),
        (r"^convnextv2\.embeddings\.layernorm\.(weight|bias)$", r"stem.1.\1"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(weight|bias)$", r"stages.\1.downsample.\2.\3"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(weight|bias)$", r"stages.\1.blocks.\2.conv_dw.\3"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)$", r"stages.\1.blocks.\2.norm.\3"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc1.\3"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.grn.\3"),
        (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.(weight|bias)$", r"stages.\1.blocks.\2.mlp.fc2.\3"),
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


class PerceptualLoss(nn.Module):
    """Per-sample LPIPS and ConvNeXt feature distances; a term whose weight is 0 is not built."""

    def __init__(self, lpips_weight, convnext_weight, weights="pretrained", convnext_name="convnextv2_base",
                 crop="official"):
        super().__init__()
        if crop not in CROP_MODES:
            raise ValueError(f"crop mode {crop!r}: use one of {CROP_MODES}")
        self.crop = crop                               # objective.perceptual_crop
        self.lpips = build_lpips(weights) if lpips_weight > 0 else None
        self.convnext = build_convnext(weights, convnext_name) if convnext_weight > 0 else None

    def forward(self, x_hat, x, seed: int):
        a, b = paired_random_resized_crop(x_hat, x, seed, mode=self.crop)
        a = a.to(x_hat.dtype)
        b = b.to(x_hat.dtype)
        if a.shape[1] == 1:                            # grayscale data: the nets take RGB
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        lp = self.lpips(a, b).flatten() if self.lpips is not None else None
        cn = None
        if self.convnext is not None:
            cn = (convnext_features(self.convnext, a) - convnext_features(self.convnext, b)).float().square().sum(-1)
        return lp, cn
