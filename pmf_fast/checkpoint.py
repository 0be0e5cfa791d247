"""Checkpoints: atomic writes, clear errors, resume from the newest in a run directory.

A checkpoint is one torch file `ckpt_<step>.pt` holding the model, optimizers, EMAs, step, RNG
states, data position and the resolved config. It is written to a temporary file in the same
directory, flushed to disk and renamed over the final name, so a crash mid-write leaves the
previous checkpoints intact; the `keep` newest are kept.
"""
import glob
import os
import re

import torch

PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(run_dir):
    """[(step, path)] sorted by step."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        m = PATTERN.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir, step, state, keep=2):
    path = os.path.join(run_dir, f"ckpt_{step:08d}.pt")
    save_atomic(state, path)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file, with an error that says what is wrong and what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(
            f"checkpoint {path!r} is unreadable ({type(e).__name__}: {e}). It is probably truncated or "
            "not a pmf-fast checkpoint. The file was left untouched: move it aside to resume from the "
            "previous checkpoint in the same directory.") from None


def latest_checkpoint(run_dir):
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint (ckpt_<step>.pt) in {run_dir!r} to resume from")
    return found[-1][1]
