"""Checkpoints: atomic writes, clear errors, resume from the newest readable one in a run directory.

A checkpoint is one torch file `ckpt_<step>.pt` holding the model, optimizers, EMAs, the training
state (step, RNG states, data positions) and the resolved config. A sharded run (train.parallel=fsdp)
writes a directory `ckpt_<step>.dcp/` instead through torch.distributed.checkpoint (each rank its
shards; resumable on another world size, DCP reshards) with `meta.pt` (config and training state)
beside the shards; it is written as `ckpt_<step>.dcp.tmp/` and renamed when complete. A .pt file is
written with pmf_fast.atomic (a temporary file in the same directory, fsynced, renamed over the
final name), so a crash mid-write leaves the
previous checkpoints intact; the `keep` newest are kept. A kill leaves at most a temporary file,
which `remove_stale_temporaries` deletes at the next start.

    remove_stale_temporaries(run_dir)        at start: [removed temporary files]
    save_checkpoint(run_dir, step, state)    refuse non-finite states first with all_finite(state)
    state, path = load_latest(run_dir)       newest readable checkpoint, falling back with a warning
"""
import contextlib
import glob
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

from .atomic import atomic_write, clean_temporaries
from .dist import agree_on_failure, all_gather_objects

PATTERN = re.compile(r"ckpt_(\d+)\.(pt|dcp)$")
META = "meta.pt"                                   # inside a sharded checkpoint: config and training state


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- files in a run directory

def list_checkpoints(run_dir):
    """[(step, path)] sorted by step."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*")):
        m = PATTERN.search(os.path.basename(p))
        if m and (m.group(2) == "pt" or os.path.isfile(os.path.join(p, META))):
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_sharded(path):
    return path.endswith(".dcp")


def remove_stale_temporaries(run_dir):
    """Delete the temporary checkpoint files (ckpt_<step>.pt.tmp.<pid>) that a killed process left in
    run_dir; returns their paths. Call once at start, before any checkpoint is written."""
    if not os.path.isdir(run_dir):
        return []
    dirs = glob.glob(os.path.join(glob.escape(run_dir), "ckpt_*.dcp.tmp"))   # an unfinished sharded save
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return clean_temporaries(run_dir, "ckpt_*.pt") + dirs


# ---------------------------------------------------------------------------- save

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
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as RuntimeError "[enforce fail at inline_container.cc]
        # ... unexpected pos" (checked on a full 1 MB tmpfs); any other RuntimeError is ours to see
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise
        raise _write_error(path, e) from None
    _rotate(run_dir, keep)
    return path


def _write_error(path, e):
    """CheckpointError for a failed checkpoint write: which file, the disk's free space, the remedy."""
    run_dir = os.path.dirname(path)
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    why = getattr(e, "strerror", None) or ("the write stopped short" if isinstance(e, RuntimeError) else str(e))
    return CheckpointError(f"cannot write checkpoint {os.path.basename(path)} in {run_dir!r}: {why} ({free}; a "
                           "full disk or no write permission?). The previous checkpoints are intact: free space "
                           "and run the same command to continue from the newest one")


def _rotate(run_dir, keep):
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def save_sharded(run_dir, step, shards, meta, keep=2):
    """Every rank: torch.distributed.checkpoint.save of `shards` (model, optimizers, EMAs with
    DTensors) into ckpt_<step>.dcp.tmp/; rank 0 adds meta.pt and renames it to ckpt_<step>.dcp once
    all ranks are done. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = os.path.join(run_dir, f"ckpt_{step:08d}.dcp")
    tmp, rank0 = path + ".tmp", not dist.is_initialized() or dist.get_rank() == 0
    error = None
    try:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        with _one_process_is_fine():
            dcp.save(shards, checkpoint_id=tmp)     # a collective: a writer's error reaches every rank
        if rank0:
            atomic_write(os.path.join(tmp, META), lambda f: torch.save(meta, f))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            _rotate(run_dir, keep)
    except (OSError, RuntimeError, CheckpointException) as e:   # DCP gathers its writers' errors into
        error = _write_error(path, e)                           # CheckpointException, a BaseException
    _agree(error)
    return path


def load_sharded(path, shards):
    """Load a sharded checkpoint's tensors in place into `shards` (the same structure as saved, on
    any world size). A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    with _one_process_is_fine():
        dcp.load(shards, checkpoint_id=path)


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when no process group is up; one process is a supported world size here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _agree(error):
    """A barrier that also carries a failed write (dist's agreement): the failing rank raises its
    CheckpointError, the others RankFailed with its line, so no rank trains on after a failed save."""
    agree_on_failure(error, "writing a checkpoint")
    if error is not None:
        raise error


# ---------------------------------------------------------------------------- load

