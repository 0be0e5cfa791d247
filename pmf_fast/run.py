"""A command's run: which run directory it trains in, whether it resumes and from which checkpoint
(agreed by all ranks), and its stage. Beside it: lock.py (one owner per directory), stop.py (the
agreed stops), log.py (the record), checkpoint.py (the training state and its checkpoints).

Run directories: `--name X` (default: the preset's name) is runs/X. When runs/X holds checkpoints of
the same config, the same command resumes it (so `torchrun --max-restarts` and a rerun after a
preemption continue where the run stopped); a different config there is refused, never mixed in.
`--resume runs/X key=value ...` continues a run with overrides; overrides that change tensor shapes
(model.*, the EMA half-lives) are refused before anything is written.
"""
import contextlib
import json
import os
import shutil
import socket

from .checkpoint import CheckpointError, list_checkpoints, load_latest, remove_stale_temporaries
from .config import Config, ConfigError, config_diff, describe_diff, get_config, set_field, validate
from .dist import all_gather_objects
from .lock import LOCK, claim_run_dir

# fields that steer a run but not what it learns: they may differ when a run is continued
RUN_CONTROL = {f"train.{k}" for k in ("steps", "epochs", "time_budget_s", "log_every", "sample_every", "ckpt_every",
                                      "eval_every", "eval_samples", "fid_ref", "out_dir", "num_workers", "loader",
                                      "impl", "parallel", "shard_size", "checkpointing", "nonfinite", "max_nonfinite",
                                      "stop_check_every", "tensorboard", "precision", "data",
                                      "cpu_threads", "micro_batch", "init", "init_weights")} | {"preset"}
# fields whose change would not fit the saved tensors
SHAPES = ("model.", "train.ema_halflives_kimg")


# ----------------------------------------------------------------------------- run directories
END = "end.json"                 # written last by the end stage: {"step": N} once samples and metrics are there
FAILED_START = {"tb"}            # what a start makes before config.json (TensorBoard opens its folder early)


def run_dir_of(preset, name, resume, overrides):
    """The run directory a command trains in (--resume's, else train.out_dir/<name or preset>);
    ConfigError for a bad preset, override, run name or --resume path, before any write."""
    if resume:
        if os.path.isfile(resume) or os.path.isfile(os.path.join(resume, "meta.pt")):
            where = os.path.dirname(os.path.dirname(os.path.abspath(resume)) if resume.rstrip("/").endswith(".dcp")
                                    else os.path.abspath(resume))
            raise ConfigError(f"--resume takes a run directory, not a checkpoint: --resume {where} continues from "
                              "its newest readable checkpoint")
        if not os.path.isdir(resume):
            raise ConfigError(f"--resume {resume}: no such run directory (a run directory holds ckpt_<step>.pt "
                              "files; leave out --resume to start a new run)")
        return resume
    cfg = get_config(preset, overrides)
    return os.path.join(cfg.train.out_dir, run_name(name, cfg.preset))


def run_name(name, preset):
    """The run's directory name under train.out_dir: --name, or the preset's name. A name is one path
    component, so that a run never lands outside train.out_dir."""
    name = name or preset.replace("/", "-")
    if name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"--name {name!r}: a run name is one directory name under train.out_dir (no '/' or "
                          "'..'); set train.out_dir=<folder> to train elsewhere")
    return name


