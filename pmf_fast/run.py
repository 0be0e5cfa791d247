"""The pieces of a training run around the loop in train.py: which run directory and whether it
resumes, the training state (step, random streams, data positions, elapsed time) as one state
dict, the stop signals, the learning-rate schedule, and the log (stdout, log.jsonl, TensorBoard).

Run directories: `--name X` (default: the preset's name) is runs/X. When runs/X holds checkpoints of
the same config, the same command resumes it (so `torchrun --max-restarts` and a rerun after a
preemption continue where the run stopped); a different config there is refused, never mixed in.
`--resume runs/X key=value ...` continues a run with overrides; overrides that change tensor shapes
(model.*, the EMA half-lives) are refused before anything is written.
"""
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time

import torch

from .atomic import _alive, atomic_write, clean_temporaries
from .checkpoint import CheckpointError, list_checkpoints, load_latest, remove_stale_temporaries
from .config import Config, ConfigError, get_config, set_field, validate
from .dist import agree_max, all_gather_objects, all_reduce_mean

# fields that steer a run but not what it learns: they may differ when a run is continued
RUN_CONTROL = {f"train.{k}" for k in ("steps", "epochs", "time_budget_s", "log_every", "sample_every", "ckpt_every",
                                      "eval_every", "eval_samples", "fid_ref", "out_dir", "num_workers", "loader",
                                      "impl", "parallel", "shard_size", "checkpointing", "nonfinite", "max_nonfinite",
                                      "stop_check_every", "tensorboard", "precision", "data",
                                      "cpu_threads", "micro_batch", "init", "init_weights")} | {"preset"}
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
    """[(field, old value, new value)] between two Config.to_dict()s. The old one is read through
    Config.from_dict first, so a field added since it was saved counts as its default, not a change."""
    try:
        filled = Config.from_dict(old).to_dict()
        old = {k: filled.get(k, v) for k, v in old.items()}   # the sections given, with their new fields
    except ConfigError:                              # a field removed since: compare as saved
        pass
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _describe(diff):
    return ", ".join(f"{k}: {a} -> {b}" for k, a, b in diff[:6]) + (" ..." if len(diff) > 6 else "")


# ----------------------------------------------------------------------------- one owner per run directory
LOCK = "run.lock"
END = "end.json"                 # written last by the end stage: {"step": N} once samples and metrics are there
FAILED_START = {"tb"}            # what a start makes before config.json (TensorBoard opens its folder early)


class RunBusy(RuntimeError):
    """The run directory is held by a live run."""


