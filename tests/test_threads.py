import os
import subprocess
import sys

import pytest
import torch

from pmf_fast.threads import ThreadTuner, TunerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Loop:
    """A training loop on a fake clock: a step at n threads takes cost[n] seconds."""

    def __init__(self, tuner_kw=None):
        self.now = 0.0
        self.tuner = ThreadTuner((1, 2), TunerConfig(**(tuner_kw or {})), clock=lambda: self.now)
        self.tuner.step()                              # the loop calls it after every step; the first reads the clock

    def run(self, steps, cost):
        seen = []
        for _ in range(steps):
            assert torch.get_num_threads() == self.tuner.current    # the count it set is the count in use
            self.now += cost[self.tuner.current]
            self.tuner.step()
            seen.append(self.tuner.current)
        return seen


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tuner_keeps_the_faster_count_and_rechecks_when_the_load_changes():
    loop = Loop()
    idle, loaded = {1: 1.0, 2: 0.5}, {1: 1.25, 2: 12.0}
    seen = loop.run(6, idle)                           # trial: 3 steps at 1 thread, 3 at 2
    assert loop.tuner.choice == 2 and seen[-1] == 2
    assert loop.tuner.trials[0][1] == {1: 1.0, 2: 0.5}
    assert loop.tuner.interval == 1.5 / 0.02           # the trial cost 1.5 s, 2% of 75 s
    # a busy neighbour arrives: 2-thread steps slow down 20x; three of them start a trial at once
    seen = loop.run(8, loaded)
    assert seen[:2] == [2, 2] and loop.tuner.trials[-1][2] == "slower steps"
    assert loop.tuner.choice == 1
    # in that trial one 2-thread step (12 s > 1.5 x 1.25 s) dropped the count: one slow step, not three
    assert loop.tuner.trials[-1][1] == {1: 1.25, 2: 12.0}
    assert loop.tuner.interval == pytest.approx(10.75 / 0.02)    # the trial's cost sets the next interval
    assert loop.run(440, loaded).count(2) == 1         # the next trial (after 537.5 s) again costs one slow step
    # the neighbour leaves: the next interval's trial goes back to 2 threads
    t = loop.now
    loop.run(int(loop.tuner.interval) + 10, idle)
    assert loop.tuner.choice == 2 and loop.tuner.trials[-1][2] == "interval"
    assert loop.now - t >= 30


def test_tuner_pause_skips_time_outside_steps():
    loop = Loop()
    loop.run(6, {1: 1.0, 2: 0.5})
    loop.tuner.pause()
    loop.now += 1000.0                                 # sampling a grid, a checkpoint: not a step
    loop.tuner.step()
    loop.run(3, {1: 1.0, 2: 0.5})
    assert len(loop.tuner.trials) == 1 and loop.tuner.choice == 2


def test_passive_wait_is_set_before_torch_loads_only():
    code = ("import os, sys; from pmf_fast.threads import prefer_passive_wait; "
            "before = prefer_passive_wait(); import torch; from pmf_fast.threads import ThreadTuner; "
            "print(before, os.environ['OMP_WAIT_POLICY'], ThreadTuner.for_device('cpu') is None)")
    late = ("import os, torch; from pmf_fast.threads import prefer_passive_wait, ThreadTuner; "
            "print(prefer_passive_wait(), 'OMP_WAIT_POLICY' in os.environ, ThreadTuner.for_device('cpu') is None, "
            "ThreadTuner.for_device('meta') is None)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = ROOT
    out = [subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, env=env, timeout=120)
           for c in (code, late)]
    assert out[0].stdout.split() == ["True", "PASSIVE", "True"], out[0].stderr[-2000:]
    # torch already loaded: the policy cannot change, so the tuner is the remedy (2+ cores), never on a GPU
    tuned = "True" if (os.cpu_count() or 1) < 2 else "False"
    assert out[1].stdout.split() == ["False", "False", tuned, "True"], out[1].stderr[-2000:]
