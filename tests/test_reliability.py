"""Reliability of train.py under torchrun (2 CPU ranks, gloo) and on one process:

* a time budget on 2 ranks ends without a hang, exit 0, a checkpoint written on both ranks' behalf
  (repeated PMF_REPEAT times, 3 by default);
* SIGTERM at a random point (to torchrun, as Kubernetes sends it, or to every worker, as Slurm does):
  the step finishes, a checkpoint is written, the workers exit 0; the same command again finishes
  the run with parameters equal bit for bit to an uninterrupted run's;
* kill -9 of one worker under `torchrun --max-restarts=1`: the restarted workers resume from the
  newest checkpoint and finish bit for bit equal to the uninterrupted run;
* one process: SIGINT (Ctrl-C) and SIGTERM exit 0, no traceback, checkpoint written.

Every run is bounded by a timeout (tests/helpers.py's Run: PMF_RUN_TIMEOUT s, 240 by default); on a
timeout the whole process tree (torchrun puts each worker in its own session) is killed and the test
fails instead of hanging CI.

    python -m pytest tests/test_reliability.py                     # CI: ~3 min on 2 CPU cores
    PMF_REPEAT=20 python -m pytest tests/test_reliability.py       # 20 budget stops, 7 SIGTERMs per target
    PMF_SEED=123 python -m pytest tests/test_reliability.py        # replay the random kill points

PMF_REPEAT sets how many times the budget stop runs, and ceil(PMF_REPEAT / 3) how many SIGTERM
points each target gets. The random points come from PMF_SEED (printed, random when unset).
"""
import glob
import math
import os
import random
import signal
import sys
import threading
import time

import pytest
import torch

from tests.helpers import Run, assert_same_weights, load, log_steps, train_cmd, wait_for_step, worker_logs

REPEAT = max(1, int(os.environ.get("PMF_REPEAT", "3")))
SEED = int(os.environ.get("PMF_SEED", str(random.randrange(10**6))))
# the SIGTERM / kill -9 runs: one check (and log line) per step, so a stop lands on a step boundary
STEPS = 40
EXACT = ["train.log_every=1", "train.stop_check_every=1", f"train.steps={STEPS}"]

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def rng(*key):
    """A random stream per test (and repetition), replayable through PMF_SEED."""
    print(f"PMF_SEED={SEED}")
    return random.Random(f"{SEED}-{'-'.join(map(str, key))}")


# ----------------------------------------------------------------------------- processes
@pytest.fixture
def runs(tmp_path):
    """start(cmd, tag) -> Run; every process tree still alive at teardown is killed."""
    started = []

    def start(cmd, tag):
        r = Run(cmd, str(tmp_path), tag)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill_tree()


def torchrun(log_dir, *extra):
    """torchrun on 2 CPU ranks; each worker's stdout/stderr also under log_dir (tee'd to ours)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            f"--log-dir={log_dir}", "--tee=3", *extra]


def checkpoints(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))


class Jitter:
    """A noisy neighbour: while running, pauses a random worker (SIGSTOP) for 0.02-0.2 s, then
    lets it go on (SIGCONT), again and again. The ranks' clocks then read far apart at each stop
    check, so a stop decided on one rank's clock alone would split the ranks (a hang)."""

    def __init__(self, run, random_):
        self.run, self.random, self.done, self.pauses = run, random_, threading.Event(), 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        workers = {}
        while not self.done.is_set() and self.run.alive():
            workers = workers if len(workers) == 2 else self.run.workers()
            if len(workers) == 2:
                pid = workers[self.random.choice([0, 1])]
                try:
                    os.kill(pid, signal.SIGSTOP)
                    self.pauses += 1
                    self.done.wait(self.random.uniform(0.02, 0.2))
                except ProcessLookupError:              # the worker ended between the listing and now
                    workers = {}
                finally:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            self.done.wait(self.random.uniform(0.1, 0.5))

    def stop(self):
        self.done.set()
        self.thread.join()


# ----------------------------------------------------------------------------- the uninterrupted run
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final checkpoint of an uninterrupted 2-rank run of the SIGTERM tests' command."""
    out = tmp_path_factory.mktemp("reference")
    cmd = torchrun(out / "tlog") + train_cmd(out, "run", *EXACT, "train.ckpt_every=1000")
    r = Run(cmd, str(out), "reference")
    rc, stdout, _ = r.wait()
    assert rc == 0, r.describe()
    assert "resumed" not in stdout
    return load(os.path.join(out, "run", f"ckpt_{STEPS:08d}.pt"))


