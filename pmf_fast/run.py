"""The pieces of a training run around the loop in train.py: which run directory and whether it
resumes, the training state (step, random streams, data positions, elapsed time) as one state
dict, the stop signals, the learning-rate schedule, and the log (stdout, log.jsonl, TensorBoard).

Run directories: `--name X` (default: the preset's name) is runs/X. When runs/X holds checkpoints of
the same config, the same command resumes it (so `torchrun --max-restarts` and a rerun after a
preemption continue where the run stopped); a different config there is refused, never mixed in.
`--resume runs/X key=value ...` continues a run with overrides; overrides that change tensor shapes
(model.*, the EMA half-lives) are refused before anything is written.
"""
import json
import math
import os
import signal

import torch

from .atomic import atomic_write
from .checkpoint import list_checkpoints, load_latest
from .config import Config, ConfigError, get_config, set_field, validate
from .dist import all_gather_objects

# fields that steer a run but not what it learns: they may differ when a run is continued
RUN_CONTROL = {f"train.{k}" for k in ("steps", "epochs", "time_budget_s", "log_every", "sample_every", "ckpt_every",
                                      "eval_every", "eval_samples", "fid_ref", "out_dir", "num_workers", "loader",
                                      "impl", "parallel", "shard_size", "checkpointing", "nonfinite", "max_nonfinite",
                                      "stop_check_every", "tensorboard", "precision", "data")} | {"preset"}
# fields whose change would not fit the saved tensors
SHAPES = ("model.", "train.ema_halflives_kimg")


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def config_diff(old: dict, new: dict):
    """[(field, old value, new value)] between two Config.to_dict()s."""
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _describe(diff):
    return ", ".join(f"{k}: {a} -> {b}" for k, a, b in diff[:6]) + (" ..." if len(diff) > 6 else "")


def resolve_run(preset, name, resume, overrides, log):
    """(cfg, run_dir, meta, ckpt_path): meta and ckpt_path are None for a fresh run. Raises ConfigError
    for a run directory that holds another run or shape-changing overrides, before any write."""
    if resume:
        run_dir = resume
        meta, path = load_latest(run_dir, log)
        cfg = Config.from_dict(meta["config"])
        for item in overrides:
            key, _, value = item.lstrip("-").partition("=")
            set_field(cfg, key, value)
        validate(cfg)
    else:
        cfg = get_config(preset, overrides)
        run_dir = os.path.join(cfg.train.out_dir, name or cfg.preset.replace("/", "-"))
        if not list_checkpoints(run_dir):
            saved = os.path.join(run_dir, "config.json")
            if os.path.isfile(saved):          # a run that stopped before its first checkpoint
                diff = config_diff(json.load(open(saved)), cfg.to_dict())
                if [d for d in diff if d[0] not in RUN_CONTROL]:
                    raise ConfigError(f"{run_dir} holds another run ({_describe(diff)}); pass --name for a new run")
                log(f"{run_dir} holds a run of the same config that never wrote a checkpoint: starting it over")
                for f in ("log.jsonl", "metrics.json"):
                    if os.path.exists(os.path.join(run_dir, f)):
                        os.remove(os.path.join(run_dir, f))
            elif os.path.isdir(run_dir) and os.listdir(run_dir):
                raise ConfigError(f"{run_dir} is not empty and holds no pmf-fast run; pass --name for a new run")
            return cfg, run_dir, None, None
        meta, path = load_latest(run_dir, log)
        diff = [d for d in config_diff(meta["config"], cfg.to_dict()) if d[0] not in RUN_CONTROL]
        if diff:
            raise ConfigError(f"{run_dir} holds a run with another config ({_describe(diff)}); pass --name for "
                              f"a new run, or --resume {run_dir} with overrides to continue that run")
    shape = [d for d in config_diff(meta["config"], cfg.to_dict()) if d[0].startswith(SHAPES)]
    if shape:
        raise ConfigError(f"cannot resume {run_dir} with {_describe(shape)}: the saved weights or EMAs have other "
                          "shapes; start a new run (--name) instead")
    return cfg, run_dir, meta, path


def finished(meta, cfg):
    """True when a resumed run already ended by its steps or time budget and neither was raised."""
    old = meta["config"]["train"]
    return bool(meta["train"].get("finished")) and cfg.train.steps == old["steps"] and \
        cfg.train.time_budget_s == old["time_budget_s"] and cfg.train.epochs == old["epochs"]


