"""Generate images from a pmf-fast checkpoint or an official pMF release file (one step by default).

    python sample.py --ckpt runs/<run>/ckpt_00002000.pt --out grid.png
    torchrun --standalone --nproc-per-node=8 sample.py --ckpt pMF-B-16.pt --preset pMF-B/16 --out b16.npz
    python sample.py --ckpt pMF-H-16.pt --preset pMF-H/16 --omega 7.0 --t-min 0.2 --t-max 0.6 --out h16.png

A .png gets a grid (--per-row images a row, one class a row). A .npz gets the ADM layout: arr_0
uint8 [N, H, W, C], arr_1 int64 labels; N = 50,000 by default, labels cycling through the classes
(50 per class for ImageNet), sample i drawn from the noise of seed (--seed x 10^9 + i), so the result
does not depend on the batch size or the number of ranks. Under torchrun the ranks share the work;
finished batches are kept in <out>.parts/ and an interrupted run resumes from there (same command)
without repeating or losing a sample. Guidance (omega, interval), step count and EMA default to the
checkpoint's config (the paper's recommended values for the official presets); values given on the
command line are checked like any config (pmf_fast.config.validate). Bad input (a missing or
unreadable --ckpt, an --out that cannot be written, a refused setting) stops with a one-line error
before any sampling; under torchrun every rank stops, those that did not fail with the failing rank's
line. An error of this code itself keeps its traceback.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

from pmf_fast import dist
from pmf_fast.atomic import atomic_write, clean_temporaries
from pmf_fast.checkpoint import CheckpointError
from pmf_fast.config import ConfigError, config_diff, get_config, validate
from pmf_fast.meanflow import to_uint8
from pmf_fast.sampling import load_for_sampling, row_labels, sample_images, save_grid


class OutputError(OSError):
    """--out cannot be written (or its .parts folder holds another run): the message names the path,
    the reason and the remedy."""


def save_npz_atomic(path, **arrays):
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def check_output(out):
    """Refuse an --out that cannot be written, before any work: a wrong extension, a directory, or a
    directory that cannot be created or written to."""
    if not out.endswith((".png", ".npz")):
        raise OutputError(f"--out {out!r} must end in .png (a grid) or .npz (ADM layout)")
    if os.path.isdir(out):
        raise OutputError(f"--out {out!r} is a directory; give a file name ending in .png or .npz")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"cannot write --out {out!r}: {folder!r} is not a writable directory "
                          f"({e.strerror or e})") from None


def load_model(a, device):
    """(model, cfg) from --ckpt with the sample settings given on the command line, validated. A file
    that cannot be sampled from raises CheckpointError (load_for_sampling), a refused setting
    ConfigError; any other error is a bug and keeps its traceback."""
    model, cfg = load_for_sampling(a.ckpt, a.preset, a.ema, device)
    if a.preset is not None:                   # ours carry their config: a --preset must agree with it
        own = {"model": cfg.to_dict()["model"]}
        diff = config_diff(own, {"model": get_config(a.preset).to_dict()["model"]})
        if diff:
            shown = ", ".join(f"{k}: {x} vs {y}" for k, x, y in diff[:3]) + (" ..." if len(diff) > 3 else "")
            raise ConfigError(f"--preset {a.preset} disagrees with {a.ckpt}, which holds a {cfg.preset} model "
                              f"({shown}); drop --preset: a pmf-fast checkpoint carries its own config")
    for field, value in (("omega", a.omega), ("t_min", a.t_min), ("t_max", a.t_max), ("num_steps", a.steps)):
        if value is not None:
            setattr(cfg.sample, field, value)
    validate(cfg)
    return model, cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our ckpt_<step>.pt, or an official file such as pMF-B-16.pt")
    p.add_argument("--preset", default=None, help="preset of an official file, e.g. pMF-B/16")
    p.add_argument("--out", default="samples.png", help=".png grid or .npz (ADM layout)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="number of images (png: classes x per-row; npz: 50000)")
    p.add_argument("--classes", type=int, default=None, help="classes to cycle through (default: all)")
    p.add_argument("--per-row", type=int, default=8)
    p.add_argument("--omega", type=float, default=None)
    p.add_argument("--t-min", type=float, default=None)
    p.add_argument("--t-max", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (1 = one-step)")
    p.add_argument("--ema", default="auto", help="auto, raw, or an EMA half-life in kimg")
    p.add_argument("--batch", type=int, default=64, help="images per batch and per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: this rank's GPU, else the CPU")
    a = p.parse_args(argv)
    for name in ("num_samples", "classes", "per_row", "batch"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.ema not in ("auto", "raw"):
        try:
            float(a.ema)
        except ValueError:
            p.error(f"--ema {a.ema!r}: expected auto, raw or an EMA half-life in kimg (e.g. --ema 50)")
    return a


def main(argv=None):
    """Check the arguments, load the model on every rank, then write a grid or an .npz. The steps that
    can fail on one rank while the others go on to a collective (loading, and what rank 0 does alone)
    are agreed (pmf_fast.dist.agreed): all ranks stop together, the failing one with its own error,
    the others with RankFailed naming it, none left waiting in a later collective."""
    a = parse_args(argv)
    check_output(a.out)
    rank, world, _, device = dist.setup()
    device = torch.device(a.device) if a.device else device
    with dist.agreed("loading the checkpoint"):
        model, cfg = load_model(a, device)
    if a.out.endswith(".npz"):
        write_npz(a, model, cfg, rank, world, device)
    else:
        write_grid(a, model, cfg, rank, device)
    dist.cleanup()


def write_grid(a, model, cfg, rank, device):
    """A .png grid, --per-row images a row, one class a row: small, drawn by rank 0 alone."""
    k = a.classes or cfg.model.num_classes
    n = a.num_samples or k * a.per_row
    labels = (torch.arange(n) // a.per_row) % k
    seeds = a.seed * 1_000_000_000 + torch.arange(n)
    with dist.agreed(f"writing {a.out}"):
        if rank == 0:
            images = torch.cat([sample_images(model, cfg, labels[i:i + a.batch].to(device), seeds[i:i + a.batch]).cpu()
                                for i in range(0, n, a.batch)])
            save_grid(images, a.out, nrow=a.per_row, labels=row_labels(labels, a.per_row))
            print(f"wrote {n} samples to {a.out}")


def open_parts(parts, settings):
    """Make (or resume) the folder of finished batches: a settings.json that differs from this run's
    is refused, the temporaries of a killed run are removed."""
    os.makedirs(parts, exist_ok=True)
    clean_temporaries(parts)                                      # chunks half-written by a killed run
    meta = os.path.join(parts, "settings.json")
    if not os.path.exists(meta):
        atomic_write(meta, lambda f: json.dump(settings, f), mode="w")
        return
    try:
        with open(meta) as f:
            old = json.load(f)
    except ValueError as e:
        raise OutputError(f"{meta} is not readable JSON ({e}): delete {parts} to start over") from None
    if old != settings:
        raise OutputError(f"{parts} holds an interrupted run with other settings ({old}); "
                          "delete it or rerun with the same arguments to resume")


def write_npz(a, model, cfg, rank, world, device):
    """The ADM layout (arr_0 uint8 [N, H, W, C], arr_1 labels), N 50,000 by default with the labels
    cycling through the classes. The batches are shared out over the ranks (batch c on rank c mod
    world); each finished one is kept in <out>.parts/, so the same command resumes an interrupted
    run; rank 0 writes <out> from them at the end and removes the folder."""
    k = a.classes or cfg.model.num_classes
    n = a.num_samples or 50000
    labels = torch.arange(n) % k
    seeds = a.seed * 1_000_000_000 + torch.arange(n)
    settings = {"ckpt": os.path.abspath(a.ckpt), "n": n, "classes": k, "seed": a.seed, "batch": a.batch,
                "ema": a.ema, "omega": cfg.sample.omega, "t_min": cfg.sample.t_min, "t_max": cfg.sample.t_max,
                "num_steps": cfg.sample.num_steps}
    parts = a.out + ".parts"
    num_chunks = (n + a.batch - 1) // a.batch

    def chunk(c):
        return os.path.join(parts, f"chunk_{c:07d}.npz")

    with dist.agreed(f"opening {parts}"):
        if rank == 0:
            open_parts(parts, settings)
    mine = range(rank, num_chunks, world)
    todo = [c for c in mine if not os.path.exists(chunk(c))]
    # not agreed: a rank that fails here leaves at once and torchrun stops the others (the finished
    # batches stay for the resume); an agreement would keep it waiting for the others' last batches
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sampling (rank 0 of {world})")
    for c in todo:
        idx = torch.arange(c * a.batch, min(n, (c + 1) * a.batch))
        images = sample_images(model, cfg, labels[idx].to(device), seeds[idx])
        save_npz_atomic(chunk(c), images=to_uint8(images).cpu().numpy(), labels=labels[idx].numpy())
        if bar is not None:
            bar.update(1)
    dist.barrier()
    with dist.agreed(f"writing {a.out}"):
        if rank == 0:
            arrays = [np.load(chunk(c)) for c in range(num_chunks)]
            save_npz_atomic(a.out, arr_0=np.concatenate([z["images"] for z in arrays]),
                            arr_1=np.concatenate([z["labels"] for z in arrays]))
            shutil.rmtree(parts)
            print(f"wrote {n} samples to {a.out} (omega {cfg.sample.omega}, interval [{cfg.sample.t_min}, "
                  f"{cfg.sample.t_max}], {cfg.sample.num_steps} step(s), {world} rank(s))")


def cli(argv=None):
    """main() with bad input reported in one line and exit status 1, as train.py's __main__."""
    try:
        main(argv)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, OSError) as e:         # bad --ckpt, unwritable --out, full disk: what and where
        sys.exit(f"error: {e}")
    except dist.RankFailed as e:                    # another rank's error (its own line is in its log)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
