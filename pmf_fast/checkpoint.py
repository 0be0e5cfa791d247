"""Checkpoints: atomic writes, clear errors, resume from the newest readable one in a run directory.

A checkpoint is one torch file `ckpt_<step>.pt` holding the model, optimizers, EMAs, step, RNG
states, data position and the resolved config. It is written with pmf_fast.atomic (a temporary file
in the same directory, fsynced, renamed over the final name), so a crash mid-write leaves the
previous checkpoints intact; the `keep` newest are kept. A kill leaves at most a temporary file,
which `remove_stale_temporaries` deletes at the next start.

    remove_stale_temporaries(run_dir)        at start: [removed temporary files]
    save_checkpoint(run_dir, step, state)    refuse non-finite states first with all_finite(state)
    state, path = load_latest(run_dir)       newest readable checkpoint, falling back with a warning
"""
import glob
import os
import re

import torch

from .atomic import atomic_write, clean_temporaries

PATTERN = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- files in a run directory

def list_checkpoints(run_dir):
    """[(step, path)] sorted by step."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*.pt")):
        m = PATTERN.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir):
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint (ckpt_<step>.pt) in {run_dir!r} to resume from")
    return found[-1][1]


def remove_stale_temporaries(run_dir):
    """Delete the temporary checkpoint files (ckpt_<step>.pt.tmp.<pid>) that a killed process left in
    run_dir; returns their paths. Call once at start, before any checkpoint is written."""
    if not os.path.isdir(run_dir):
        return []
    return clean_temporaries(run_dir, "ckpt_*.pt")


# ---------------------------------------------------------------------------- save

def save_atomic(obj, path):
    """torch.save(obj) to path, atomically (kept for callers of the old name)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def all_finite(state):
    """False if any floating-point tensor in a nested state (dicts, lists, tuples) holds NaN or Inf.
    One host sync for the whole state: the checks are stacked on each tensor's device first."""
    flags = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            if (x.is_floating_point() or x.is_complex()) and x.numel():
                flags.append(torch.isfinite(x).all())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    by_device = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f)
    return all(bool(torch.stack(fs).all()) for fs in by_device.values())


def save_checkpoint(run_dir, step, state, keep=2):
    """Write run_dir/ckpt_<step>.pt atomically, then delete all but the `keep` newest. An unwritable
    directory or a full disk raises CheckpointError (one line, naming the directory); the previous
    checkpoints are left intact."""
    path = os.path.join(run_dir, f"ckpt_{step:08d}.pt")
    try:
        save_atomic(state, path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {os.path.basename(path)} in {run_dir!r}: "
                              f"{e.strerror or e} (full disk or no write permission?); "
                              "the previous checkpoints are intact") from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


# ---------------------------------------------------------------------------- load

def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file, with an error that says what is wrong and what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, unreadable, ...
        raise CheckpointError(
            f"checkpoint {path!r} is unreadable ({type(e).__name__}: {e}). It is probably truncated or "
            "not a pmf-fast checkpoint. The file was left untouched: move it aside to resume from the "
            "previous checkpoint in the same directory.") from None


def load_latest(run_dir, log=print, map_location="cpu"):
    """(state, path) of the newest readable checkpoint in run_dir. An unreadable newer one (truncated,
    corrupt) is skipped with a one-line warning through `log` and left untouched on disk. Raises
    CheckpointError when there is no checkpoint or none is readable."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint (ckpt_<step>.pt) in {run_dir!r} to resume from")
    bad = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError:
            log(f"warning: checkpoint {path} is unreadable (truncated or corrupt); left untouched, "
                "trying the previous one")
            bad.append(os.path.basename(path))
            continue
        return state, path
    raise CheckpointError(f"no readable checkpoint in {run_dir!r}: {', '.join(bad)} are all truncated or "
                          "corrupt (left untouched)")