# ----------------------------------------------------------------------------- training state
class TrainState:
    """Step, elapsed training seconds, the objective's random streams and the loader's position.
    state_dict() gathers every rank's streams and positions (a collective); load_state_dict() gives
    each rank its own, or fresh streams when the world size changed."""

    def __init__(self, loader, device, seed, rank, world):
        self.loader, self.rank, self.world, self.seed = loader, rank, world, seed
        self.step, self.elapsed, self.finished = 0, 0.0, False
        self.gen = torch.Generator(device).manual_seed(seed + rank)     # every draw of the objective
        self.cpu_gen = torch.Generator().manual_seed(seed + rank)       # the crop seed (no GPU sync)

    def state_dict(self):
        mine = {"rng": self.gen.get_state().cpu(), "cpu_rng": self.cpu_gen.get_state(), "data": self.loader.state_dict()}
        ranks = all_gather_objects(mine)
        return {"step": self.step, "elapsed_s": self.elapsed, "finished": self.finished, "ranks": ranks}

    def load_state_dict(self, state, log):
        self.step, self.elapsed, self.finished = state["step"], state.get("elapsed_s", 0.0), False
        ranks = state["ranks"]
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            self.gen.set_state(mine["rng"].to(self.gen.get_state().device))
            self.cpu_gen.set_state(mine["cpu_rng"])
            self.loader.load_state_dict(mine["data"])
            return
        self.gen.manual_seed(self.seed + self.rank + 7919 * self.step)
        self.cpu_gen.manual_seed(self.seed + self.rank + 7919 * self.step)
        log(f"resuming on {self.world} ranks from a {len(ranks)}-rank run: fresh random streams")
        if "epoch" in ranks[0]["data"]:                # index-based positions are the same on every rank
            self.loader.load_state_dict(ranks[0]["data"])
        else:
            log("the DALI readers start a fresh epoch")


# ----------------------------------------------------------------------------- stop signals
class StopSignals:
    """SIGTERM (cluster preemption, torchrun) and SIGINT (Ctrl-C) ask for a clean stop: the loop
    finishes its step, all ranks agree at the next stop check, write a checkpoint and exit 0. A
    second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, sig, frame):
        if self.received is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(sig).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- learning rate
def lr_factor(optim, step, progress):
    """Multiplier of optim.lr: linear warm-up over optim.warmup_steps, then constant ("none") or a
    cosine to optim.min_lr_ratio at progress 1 (progress: the larger of step / steps and
    elapsed / time budget)."""
    warm = min(1.0, step / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.decay == "cosine":
        p = min(max(progress, 0.0), 1.0)
        return warm * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
    return warm


# ----------------------------------------------------------------------------- log
class Log:
    """Rank 0's record of a run: lines on stdout (or above the progress bar), log.jsonl, and
    TensorBoard under runs/<run>/tb when it is installed and train.tensorboard is on."""

    def __init__(self, run_dir, enabled, tensorboard, bar=None):
        self.run_dir, self.enabled, self.bar, self.tb = run_dir, enabled, bar, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("TensorBoard is not installed (pip install tensorboard): logging to log.jsonl only", flush=True)

    def __call__(self, msg):
        if self.enabled:
            (self.bar.write(msg) if self.bar is not None else print(msg, flush=True))

    def row(self, step, values):
        """One log.jsonl line {"step": step, **values}, echoed; TensorBoard scalars for each number."""
        if not self.enabled:
            return
        line = {"step": step, **values}
        self(" ".join(f"{k} {v}" for k, v in line.items()))
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        self.scalars(step, values)

    def scalars(self, step, values):
        """TensorBoard only (e.g. the judge's metrics, which metrics.json holds)."""
        if self.enabled and self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def image(self, step, tag, path):
        if self.enabled and self.tb is not None:
            import numpy as np
            from PIL import Image
            arr = np.asarray(Image.open(path).convert("RGB"))
            self.tb.add_image(tag, arr, step, dataformats="HWC")

    def truncate(self, step):
        """Drop log.jsonl lines after `step` (a resumed run logs those steps again), and any torn or
        unparsable line (a kill or a full disk while appending) with a warning: it never stops a
        resume. The file is rewritten atomically."""
        path = os.path.join(self.run_dir, "log.jsonl")
        if not (self.enabled and os.path.exists(path)):
            return
        keep, torn = [], []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    row = json.loads(raw)
                    if not isinstance(row, dict):
                        raise ValueError("not a log row")
                except ValueError:
                    if raw.strip():
                        torn.append(n)
                    continue
                if row.get("step", 0) <= step:
                    keep.append(raw.rstrip(b"\n") + b"\n")      # a row cut just before its newline is whole
        if torn:
            self(f"warning: {path}: dropped {len(torn)} torn or unparsable line(s) ({', '.join(map(str, torn[:5]))}"
                 f"{' ...' if len(torn) > 5 else ''}), left by a kill or a full disk")
        atomic_write(path, lambda f: f.write(b"".join(keep)))

    def write_json(self, name, obj):
        if self.enabled:
            atomic_write(os.path.join(self.run_dir, name), lambda f: json.dump(obj, f, indent=2), mode="w")

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()

