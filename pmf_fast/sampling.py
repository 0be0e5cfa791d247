"""Sampling helpers shared by train.py and sample.py: EMA choice, class grids, PNG output,
loading our checkpoints and official ones, and the digits judge."""

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint
from .config import Config, get_config
from .meanflow import generate, to_uint8
from .model import PMFDiT, load_official_state_dict


def pick_ema(emas, choice):
    """'auto': the longest half-life; 'raw': None (the raw weights); else a half-life in kimg."""
    if choice == "raw":
        return None
    if choice == "auto":
        return emas.name(max(emas.halflives))
    key = emas.name(float(choice))
    if key not in emas.params:
        raise ValueError(f"no EMA with half-life {choice} kimg; this run keeps {sorted(emas.params)}")
    return key


@torch.no_grad()
def class_grid(model, cfg: Config, num_classes, device, seed=0):
    """grid_per_class one-step samples for each of the first num_classes classes."""
    per = cfg.sample.grid_per_class
    y = torch.arange(num_classes, device=device).repeat_interleave(per)
    return sample_images(model, cfg, y, seed * 1_000_000 + torch.arange(len(y))), y


def sample_noise(seeds, cfg: Config):
    """One noise image per seed (CPU generators: the same on any device, batch size or rank)."""
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) \
        * cfg.objective.noise_scale


@torch.no_grad()
def sample_images(model, cfg: Config, y, seeds):
    """Images in [-1, 1] for labels y, each from the noise of its own seed."""
    s = cfg.sample
    model.eval()
    return generate(model, sample_noise(seeds, cfg).to(y.device), y, s.omega, s.t_min, s.t_max, s.num_steps)


def save_grid(images, path, nrow):
    """[N, C, H, W] in [-1, 1] -> one PNG, nrow images per row."""
    arr = to_uint8(images).cpu().numpy()                     # [N, H, W, C]
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.zeros((rows * h, nrow * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = arr[i]
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)


def load_for_sampling(path, preset=None, ema="auto", device="cpu"):
    """(model, cfg) from one of our checkpoints (its config and the chosen EMA) or from an official
    release file such as pMF-B-16.pt (give its preset, e.g. pMF-B/16)."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and "config" in state and "model" in state:        # ours
        cfg = Config.from_dict(state["config"])
        model = PMFDiT(cfg.model, t_eps=cfg.objective.t_eps)
        model.load_state_dict(state["model"])
        choice = ema if ema != "auto" else cfg.sample.ema
        if choice != "raw":
            from .ema import EMAs
            emas = EMAs(model, cfg.train.ema_halflives_kimg, cfg.train.batch_size)
            emas.load_state_dict(state["emas"])
            model = emas.copy_into(model, pick_ema(emas, choice))
        return model.to(device).eval(), cfg
    if preset is None:
        raise ValueError(f"{path} is not a pmf-fast checkpoint; for an official release file pass its preset "
                         "(e.g. --preset pMF-B/16)")
    cfg = get_config(preset)
    model = PMFDiT(cfg.model, aux_head=any(k.startswith(("v_heads", "net.v_heads")) for k in state),
                   t_eps=cfg.objective.t_eps)
    load_official_state_dict(model, state, source=path)
    return model.to(device).eval(), cfg


def judge_digits(model, cfg, device, seed=1):
    """Metrics of the digits judge (pmf_fast/judge.py) for one-step samples of `model`: as many
    samples as held-out digits, with the held-out labels."""
    from .data.digits import load_digits_split
    from .judge import DigitsJudge
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(cfg.model.image_size)
    judge = DigitsJudge(x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy())
    samples = sample_images(model, cfg, y_te.to(device), seed * 1_000_000 + torch.arange(len(y_te)))
    return judge.score(samples.cpu().numpy(), y_te.numpy())