# ----------------------------------------------------------------------------- 1. time budget, 2 ranks
@pytest.mark.repeat
@pytest.mark.parametrize("rep", range(REPEAT))
def test_time_budget_on_two_ranks_stops_together(tmp_path, runs, rep):
    """Each rank sees the budget run out at another moment; the stop must still be agreed: no
    hang, exit 0, one checkpoint holding both ranks' streams and data positions. Two in three
    repetitions run with a noisy neighbour (Jitter) that pulls the ranks' clocks apart."""
    budget = 3
    jittered = rep % 3 != 0
    overrides = [f"train.time_budget_s={budget}", "train.steps=100000",
                 f"train.stop_check_every={1 if jittered else 2}"]
    cmd = torchrun(tmp_path / "tlog") + train_cmd(tmp_path, "budget", *overrides)
    r = runs(cmd, f"budget{rep}")
    jitter = Jitter(r, rng("budget", rep)) if jittered else None
    try:
        rc, out, err = r.wait()
    finally:
        if jitter is not None:
            jitter.stop()
            print(f"{jitter.pauses} pauses of one rank")
    assert rc == 0, r.describe()
    assert f"time budget of {budget} s reached" in out, r.describe()
    run_dir = tmp_path / "budget"
    ckpts = checkpoints(run_dir)
    assert ckpts, f"no checkpoint written\n{r.describe()}"
    ck = load(ckpts[-1])
    train = ck["train"]
    assert 0 < train["step"] < 100000 and train["finished"], train
    # elapsed_s is the agreed (largest) clock, the one the stop was decided on
    assert budget <= train["elapsed_s"] < budget + 30, train
    assert len(train["ranks"]) == 2                       # saved on both ranks' behalf
    assert not torch.equal(train["ranks"][0]["rng"][0], train["ranks"][1]["rng"][0])   # one stream per micro-batch
    assert "metrics.json" in os.listdir(run_dir)           # a finished run: samples and the judge ran
    for (_, rank), text in worker_logs(tmp_path / "tlog", "stderr").items():
        assert "Traceback" not in text, f"rank {rank}:\n{text[-3000:]}"


# ------------------------------------------------------------------------- 2. SIGTERM, 2 ranks, then the same command
SIGTERM_REPEAT = math.ceil(REPEAT / 3)


@pytest.mark.repeat
@pytest.mark.parametrize("rep", range(SIGTERM_REPEAT))
@pytest.mark.parametrize("target", ["torchrun", "workers"])
def test_sigterm_then_same_command_equals_uninterrupted_run(tmp_path, runs, reference, target, rep):
    """SIGTERM to torchrun (Kubernetes: PID 1) or to every worker (Slurm: every task) at a random
    point after training started: the step finishes, a checkpoint is written, the workers exit 0;
    running the same command again finishes the run bit for bit like the uninterrupted one.

    torchrun's own exit code on SIGTERM is 1 whatever its workers do: it forwards SIGTERM, waits
    for them (30 s, then SIGKILL) and re-raises SignalException (a traceback from torchrun itself).
    That the workers stopped by themselves shows in its log (no "Unable to shutdown ... SIGKILL")
    and in their own stderr. SIGTERM to the workers leaves torchrun running: it exits 0 only when
    both workers exit 0 (a non-zero worker is a ChildFailedError)."""
    random_ = rng("sigterm", target, rep)
    cmd = torchrun(tmp_path / "tlog") + train_cmd(tmp_path, "run", *EXACT, "train.ckpt_every=1000")
    run_dir = tmp_path / "run"
    r = runs(cmd, "first")
    wait_for_step(r, run_dir, 1)
    delay = random_.uniform(0, 2)
    time.sleep(delay)
    workers = r.workers()
    assert sorted(workers) == [0, 1], workers
    if target == "torchrun":
        os.kill(r.proc.pid, signal.SIGTERM)
    else:
        for pid in workers.values():
            os.kill(pid, signal.SIGTERM)
    rc, out, err = r.wait()
    print(f"SIGTERM to {target} {delay:.2f} s after step 1 was logged")
    if target == "torchrun":
        assert rc == 1 and "SignalException" in err and "got signal: 15" in err, r.describe()
        assert "Unable to shutdown process" not in err, r.describe()       # no worker needed SIGKILL
    else:
        assert rc == 0, r.describe()
    stderr = worker_logs(tmp_path / "tlog", "stderr")
    assert sorted(stderr) == [(0, 0), (0, 1)]
    for (_, rank), text in stderr.items():
        assert "Traceback" not in text, f"rank {rank}:\n{text[-3000:]}"
    ckpts = checkpoints(run_dir)
    assert len(ckpts) == 1, f"{ckpts}\n{r.describe()}"
    stop = load(ckpts[0])["train"]
    assert 0 < stop["step"] < STEPS, f"the SIGTERM landed after the run ended ({stop['step']}); raise STEPS"
    assert not stop["finished"] and len(stop["ranks"]) == 2
    assert f"stopped at step {stop['step']} (SIGTERM received); checkpoint written: run the same command " \
           "to continue" in out, r.describe()
    assert max(log_steps(run_dir)) == stop["step"]         # the stop was at a step boundary, logged

    again = runs(cmd, "again")
    rc, out, err = again.wait()
    assert rc == 0, again.describe()
    assert f"resumed from {run_dir}/ckpt_{stop['step']:08d}.pt at step {stop['step']}" in out, again.describe()
    assert log_steps(run_dir) == list(range(1, STEPS + 1))  # every step logged once
    assert_same_weights(load(os.path.join(run_dir, f"ckpt_{STEPS:08d}.pt")), reference,
                        f"SIGTERM to {target} at step {stop['step']}, then the same command")


