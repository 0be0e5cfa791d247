"""Helpers the tests import (fixtures and hooks live in conftest.py), so that no test module imports
another: the tolerance rule (docs/testing.md), whose one home is the package's self-test, and the test
model's wake-up; a few optimizer steps on one process or on a slice of the batch per rank; train.main
on spawned ranks; train.py processes (torchrun) with their logs, killed at the end; a stand-in for
Inception."""
import contextlib
import dataclasses
import faulthandler
import glob
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmf_fast.config import get_config
from pmf_fast.dist import cleanup, full_tensor, parallelize
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import build_optimizers
from pmf_fast.selftest import ATOL, error_bound, max_err, wake_up  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close_by_rule(out, ref64, eager_same_dtype, name="output", factor=2.0, relative_atol=False):
    """Fast-path error against an fp64 reference must be at most `factor` x the error of the same
    eager computation in the same dtype, plus an atol for the dtype (times max|ref| when
    relative_atol, for tensors far from unit scale such as gradients). Prints the errors."""
    err, base, bound = error_bound(out, ref64, eager_same_dtype, factor, relative_atol)
    print(f"{name}: err {err:.3e}, eager err {base:.3e}, bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x eager error {base:.3e} + atol"


# ----------------------------------------------------------------------------- a few optimizer steps, 1 or N ranks
PROBLEM_BATCH, PROBLEM_STEPS = 12, 2          # global batch (divisible by 2, 3 and 4 ranks), optimizer steps


def whole_params(model):
    """{name: a copy of the whole parameter} (FSDP2's shards gathered: a collective)."""
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


@contextlib.contextmanager
def gloo_group(rank, world, init_file):
    """A spawned worker's process group, torn down as train.py does (all ranks arrive, then close);
    faulthandler names the Python line should gloo abort the process."""
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    yield
    cleanup()


def problem(dtype=torch.float32):
    """Model, global batch and the draws of each step: the same on every process."""
    torch.manual_seed(0)
    cfg = get_config("pMF-XS/4-test")
    model = wake_up(PMFDiT(cfg.model)).to(dtype)
    m = cfg.model
    x = (torch.rand(PROBLEM_BATCH, m.in_channels, m.image_size, m.image_size) * 2 - 1).to(dtype)
    y = torch.randint(0, m.num_classes, (PROBLEM_BATCH,))
    gen = torch.Generator().manual_seed(1)
    draws = [sample_draws(x, cfg.objective, gen) for _ in range(PROBLEM_STEPS)]
    for d in draws:
        for f in ("t", "r", "e", "omega", "t_min", "t_max"):
            setattr(d, f, getattr(d, f).to(dtype))
    return cfg, model, x, y, draws


def rank_slice(rank, world):
    """Rank `rank`'s part of the global batch."""
    return slice(rank * PROBLEM_BATCH // world, (rank + 1) * PROBLEM_BATCH // world)


def part(d, sl):
    """The draws of the samples in `sl`."""
    return dataclasses.replace(d, **{f.name: getattr(d, f.name)[sl] for f in dataclasses.fields(d)
                                     if torch.is_tensor(getattr(d, f.name))})


def train_steps(rank, world, parallel, dtype=torch.float32, checkpointing="none", shard_size=0):
    """(whole params, losses) after PROBLEM_STEPS optimizer steps, each rank on its slice of the
    global batch (one process, world 1: the whole batch)."""
    cfg, model, x, y, draws = problem(dtype)
    step_model = parallelize(model, compile=False, parallel=parallel, checkpointing=checkpointing,
                             shard_size=shard_size, device=torch.device("cpu"))
    opts = build_optimizers(model, cfg.optim)
    sl = rank_slice(rank, world)
    losses = []
    for d in draws:
        loss, _ = pmf_loss(step_model, x[sl], y[sl], part(d, sl), cfg.objective, cfg.model.num_classes)
        loss.backward()
        opts.step()
        opts.zero_grad()
        losses.append(loss.detach())
    return whole_params(model), torch.stack(losses)


# ----------------------------------------------------------------------------- train.main on spawned ranks
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank, world, port, argv, setup):
    """train.main on one of `world` spawned ranks (the torchrun environment set by hand). setup, when
    given, is called with the rank first and returns what to call after train.main (or None)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import train
    after = setup(rank) if setup is not None else None
    train.main(argv)
    if after is not None:
        after()


def spawn_train(world, argv, setup=None):
    """train.main(argv) on `world` spawned ranks; setup: a picklable callable, see _train_rank."""
    mp.spawn(_train_rank, args=(world, free_port(), argv, setup), nprocs=world)


def weights(run_dir, step):
    """The raw model weights of a run's checkpoint at `step` (.pt, or a sharded .dcp read in this process)."""
    path = run_dir / f"ckpt_{step:08d}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)["model"]
    from pmf_fast.checkpoint import load_sharded
    model = {n: torch.empty_like(t) for n, t in PMFDiT(get_config("pMF-XS/4-test").model).state_dict().items()}
    load_sharded(str(run_dir / f"ckpt_{step:08d}.dcp"), {"model": model})
    return model


# ----------------------------------------------------------------------------- train.py processes, killed at the end
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = ["--preset", "pMF-XS/4-test", "train.batch_size=16"]
RUN_TIMEOUT = int(os.environ.get("PMF_RUN_TIMEOUT", "240"))   # one run, startup and the judge included (~20-30 s)


def children():
    """{pid: [child pids]} of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(d))
    return out


def descendants(pid):
    tree, found, todo = children(), [], [pid]
    while todo:
        for c in tree.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def env_of(pid):
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


class Run:
    """A train.py (or torchrun) process with its stdout and stderr in files, killed with all its
    descendants when it outlives its timeout or the test."""

    def __init__(self, cmd, out_dir, tag):
        self.cmd, self.tag = cmd, tag
        self.out_path, self.err_path = os.path.join(out_dir, f"{tag}.out"), os.path.join(out_dir, f"{tag}.err")
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"),
                                     env=ENV, cwd=ROOT, start_new_session=True)
        self.known = set()       # descendants seen so far: killed at the end even when orphaned

    def alive(self):
        return self.proc.poll() is None

    def workers(self):
        """{RANK: pid} of the train.py processes under this run."""
        out = {}
        for pid in descendants(self.proc.pid):
            self.known.add(pid)
            env = env_of(pid)
            if "RANK" in env:
                out[int(env["RANK"])] = pid
        return out

    def kill_tree(self):
        pids = set(descendants(self.proc.pid)) | self.known
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def wait(self, timeout=RUN_TIMEOUT):
        """(returncode, stdout, stderr); a run that outlives `timeout` (a hang) fails the test."""
        try:
            rc = self.proc.wait(max(1.0, timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(f"{self.tag}: no exit within {timeout} s (hang); killed.\n$ {' '.join(self.cmd)}\n"
                        f"--- stdout\n{self.out()[-3000:]}\n--- stderr\n{self.err()[-3000:]}")
        self.kill_tree()         # workers orphaned by a dying torchrun
        return rc, self.out(), self.err()

    def out(self):
        return open(self.out_path).read()

    def err(self):
        return open(self.err_path).read()

    def describe(self):
        return f"$ {' '.join(self.cmd)}\n--- stdout\n{self.out()[-3000:]}\n--- stderr\n{self.err()[-4000:]}"


def train_cmd(out_dir, name, *overrides):
    return [os.path.join(ROOT, "train.py"), *TINY, "--name", name, f"train.out_dir={out_dir}", *overrides]


def log_steps(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    for line in open(path).read().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):      # a line being written
            pass
    return steps


def wait_for_step(run, run_dir, step, timeout=RUN_TIMEOUT):
    """Block until log.jsonl holds a line of `step` or later (training has started)."""
    while not any(s >= step for s in log_steps(run_dir)):
        if not run.alive():
            pytest.fail(f"{run.tag} ended before logging step {step}\n{run.describe()}")
        if time.time() - run.t0 > timeout:
            run.kill_tree()
            pytest.fail(f"{run.tag}: step {step} not logged within {timeout} s\n{run.describe()}")
        time.sleep(0.05)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a, b, what):
    """The model's parameters and every EMA, bit for bit."""
    assert a["train"]["step"] == b["train"]["step"]
    for key in ("model", "emas"):
        x, y = a[key], b[key]
        if key == "emas":
            x = {f"{k}.{n}": t for k, d in x.items() for n, t in d.items()}
            y = {f"{k}.{n}": t for k, d in y.items() for n, t in d.items()}
        assert x.keys() == y.keys()
        diff = [n for n in x if not torch.equal(x[n], y[n])]
        assert not diff, f"{what}: {key} differs from the uninterrupted run in {diff[:5]} " \
                         f"(max |diff| {max((x[n] - y[n]).abs().max().item() for n in diff):.3g})"


def worker_logs(log_dir, stream):
    """{(attempt, rank): text} of torchrun's per-worker stdout/stderr files."""
    out = {}
    for path in glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", f"{stream}.log")):
        parts = path.split(os.sep)
        out[(int(parts[-3].split("_")[1]), int(parts[-2]))] = open(path).read()
    return out


# ----------------------------------------------------------------------------- a stand-in for Inception
class RandomExtractor:
    """Test-only stand-in for Inception: a fixed random conv net, uint8 [N, 3, H, W] -> (pool, logits)."""
    name = "test-only random CNN (not Inception)"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.conv = torch.randn(16, 3, 3, 3, generator=g) / 5
        self.head = torch.randn(16, 10, generator=g)

    def __call__(self, x):
        h = torch.relu(torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.conv, stride=2)).mean((2, 3))
        return h.double().numpy(), (h @ self.head).double().numpy()


def write_outcome(out_dir, rank, fn):
    """On a spawned rank: run fn and write what came of it to out_dir/rank<rank>.json, "ok" or the
    exception's type and line, for the test process to compare across ranks."""
    try:
        fn()
        outcome = "ok"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
