import pytest
import torch

from pmf_fast.threads import ThreadTuner, TunerConfig


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
    # a busy neighbour arrives: 2-thread steps slow down 24x; the first such step starts a trial at once
    seen = loop.run(8, loaded)
    assert seen[0] == 1 and loop.tuner.trials[-1][2] == "slower steps"
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


def test_tuner_rechecks_when_steps_slow_down_gradually():
    loop = Loop()
    loop.run(6, {1: 1.0, 2: 0.5})
    seen = loop.run(9, {1: 1.0, 2: 0.875})           # 1.75x: no single step collapses, the median of three does
    assert seen[:3] == [2, 2, 1] and loop.tuner.trials[-1][2] == "slower steps"
    assert loop.tuner.choice == 2 and loop.tuner.trials[-1][1] == {1: 1.0, 2: 0.875}


def test_one_thread_slowing_down_waits_for_the_interval():
    loop = Loop()
    loop.run(6, {1: 0.5, 2: 1.0})                      # one thread chosen
    seen = loop.run(12, {1: 2.0, 2: 8.0})              # 4x slower for 24 s: the load, not a barrier
    assert seen.count(2) == 0 and len(loop.tuner.trials) == 1


def test_tuner_pause_skips_time_outside_steps():
    loop = Loop()
    loop.run(6, {1: 1.0, 2: 0.5})
    loop.tuner.pause()
    loop.now += 1000.0                                 # sampling a grid, a checkpoint: not a step
    loop.tuner.step()
    loop.run(3, {1: 1.0, 2: 0.5})
    assert len(loop.tuner.trials) == 1 and loop.tuner.choice == 2


def test_for_device_only_on_a_cpu_without_an_explicit_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert ThreadTuner.for_device("meta") is None and ThreadTuner.for_device(torch.device("cuda", 0)) is None
    tuner = ThreadTuner.for_device("cpu", log=print)
    assert tuner.candidates == [1, 2] and torch.get_num_threads() == 1         # its trial starts at one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                                 # the user's choice is kept
    assert ThreadTuner.for_device("cpu") is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    assert ThreadTuner.for_device("cpu") is None                                # one thread: nothing to choose


def test_the_run_setting(monkeypatch):
    """train.cpu_threads: n fixes n threads on a CPU, 0 tunes (unless OMP_NUM_THREADS is set), a GPU gets neither."""
    from pmf_fast.threads import cpu_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cpu_threads(1, "cpu") is None and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert isinstance(cpu_threads(0, "cpu"), ThreadTuner)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu_threads(0, "cpu") is None
        assert cpu_threads(3, "meta") is None and torch.get_num_threads() != 3
    finally:
        torch.set_num_threads(before)