# --------------------------------------------------------------------------- 3. kill -9 of one rank, torchrun restarts
def test_kill9_of_one_rank_under_max_restarts_resumes_identically(tmp_path, runs, reference):
    """kill -9 of one worker: torchrun stops the other, starts both again (attempt 1) with the same
    command; they resume from the newest checkpoint and end equal to the uninterrupted run (whose
    train.ckpt_every differs: checkpoints must not change training either)."""
    random_ = rng("kill9")
    cmd = torchrun(tmp_path / "tlog", "--max-restarts=1") + \
        train_cmd(tmp_path, "run", *EXACT, "train.ckpt_every=4")
    run_dir = tmp_path / "run"
    r = runs(cmd, "kill9")
    wait_for_step(r, run_dir, random_.randint(5, 12))      # at least one checkpoint (step 4) exists
    victim = random_.choice([0, 1])
    workers = r.workers()
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[victim], signal.SIGKILL)
    killed_at = max(log_steps(run_dir))
    print(f"kill -9 of rank {victim} (pid {workers[victim]}) near step {killed_at}")
    rc, out, err = r.wait()
    assert rc == 0, r.describe()
    logs = worker_logs(tmp_path / "tlog", "stdout")
    assert (1, 0) in logs, f"torchrun did not restart the workers: {sorted(logs)}\n{r.describe()}"
    resumed = [line for line in logs[(1, 0)].splitlines() if line.startswith("resumed from")]
    assert resumed, logs[(1, 0)]
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert step > 0 and step % 4 == 0 and step <= killed_at + 4, resumed   # the newest checkpoint at the kill
    assert log_steps(run_dir) == list(range(1, STEPS + 1))
    assert_same_weights(load(os.path.join(run_dir, f"ckpt_{STEPS:08d}.pt")), reference,
                        f"kill -9 of rank {victim} near step {killed_at}, restarted by torchrun")


# ----------------------------------------------------------------------------- 4. one process: Ctrl-C and SIGTERM
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_single_process_signal_stops_cleanly(tmp_path, runs, sig):
    random_ = rng("single", sig.name)
    cmd = [sys.executable] + train_cmd(tmp_path, "one", "train.log_every=1", "train.stop_check_every=1",
                                       "train.steps=100000", "train.ckpt_every=100000")
    run_dir = tmp_path / "one"
    r = runs(cmd, "one")
    wait_for_step(r, run_dir, 1)
    time.sleep(random_.uniform(0, 1))
    os.kill(r.proc.pid, sig)
    rc, out, err = r.wait()
    assert rc == 0, r.describe()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, r.describe()
    ckpts = checkpoints(run_dir)
    assert len(ckpts) == 1, r.describe()
    step = load(ckpts[0])["train"]["step"]
    assert f"stopped at step {step} ({sig.name} received); checkpoint written: run the same command to continue" \
        in out, r.describe()
    assert "run the same command to continue" in out
