"""Everything that generates images from a model, shared by train.py and sample.py: EMA choice,
class grids, PNG output, loading our checkpoints and official ones, the periodic FID of a model and
the digits judge. The metrics themselves (eval.py, judge.py) take images, never models, so the
imports run one way: sampling -> eval, judge; nothing imports sampling back."""
import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import dist
from .atomic import atomic_write
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError, get_config
from .eval import extract, fid, stats
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


GRID_MIN_WIDTH = 512       # px: small images are enlarged by an integer factor to at least this width
GRID_GAP = 2               # px of grey between cells


def row_labels(y, nrow):
    """One label per grid row: the class index of the row's first image, as text (digits' class
    names are their indices, "0".."9"; ImageNet's are shown as indices)."""
    y = torch.as_tensor(y).flatten()
    return [str(int(y[i])) for i in range(0, len(y), nrow)]


def _font(size):
    try:
        return ImageFont.load_default(size=size)           # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()                    # the fixed bitmap font


def save_grid(images, path, nrow, labels=None, scale=None, min_width=GRID_MIN_WIDTH):
    """[N, C, H, W] in [-1, 1] -> one PNG with nrow images per row (train.py and sample.py put one
    class per row), written atomically. Each image is enlarged by an integer factor `scale` with
    nearest neighbour (default: the smallest that makes the rows at least min_width px wide, so a
    16 px digit becomes 64 px in rows of 10), cells are GRID_GAP px apart, and labels[r] (one string
    per row, see row_labels) is written left of row r. Returns the geometry: scale, left (x of the
    first column), pitch (cell size + gap), cell (h, w)."""
    arr = to_uint8(images).cpu().numpy()                     # [N, H, W, C]
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    if scale is None:
        scale = max(1, math.ceil(min_width / (nrow * w)))
    ch, cw = h * scale, w * scale
    gap = GRID_GAP
    font = _font(max(10, min(ch // 2, 48)))
    pad = max(4, ch // 8)
    if labels is not None:
        labels = [str(s) for s in labels]
        if len(labels) != rows:
            raise ValueError(f"save_grid: {len(labels)} labels for {rows} rows (one label per row)")
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        left = 2 * pad + max(probe.textbbox((0, 0), s, font=font)[2] for s in labels)
    else:
        left = 0
    height, width = rows * ch + (rows - 1) * gap, left + nrow * cw + (nrow - 1) * gap
    canvas = np.full((height, width, c), 96, dtype=np.uint8)  # grey gaps
    canvas[:, :left] = 0                                     # black label column
    up = arr.repeat(scale, axis=1).repeat(scale, axis=2)     # nearest neighbour
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = r * (ch + gap), left + col * (cw + gap)
        canvas[y0:y0 + ch, x0:x0 + cw] = up[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if labels is not None:
        draw = ImageDraw.Draw(img)
        white = 255 if c == 1 else (255, 255, 255)
        for r, text in enumerate(labels):
            x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
            draw.text((pad - x0, r * (ch + gap) + (ch - (y1 - y0)) // 2 - y0), text, fill=white, font=font)
    atomic_write(str(path), lambda f: img.save(f, format="PNG"))
    return {"scale": scale, "left": left, "pitch": (ch + gap, cw + gap), "cell": (ch, cw)}


def _cannot(path, why):
    """The CheckpointError of a file that cannot be sampled from, in one line (torch's messages span several)."""
    why = " ".join(str(why).split())
    return CheckpointError(f"cannot sample from {path!r}: {why[:400]}{' ...' if len(why) > 400 else ''}")


def _load_weights(path, load):
    """load() (a load_state_dict): the errors of weights that do not fit their model (torch's
    "Error(s) in loading state_dict", our name map's ValueError) become one line naming `path`;
    any other error (a bug, or CUDA's) keeps its type."""
    try:
        return load()
    except RuntimeError as e:
        if not str(e).startswith("Error(s) in loading state_dict"):
            raise
        raise _cannot(path, e) from None
    except ValueError as e:                     # load_official_state_dict: missing or unexpected names
        raise _cannot(path, e) from None


def _is_state_dict(d):
    return isinstance(d, dict) and all(isinstance(k, str) for k in d)


def load_for_sampling(path, preset=None, ema="auto", device="cpu"):
    """(model, cfg) from one of our checkpoints (its config and the chosen EMA) or from an official
    release file such as pMF-B-16.pt (give its preset, e.g. pMF-B/16). A file that cannot be sampled
    from (unreadable, not a checkpoint, weights or EMAs that do not fit its config, no such EMA)
    raises CheckpointError, one line naming the file; an unknown preset raises ConfigError. Nothing
    else is caught: an error of this code keeps its type and traceback. The weights are loaded on
    the CPU, then moved to `device`."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and "config" in state and "model" in state:        # ours
        d = state["config"]
        if not isinstance(d, dict) or not all(isinstance(v, dict) for k, v in d.items() if k != "preset"):
            raise _cannot(path, "its config is not a dict of sections")
        try:
            cfg = Config.from_dict(d)
        except ConfigError as e:                # a field this version does not know, or a bad value
            raise _cannot(path, f"its config: {e}") from None
        if not _is_state_dict(state["model"]):
            raise _cannot(path, "its 'model' is not a state dict")
        model = PMFDiT(cfg.model, t_eps=cfg.objective.t_eps)
        _load_weights(path, lambda: model.load_state_dict(state["model"]))
        choice = ema if ema != "auto" else cfg.sample.ema
        if choice != "raw":
            from .ema import EMAs
            kept = state.get("emas")
            if not isinstance(kept, dict) or not all(_is_state_dict(v) for v in kept.values()):
                raise _cannot(path, "it holds no EMA weights (pass --ema raw for the raw weights)")
            emas = EMAs(model, cfg.train.ema_halflives_kimg, cfg.train.batch_size)
            try:
                emas.load_state_dict(kept)
            except (ValueError, KeyError, RuntimeError) as e:     # other EMAs, a missing or misshapen tensor
                raise _cannot(path, f"its EMAs do not fit its config ({type(e).__name__}: {e})") from None
            try:
                key = pick_ema(emas, choice)
            except ValueError as e:             # no EMA of that half-life in this file
                raise _cannot(path, e) from None
            model = emas.copy_into(model, key)
        return model.to(device).eval(), cfg
    if not _is_state_dict(state):
        raise _cannot(path, f"it holds a {type(state).__name__}, neither a pmf-fast checkpoint nor a state dict")
    if preset is None:
        raise _cannot(path, "not a pmf-fast checkpoint; for an official release file pass its preset "
                            "(e.g. --preset pMF-B/16)")
    cfg = get_config(preset)
    model = PMFDiT(cfg.model, aux_head=any(k.startswith(("v_heads", "net.v_heads")) for k in state),
                   t_eps=cfg.objective.t_eps)
    _load_weights(path, lambda: load_official_state_dict(model, state, source=path))
    return model.to(device).eval(), cfg


@torch.no_grad()
def fid_of_model(model, cfg, num, extractor, ref_stats, device, rank=0, world=1, batch=100):
    """FID of `num` one-step samples (balanced labels, seeds 0..num-1) against reference statistics;
    each rank draws every world-th batch, rank 0 gets the number (others None)."""
    labels = torch.arange(num) % cfg.model.num_classes
    feats = []
    for start in range(rank * batch, num, world * batch):
        idx = torch.arange(start, min(num, start + batch))
        images = sample_images(model, cfg, labels[idx].to(device), idx)
        feats.append(extract(extractor, to_uint8(images).cpu().numpy(), batch)[0])
    feats = np.concatenate(feats) if feats else np.zeros((0, 0))
    if dist.is_dist():
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, feats)
        feats = np.concatenate([f for f in everyone if len(f)])
    return fid(stats(feats), ref_stats) if rank == 0 else None


@functools.lru_cache(maxsize=2)
def digits_judge(image_size):
    """(judge, held-out labels) for digits at this size. The judge is deterministic (a fixed split
    and seed), so a process trains it once (about 4 s on 2 CPU cores) and every later caller reuses it."""
    from .data.digits import load_digits_split
    from .judge import DigitsJudge
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(image_size)
    return DigitsJudge(x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy()), y_te


def judge_digits(model, cfg, device, seed=1):
    """Metrics of the digits judge (pmf_fast/judge.py) for one-step samples of `model`: as many
    samples as held-out digits, with the held-out labels."""
    judge, y_te = digits_judge(cfg.model.image_size)
    samples = sample_images(model, cfg, y_te.to(device), seed * 1_000_000 + torch.arange(len(y_te)))
    return judge.score(samples.cpu().numpy(), y_te.numpy())


class TrainSampling:
    """What a training run samples: a class grid every train.sample_every steps and at the end, FID
    every train.eval_every steps (when the Inception weights and the reference exist), and the digits
    judge at the end of a digits run. Every rank calls each method (gathering FSDP2's shards is a
    collective); rank 0 writes."""

    def __init__(self, cfg: Config, *, model, emas, run_dir, num_classes, device, rank, world, log):
        self.cfg, self.model, self.emas, self.run_dir = cfg, model, emas, run_dir
        self.num_classes, self.device, self.rank, self.world, self.log = num_classes, device, rank, world, log
        self.fid_setup = None
        if cfg.train.eval_every:
            from .eval import InceptionExtractor, reference
            skip = None
            # rank 0 alone reads or computes the reference statistics (and writes their cache): only
            # it computes the FID; the others wait here, and stop with its line if it fails
            with dist.agreed("computing the FID reference statistics"):
                try:
                    extractor = InceptionExtractor(device)
                    ref_stats = (reference(cfg.train.fid_ref, extractor, cfg.model.image_size, features=False)[0]
                                 if rank == 0 else None)
                    self.fid_setup = (extractor, ref_stats)
                except (FileNotFoundError, ValueError) as e:
                    skip = str(e)
            skips = [s for s in dist.all_gather_objects(skip) if s]
            if skips:                                                              # every rank, or none
                self.fid_setup = None
                log(f"periodic FID skipped: {skips[0]}")

    def sampling_model(self):
        """An unsharded copy holding the chosen EMA (or the raw weights); collective under FSDP2."""
        key = pick_ema(self.emas, self.cfg.sample.ema)
        weights = (self.emas.full_state(key) if key else
                   {n: dist.full_tensor(p.detach()) for n, p in self.model.named_parameters()})
        net = PMFDiT(self.cfg.model, t_eps=self.cfg.objective.t_eps).to(self.device)
        net.load_state_dict(weights)
        return net.eval()

    def grid(self, step):
        """The class grid as runs/<run>/samples_<step>.png; its path on rank 0, None elsewhere."""
        net, s = self.sampling_model(), self.cfg.sample
        if self.rank != 0:
            return None
        path = f"{self.run_dir}/samples_{step:08d}.png"
        imgs, y = class_grid(net, self.cfg, min(s.grid_classes, self.num_classes), self.device)
        save_grid(imgs, path, nrow=s.grid_per_class, labels=row_labels(y, s.grid_per_class))
        self.log.image(step, "samples", path)
        return path

    def _due(self, step):
        """(grid, FID) due at this step."""
        tc = self.cfg.train
        return bool(tc.sample_every and step % tc.sample_every == 0), self.fid_setup is not None and \
            step % tc.eval_every == 0

    def due(self, step):
        """Whether periodic() samples at this step."""
        return any(self._due(step))

    def periodic(self, step):
        tc = self.cfg.train
        grid, fid_due = self._due(step)
        if grid:
            self.grid(step)
        if fid_due:
            n = tc.eval_samples
            value = fid_of_model(self.sampling_model(), self.cfg, n, *self.fid_setup, self.device, self.rank,
                                 self.world)
            self.log.row(step, {f"fid_{n // 1000}k" if n % 1000 == 0 else f"fid_{n}": value})

    def final(self, step, train_seconds):
        """The last grid and, on digits, the judge's metrics (metrics.json)."""
        self.log(f"samples: {self.grid(step)}")
        if self.cfg.train.data != "digits":
            return
        net = self.sampling_model()
        if self.rank == 0:
            metrics = judge_digits(net, self.cfg, self.device)
            metrics.update(steps=step, train_seconds=round(train_seconds, 1))
            self.log.write_json("metrics.json", metrics)
            self.log.scalars(step, {f"judge/{k}": v for k, v in metrics.items()})
            self.log("judge: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