class RunLock:
    """An O_EXCL lock file in the run directory (atomic create, also on NFS v3+) naming its holder:
    host, pid, start time, and a heartbeat counter that a thread of the holder rewrites every
    `heartbeat_s`. A lock whose holder is gone is stale and taken over:
    - same host: the pid is not alive (os.kill(pid, 0)); decided at once (kill -9, a crash);
    - another host (its pid means nothing here): the heartbeat stops. The file is watched for up to
      `stale_after_s`: a beat means a live holder (refused within one heartbeat); none, or a file
      already older than `stale_after_s`, means the holder's node is gone. Watching the counter,
      not comparing mtimes with our clock, is immune to clock skew between hosts and to NFS's
      cached file attributes (a reopen reads fresh content). A requeued job on another node thus
      waits at most `stale_after_s` for a lost node's lock."""

    def __init__(self, run_dir, heartbeat_s=10.0, stale_after_s=60.0):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "beat": 0,
                   "token": os.urandom(8).hex()}               # tells apart two starts in one second
        self.created, self.held, self._stop = [], False, threading.Event()
        self._thread, self.lost = None, None        # lost: who holds the directory now, once it is not us

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}                                # torn by a crash mid-create: no live holder wrote it

    def _mine(self, holder):
        return holder is not None and {k: holder.get(k) for k in ("host", "pid", "since", "token")} == \
            {k: self.me[k] for k in ("host", "pid", "since", "token")}

    def _stale(self, holder):
        if not holder or "pid" not in holder:
            return True
        if holder.get("host") == self.me["host"]:
            # a live pid that started after the lock was made is another process under a reused pid (a
            # restarted container keeps its host name and counts pids from 1 again, even up to ours)
            pid = holder["pid"]
            return not _alive(pid) or _started_after(pid, holder.get("since"))
        deadline = time.monotonic() + self.stale_after_s
        while time.monotonic() < deadline:
            if _age(self.path) > self.stale_after_s:
                return True
            now = self._read()
            if now != holder:
                return False                         # a beat (or a new holder): alive
            time.sleep(min(1.0, self.heartbeat_s / 4))
        return True

    def acquire(self):
        """Hold the lock or raise RunBusy naming the holder. Creates run_dir (and its missing parents,
        train.out_dir among them) when missing; release() removes what it created again if nothing
        else was written there."""
        self.created = _missing_dirs(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        clean_temporaries(self.run_dir, LOCK)        # a heartbeat cut by a kill
        # the lock appears whole: written to a file of our own, then hard-linked to its name (link, like
        # O_EXCL, fails when the name exists), so no starter ever reads a half-written lock
        mine = f"{self.path}.new.{os.getpid()}.{threading.get_ident()}"
        with open(mine, "w") as f:
            json.dump(self.me, f)
        try:
            return self._acquire(mine)
        finally:
            os.remove(mine)

    def _acquire(self, mine):
        for _ in range(100):
            try:
                os.link(mine, self.path)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue                         # released between our create and our read
                if not holder and _age(self.path) < 5:
                    time.sleep(0.1)                  # just created, its content not yet written
                    continue
                if not self._stale(holder):
                    raise RunBusy(f"{self.run_dir} is in use by another run (host {holder.get('host')}, pid "
                                  f"{holder.get('pid')}, since {holder.get('since')}); wait for it to end or stop "
                                  "it, or pass --name for a new run") from None
                self._take_over(holder)
                continue
            time.sleep(0.05)                         # a concurrent take-over may have moved ours aside
            if not self._mine(self._read()):
                continue
            self.held = True
            self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
            self._thread.start()
            return self
        raise RunBusy(f"{self.run_dir}: could not take the lock {LOCK} (other runs keep taking it over)")

    def _take_over(self, stale):
        """Move the stale lock aside; if it changed since it was judged (another starter took it over
        first, or its holder beat), put it back unless the path is taken again."""
        aside = f"{self.path}.stale.{os.getpid()}.{threading.get_ident()}"   # unique per starter
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (ValueError, OSError):
            moved = {}
        if moved != stale:                           # changed, or being written by a new starter: not ours
            try:
                os.link(aside, self.path)            # never replaces a lock created meanwhile
            except OSError:
                pass
        os.remove(aside)

    def still_mine(self):
        """Whether this process still holds the lock. False once it was removed, taken over (this
        process judged gone) or overwritten: then self.lost names the new holder, and the run stops
        (Stopper) without writing anything more in the directory. Read twice, 0.2 s apart, before
        the lock counts as lost."""
        if self.lost is None and self.held:
            for attempt in range(2):
                holder = self._read()
                if self._mine(holder):
                    return True
                if not attempt:
                    time.sleep(0.2)
            self.lost = ("removed" if holder is None else "unreadable" if not holder else
                         f"held by host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}")
        return self.lost is None

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            if not self.still_mine():
                return                               # the Stopper ends the run at its next check
            self.me["beat"] += 1
            try:
                atomic_write(self.path, lambda f: json.dump(self.me, f), mode="w")
            except OSError:
                pass                                 # a full disk: the next beat tries again

    def release(self):
        """Remove the lock if this process still holds it; remove run_dir if this lock created it and
        nothing else was written there (a refused start leaves nothing behind)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held and self._mine(self._read()):
            os.remove(self.path)
        self.held = False
        for d in self.created:                       # leaf first; a directory with anything in it stays
            try:
                os.rmdir(d)
            except OSError:
                break
        self.created = []


def _missing_dirs(path):
    """The directories os.makedirs(path) would create, deepest first."""
    out, path = [], os.path.abspath(path)
    while not os.path.isdir(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _age(path):
    """Seconds since path was last written (0 when it is gone: the caller reads it again)."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _started_after(pid, since):
    """Whether process `pid` started after the ISO time `since` (Linux /proc; False when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])      # field 22: start time after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return started > datetime.datetime.fromisoformat(since).timestamp() + 2
    except (OSError, ValueError, TypeError, StopIteration, IndexError):
        return False


def claim_run_dir(run_dir, is_main):
    """Rank 0 takes the run directory's lock; every rank learns the outcome (a collective), so a
    refusal stops all ranks with the same RunBusy. Returns the lock (None on other ranks)."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except Exception as e:                      # e.g. an unwritable train.out_dir: the others must not wait
            refusal = e
    refusal = all_gather_objects(None if refusal is None else (type(refusal).__name__, str(refusal)))[0]
    if refusal is not None:
        raise RunBusy(refusal[1]) if refusal[0] == "RunBusy" else CheckpointError(f"{refusal[0]}: {refusal[1]}")
    return lock


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
                    raise ConfigError(f"{run_dir} holds another run ({_describe(diff)}); pass --name for a new run")
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
            raise ConfigError(f"{run_dir} holds a run with another config ({_describe(diff)}); pass --name for "
                              f"a new run, or --resume {run_dir} with overrides to continue that run")
    shape = [d for d in config_diff(meta["config"], cfg.to_dict()) if d[0].startswith(SHAPES)]
    if shape:
        raise ConfigError(f"cannot resume {run_dir} with {_describe(shape)}: the saved weights or EMAs have other "
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


# ----------------------------------------------------------------------------- training state
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
        elif "epoch" in ranks[0]["data"]:              # index-based positions are the same on every rank
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


class Stopper:
    """Every decision to stop, agreed by all ranks: SIGTERM / SIGINT, the time budget, a non-finite
    loss, and rank 0's run lock lost to another run (that stop writes nothing more in the directory).
    With train.nonfinite=stop a non-finite loss is noted on the device (no sync) and found at the next
    check; with skip, all ranks agree every step whether to drop the update. Checks run every
    train.stop_check_every steps and on log and checkpoint steps (so before every log line and
    checkpoint): one small all-reduce each, which with the log steps' reads is all a step syncs."""

    def __init__(self, tc, state, device, log, lock=None):
        self.tc, self.state, self.device, self.log, self.lock = tc, state, device, log, lock   # lock: rank 0's
        self.signals = StopSignals()
        self.t_start = time.time() - state.elapsed          # elapsed training time survives a resume
        self.bad = torch.zeros((), device=device)
        self.skipped, self.reason, self.progress = 0, None, 0.0

    def skip(self, loss):
        """Whether this step's update is dropped (train.nonfinite=skip, agreed by all ranks)."""
        if self.tc.nonfinite != "skip":
            self.bad = torch.maximum(self.bad, (~torch.isfinite(loss)).float())
            return False
        if not agree_max([~torch.isfinite(loss)], self.device)[0]:
            self.skipped = 0
            return False
        self.skipped += 1
        self.log(f"step {self.state.step + 1}: non-finite loss, update skipped ({self.skipped} in a row)")
        if self.skipped >= self.tc.max_nonfinite:
            self.reason = f"{self.skipped} non-finite losses in a row"
        return True

    def check(self, force=False):
        """The agreed check at this step (when due, or forced); sets self.reason to stop."""
        if not (force or self.state.step % self.tc.stop_check_every == 0):
            return
        budget = self.tc.time_budget_s
        self.state.elapsed = time.time() - self.t_start
        lost = self.lock is not None and not self.lock.still_mine()     # one small file read on rank 0
        nonfinite, self.state.elapsed, signal_seen, lost = agree_max(
            [self.bad, self.state.elapsed, self.signals.received is not None, lost], self.device)
        self.progress = self.state.elapsed / budget if budget else 0.0
        if lost:
            self.reason = f"{LOCK} lost ({self.lock.lost if self.lock is not None else 'rank 0 lost it'})"
        elif nonfinite:
            self.reason = "non-finite loss"
        elif signal_seen:
            self.reason = f"{self.signals.received or 'a signal'} received"
        elif budget and self.state.elapsed >= budget:
            self.reason = f"time budget of {budget:.0f} s reached"

    @property
    def nonfinite(self):
        return self.reason is not None and "non-finite" in self.reason

    @property
    def lock_lost(self):
        """Another run took the run directory over (or its lock was removed): nothing more is written there."""
        return (self.reason or "").startswith(LOCK)

    @property
    def budget_spent(self):
        return (self.reason or "").startswith("time budget")

    def close(self):
        self.signals.restore()


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