class Run:
    """A command's run, found, checked and claimed: its config, directory, the checkpoint it resumes
    from (meta, ckpt_path: None for a fresh run), its stage ("train", "end" or "done", run_stage) and
    rank 0's lock on the directory. Every rank opens it (collectives: a refusal stops all ranks)."""

    def __init__(self, preset, name, resume, overrides, rank, log):
        self.lock = claim_run_dir(run_dir_of(preset, name, resume, overrides), rank == 0)
        try:
            self.cfg, self.dir, self.meta, self.ckpt_path, self.stage = find_run(preset, name, resume, overrides, log)
        except BaseException:
            self.close()
            raise
        # a fresh run in an empty (or new) directory: if its start fails before config.json is written, what
        # it made (tb/, its lock) goes again, so the same command works once the cause is fixed
        self.fresh = self.meta is None and not set(_contents(self.dir)) - FAILED_START
        if self.fresh and self.lock is not None:
            self._remove_contents()                  # a start killed before it began (resolve_run said so)

    def _remove_contents(self):
        for entry in _contents(self.dir):
            path = os.path.join(self.dir, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

    def say_done(self, is_main):
        if is_main:
            print(f"{self.dir} already finished at step {self.meta['train']['step']}: nothing to do (raise "
                  "train.steps or train.time_budget_s with --resume to train longer, or pass --name for a new run)")

    def resume(self, checkpointer, log):
        """Load the checkpoint the ranks agreed on into the run's state (nothing for a fresh run)."""
        if self.meta is None:
            return
        checkpointer.load(self.ckpt_path, self.meta, finished=self.stage == "end")
        step = checkpointer.state.step
        log.truncate(step)
        log(f"resumed from {self.ckpt_path} at step {step}" +
            (": training had finished, its end stage had not; completing it" if self.stage == "end" else ""))
        self.meta = None                             # the loaded tensors are not kept twice

    def make_dir(self, is_main):
        """Rank 0 makes the directory and removes the temporary files of a killed run's writes."""
        if is_main:
            os.makedirs(self.dir, exist_ok=True)
            for path in remove_stale_temporaries(self.dir):
                print(f"removed {path}, left by a killed run", flush=True)

    def close(self):
        """Release the lock; after a fresh run's failed start, remove what the start made."""
        if self.lock is not None:
            if getattr(self, "fresh", False) and not os.path.exists(os.path.join(self.dir, "config.json")):
                self._remove_contents()
            self.lock.release()
            self.lock = None


def _contents(run_dir):
    """What a run directory holds besides its lock (and the lock's own temporary files)."""
    try:
        return sorted(e for e in os.listdir(run_dir) if not e.startswith(LOCK))
    except FileNotFoundError:
        return []


def run_stage(meta, cfg, run_dir):
    """"train" (fresh, or steps left), "end" (training finished, its end stage did not: final
    samples, metrics.json) or "done"."""
    if meta is None or not finished(meta, cfg):
        return "train"
    try:
        with open(os.path.join(run_dir, END)) as f:
            done = json.load(f).get("step") == meta["train"]["step"]
    except (OSError, ValueError, AttributeError):
        done = False
    return "done" if done else "end"


def agree_on_resume(run_dir, ckpt_path, stage, error=None):
    """Every rank must resume from the same checkpoint (file and step) at the same stage, as they
    agree on stops; a rank that sees another newest checkpoint, or none, stops every rank with one
    line naming the ranks, hosts and paths. A rank that could not resolve the run (`error`) stops
    every rank too, with its message, instead of leaving the others waiting in a collective."""
    mine = (socket.gethostname(), os.path.abspath(run_dir), os.path.basename(ckpt_path) if ckpt_path else None, stage,
            str(error) if error is not None else None)
    views = all_gather_objects(mine)
    failed = [(rank, v) for rank, v in enumerate(views) if v[4] is not None]
    if error is not None:
        raise error
    if failed:
        rank, (host, _, _, _, msg) = failed[0]
        raise CheckpointError(f"rank {rank} on {host} stopped: {msg}")
    if len({(v[2], v[3]) for v in views}) == 1:
        return
    groups = {}
    for rank, (host, path, ckpt, st, _) in enumerate(views):
        groups.setdefault((ckpt, st), []).append((rank, host, path))
    parts = []
    for (ckpt, st), who in groups.items():
        hosts, paths = _few(sorted({h for _, h, _ in who})), _few(sorted({p for _, _, p in who}))
        parts.append(f"rank(s) {_ranges([r for r, _, _ in who])} on {hosts} see {ckpt or 'no checkpoint'} ({st}) "
                     f"in {paths}")
    raise CheckpointError("the ranks disagree on the checkpoint to resume from: " + "; ".join(parts) +
                          ". The run directory must be on storage every node sees (set train.out_dir to it)")


def _ranges(ranks):
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8": a line stays short on thousands of ranks."""
    out, start = [], ranks[0]
    for prev, r in zip(ranks, ranks[1:] + [None]):
        if r is None or r != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = r
    return ",".join(out)


def _few(names, n=3):
    return ",".join(names[:n]) + (f",... ({len(names)} in all)" if len(names) > n else "")


def find_run(preset, name, resume, overrides, log):
    """(cfg, run_dir, meta, ckpt_path, stage) of a command, agreed by all ranks: resolve_run on each,
    then the stage (run_stage) and the checkpoint compared across ranks (agree_on_resume)."""
    try:
        cfg, run_dir, meta, ckpt_path = resolve_run(preset, name, resume, overrides, log)
        stage = run_stage(meta, cfg, run_dir)
    except (ConfigError, CheckpointError, OSError) as e:
        agree_on_resume(resume or "", None, None, e)
    agree_on_resume(run_dir, ckpt_path, stage)
    return cfg, run_dir, meta, ckpt_path, stage


def resolve_run(preset, name, resume, overrides, log):
    """(cfg, run_dir, meta, ckpt_path): meta and ckpt_path are None for a fresh run. Raises ConfigError
    for a run directory that holds another run or shape-changing overrides, before any write."""
    if resume:
        run_dir = resume
        meta, path = load_run_checkpoint(run_dir, log)
        cfg = Config.from_dict(meta["config"])
        for item in overrides:
            key, _, value = item.lstrip("-").partition("=")
            set_field(cfg, key, value)
        validate(cfg)
    else:
        cfg = get_config(preset, overrides)
        run_dir = os.path.join(cfg.train.out_dir, run_name(name, cfg.preset))
        if not list_checkpoints(run_dir):
            saved = os.path.join(run_dir, "config.json")
            if os.path.isfile(saved):          # a run that stopped before its first checkpoint
                diff = config_diff(json.load(open(saved)), cfg.to_dict())
                if [d for d in diff if d[0] not in RUN_CONTROL]:
                    raise ConfigError(f"{run_dir} holds another run ({describe_diff(diff)}); pass --name for a new run")
                log(f"{run_dir} holds a run of the same config that never wrote a checkpoint: starting it over")
                for f in ("log.jsonl", "metrics.json", END):
                    with contextlib.suppress(FileNotFoundError):     # every rank tries; one wins
                        os.remove(os.path.join(run_dir, f))
            elif set(_contents(run_dir)) - FAILED_START:
                raise ConfigError(f"{run_dir} is not empty and holds no pmf-fast run; pass --name for a new run")
            elif _contents(run_dir):                 # a start killed before it began (kill -9 during set-up)
                log(f"{run_dir} holds only what a start that never began left ({', '.join(_contents(run_dir))}): "
                    "starting over")
            return cfg, run_dir, None, None
        meta, path = load_run_checkpoint(run_dir, log)
        diff = [d for d in config_diff(meta["config"], cfg.to_dict()) if d[0] not in RUN_CONTROL]
        if diff:
            raise ConfigError(f"{run_dir} holds a run with another config ({describe_diff(diff)}); pass --name for "
                              f"a new run, or --resume {run_dir} with overrides to continue that run")
    shape = [d for d in config_diff(meta["config"], cfg.to_dict()) if d[0].startswith(SHAPES)]
    if shape:
        raise ConfigError(f"cannot resume {run_dir} with {describe_diff(shape)}: the saved weights or EMAs have other "
                          "shapes; start a new run (--name) instead")
    return cfg, run_dir, meta, path


def load_run_checkpoint(run_dir, log):
    """load_latest, and a one-line error for a torch file there that is not a pmf-fast training
    checkpoint (weights alone, an official release): it has no config or training state to resume."""
    meta, path = load_latest(run_dir, log)
    missing = [k for k in ("config", "train") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path} is not a pmf-fast training checkpoint (it has no {' or '.join(missing)}); "
                              "to start training from its weights, start a new run with train.init=<that file>")
    return meta, path


def finished(meta, cfg):
    """True when a resumed run already ended by its steps or time budget and neither was raised."""
    old = meta["config"]["train"]
    return bool(meta["train"].get("finished")) and cfg.train.steps == old["steps"] and \
        cfg.train.time_budget_s == old["time_budget_s"] and cfg.train.epochs == old["epochs"]