def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file, with an error that says what is wrong and what to do."""
    if is_sharded(path):                        # the config and training state; shards: load_sharded
        path = os.path.join(path, META)
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
        raise CheckpointError(f"no checkpoint (ckpt_<step>.pt or .dcp) in {run_dir!r} to resume from")
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


# ---------------------------------------------------------------------------- training state
class TrainState:
    """Step, elapsed training seconds, the objective's random streams and the loader's position.
    A rank running `micro` micro-batches a step holds one pair of streams per micro-batch: those of
    virtual ranks rank * micro ... rank * micro + micro - 1 of a world * micro-rank run, so that
    accumulation takes the steps that run takes (gens[i], cpu_gens[i] draw for micro-batch i).
    state_dict() gathers every rank's streams and positions (a collective); load_state_dict() gives
    each rank its own: exactly when the virtual world (world * micro) is the same, whatever the split,
    else fresh streams."""

    def __init__(self, loader, device, seed, rank, world, micro=1):
        self.loader, self.rank, self.world, self.seed, self.micro = loader, rank, world, seed, micro
        self.step, self.elapsed, self.finished = 0, 0.0, False
        first = rank * micro                                             # this rank's first virtual rank
        self.gens = [torch.Generator(device).manual_seed(seed + v) for v in range(first, first + micro)]
        self.cpu_gens = [torch.Generator().manual_seed(seed + v) for v in range(first, first + micro)]  # crop seeds

    def state_dict(self):
        mine = {"rng": [g.get_state().cpu() for g in self.gens], "cpu_rng": [g.get_state() for g in self.cpu_gens],
                "data": self.loader.state_dict()}
        ranks = all_gather_objects(mine)
        return {"step": self.step, "elapsed_s": self.elapsed, "finished": self.finished, "ranks": ranks}

    def load_state_dict(self, state, log, finished=False):
        """finished: the run's training is over (run_stage "end"): only the end stage is left."""
        self.step, self.elapsed, self.finished = state["step"], state.get("elapsed_s", 0.0), finished
        ranks = state["ranks"]
        listed = lambda s: s if isinstance(s, list) else [s]              # one stream per rank before accumulation
        streams = [pair for r in ranks for pair in zip(listed(r["rng"]), listed(r["cpu_rng"]))]
        saved_micro = len(streams) // max(1, len(ranks))
        if len(streams) == self.world * self.micro:                      # the same virtual ranks
            first = self.rank * self.micro
            for g, c, (rng, cpu_rng) in zip(self.gens, self.cpu_gens, streams[first:first + self.micro]):
                g.set_state(rng.to(g.get_state().device))
                c.set_state(cpu_rng)
            if (len(ranks), saved_micro) != (self.world, self.micro):
                log(f"resuming {len(ranks)} ranks x {saved_micro} micro-batches as {self.world} x {self.micro}: "
                    "the same virtual ranks, the same steps")
        else:
            for v, (g, c) in enumerate(zip(self.gens, self.cpu_gens), self.rank * self.micro):
                g.manual_seed(self.seed + v + 7919 * self.step)
                c.manual_seed(self.seed + v + 7919 * self.step)
            split = lambda w, k: f"{w}-rank" + (f" x {k}-micro-batch" if k > 1 else "")
            mine = f"{self.world} ranks" + (f" x {self.micro} micro-batches" if self.micro > 1 else "")
            log(f"resuming on {mine} from a {split(len(ranks), saved_micro)} run: fresh random streams")
        if len(ranks) == self.world:
            self.loader.load_state_dict(ranks[self.rank]["data"])
        elif ranks and "epoch" in ranks[0]["data"]:              # index-based positions are the same on every rank
            self.loader.load_state_dict(ranks[0]["data"])
        else:
            log("the DALI readers start a fresh epoch")


# ---------------------------------------------------------------------------- a training run's checkpoints
class Checkpointer:
    """Saving and resuming what a training run holds: the model, the optimizers (optimizers.Optimizers),
    the EMAs and the training state (TrainState), with the config. A .pt file from rank 0, or a
    DCP directory from every rank under FSDP2 (train.parallel=fsdp). Every rank calls save()."""

    def __init__(self, run_dir, cfg, *, model, optimizers, emas, state, device, log):
        self.run_dir, self.cfg, self.model, self.optimizers = run_dir, cfg, model, optimizers
        self.emas, self.state, self.device, self.log = emas, state, device, log
        self.sharded = cfg.train.parallel == "fsdp"

    def _shards(self):
        """What torch.distributed.checkpoint saves and loads (in place)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.model, self.optimizers.optimizers)
        return {"model": msd, "optimizers": osd, "emas": self.emas.state_dict()}

    def load(self, path, meta, finished=False):
        """Every stateful piece takes its own state from checkpoint `path` (meta: its load_checkpoint)."""
        if self.sharded != is_sharded(path):
            from .config import ConfigError
            written = "fsdp" if is_sharded(path) else "ddp"
            raise ConfigError(f"{path} was written with train.parallel={written}; resume with the same "
                              "train.parallel")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict
            saved = self._shards()
            load_sharded(path, saved)
            set_state_dict(self.model, self.optimizers.optimizers, model_state_dict=saved["model"],
                           optim_state_dict=saved["optimizers"])
        else:
            self.model.load_state_dict(meta["model"])
            self.optimizers.load_state_dict(meta["optimizers"])
            self.emas.load_state_dict(meta["emas"])
        self.state.load_state_dict(meta["train"], self.log, finished=finished)

    def save(self):
        """A checkpoint at the current step; non-finite weights are never written (all ranks agree first)."""
        from .dist import agree_max
        step = self.state.step
        if agree_max([not all_finite([p.detach() for p in self.model.parameters()])], self.device)[0]:
            self.log(f"step {step}: the weights are not finite; no checkpoint written")
            return
        train_state = self.state.state_dict()                  # a collective: every rank's streams
        if self.sharded:
            save_sharded(self.run_dir, step, self._shards(), {"config": self.cfg.to_dict(), "train": train_state})
            return
        error = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                save_checkpoint(self.run_dir, step, {
                    "model": self.model.state_dict(), "optimizers": self.optimizers.state_dict(),
                    "emas": self.emas.state_dict(), "train": train_state, "config": self.cfg.to_dict()})
            except CheckpointError as e:
                error = e
        _agree(error)
