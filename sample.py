"""Generate images from a pmf-fast checkpoint or an official pMF release file (one step by default).

    python sample.py --ckpt runs/<run>/ckpt_00002000.pt --out grid.png
    python sample.py --ckpt pMF-B-16.pt --preset pMF-B/16 --num 50000 --out samples.npz
    python sample.py --ckpt pMF-H-16.pt --preset pMF-H/16 --omega 7.0 --t-min 0.2 --t-max 0.6 --out h16.png

A .png gets a grid (--per-row images a row); a .npz gets the ADM layout: arr_0 uint8 [N, H, W, C],
arr_1 int64 labels. Labels cycle through the classes (balanced); noise is seeded per batch (--seed, batch start).
Guidance (omega, interval), step count and EMA default to the checkpoint's config (the paper's
recommended values for the official presets) and can be overridden here.
"""
import argparse
import os

import numpy as np
import torch

from pmf_fast.meanflow import to_uint8
from pmf_fast.sampling import load_for_sampling, sample_images, save_grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our ckpt_<step>.pt, or an official file such as pMF-B-16.pt")
    p.add_argument("--preset", default=None, help="preset of an official file, e.g. pMF-B/16")
    p.add_argument("--out", default="samples.png", help=".png grid or .npz (ADM layout)")
    p.add_argument("--num", type=int, default=None, help="number of images (png: classes x per-row; npz: 50000)")
    p.add_argument("--classes", type=int, default=None, help="classes to cycle through (default: all)")
    p.add_argument("--per-row", type=int, default=8)
    p.add_argument("--omega", type=float, default=None)
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (1 = one-step)")
    p.add_argument("--ema", default="auto", help="auto, raw, or an EMA half-life in kimg")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)

    model, cfg = load_for_sampling(a.ckpt, a.preset, a.ema, a.device)
    for field, value in (("omega", a.omega), ("t_min", a.t_min), ("t_max", a.t_max), ("num_steps", a.steps)):
        if value is not None:
            setattr(cfg.sample, field, value)
    k = a.classes or cfg.model.num_classes
    npz = a.out.endswith(".npz")
    n = a.num or (50000 if npz else k * a.per_row)
    labels = (torch.arange(n) // (1 if npz else a.per_row)) % k       # balanced: n / k per class
    bar = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="sampling")
    except ImportError:
        pass
    out = []
    for start in range(0, n, a.batch):
        y = labels[start:start + a.batch].to(a.device)
        out.append(sample_images(model, cfg, y, seed=a.seed * 1_000_003 + start).cpu())
        if bar is not None:
            bar.update(len(y))
    images = torch.cat(out)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    if npz:
        tmp = a.out + ".tmp.npz"
        np.savez(tmp, arr_0=to_uint8(images).numpy(), arr_1=labels.numpy())
        os.replace(tmp, a.out)
    else:
        save_grid(images, a.out, nrow=a.per_row)
    print(f"wrote {n} samples to {a.out} (omega {cfg.sample.omega}, interval [{cfg.sample.t_min}, "
          f"{cfg.sample.t_max}], {cfg.sample.num_steps} step(s))")


if __name__ == "__main__":
    main()
