"""A run's record: rank 0's lines on stdout (or above a progress bar), log.jsonl and TensorBoard,
and the Meter that averages the loss terms between log steps over ranks."""
import json
import os
import sys
import time

from .atomic import atomic_write
from .dist import all_reduce_mean


def rank_zero(is_main):
    """The log before Log exists: print on rank 0 (flushed: torchrun pipes stdout), nothing elsewhere."""
    return (lambda s: print(s, flush=True)) if is_main else (lambda s: None)


class Meter:
    """Loss terms summed between log steps, averaged over ranks at the log step with the rate."""

    def __init__(self, batch_size):
        self.batch_size, self.sums, self.n, self.t = batch_size, {}, 0, time.time()

    def add(self, terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def row(self, **extra):
        """The log row since the last one (a collective: every rank calls it), and a fresh start."""
        terms = {k: round(all_reduce_mean(v).item() / self.n, 5) for k, v in self.sums.items()}
        rate = self.n * self.batch_size / (time.time() - self.t)
        self.sums, self.n, self.t = {}, 0, time.time()
        return {**terms, **extra, "img_per_s": round(rate, 1)}


def progress_bar(steps, is_main):
    """A tqdm bar on rank 0's terminal (None when stderr is not one: logs stay plain lines)."""
    if not (is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=steps, dynamic_ncols=True)


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

    def advance(self, steps):
        """Move the progress bar on by `steps`."""
        if self.bar is not None:
            self.bar.update(steps)

    def row(self, step, values):
        """One log.jsonl line {"step": step, **values}, echoed; TensorBoard scalars for each number."""
        if not self.enabled:
            return
        line, path = {"step": step, **values}, os.path.join(self.run_dir, "log.jsonl")
        self(" ".join(f"{k} {v}" for k, v in line.items()))
        try:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:                         # a full disk: say which file (a torn line is dropped on resume)
            raise OSError(e.errno, e.strerror, path) from None
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
