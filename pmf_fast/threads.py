"""The intra-op thread count of a CPU training step, chosen by timing the loop's own steps, re-checked.

Why: with torch's default (one OpenMP thread per core) the threads meet at a barrier after every
parallel region, and the one that arrives first spins on a core the other needs, so the step
collapses when another process keeps a core busy; one thread has no barrier, but idle it can be the
slower count. Measured on 2 cores (bench/bench_cpu_threads.py, bench/results/2026-12-01_cpu_threads.md):
beside a one-core busy loop `python train.py` made 46 steps in 570 s at two threads (640-872 idle)
and one thread kept 0.62x of the default's idle rate; idle, two threads took 609 ms a step and one
951 ms. So the count is timed, not fixed. torch.set_num_threads works at run time; OpenMP's wait
policy does not (it is read when torch loads OpenMP): OMP_WAIT_POLICY=PASSIVE, 15% slower idle in
that bench, is not used here.

In train.py: `tuner = cpu_threads(train.cpu_threads, device, log)` before the loop (a tuner for 0 on a
CPU of several cores without OMP_NUM_THREADS, else None), `tuner.step()` after each optimizer step and
`tuner.pause()` after a step that also logged, sampled or saved.

A trial runs a few steps at each count, one thread first (no barrier: never far off), and keeps the
fastest median; a count whose step is already `slowdown` x slower than the best is dropped after that
one step, so a trial costs about one slow step. Trials repeat as the load changes: at once when the
chosen count (if above one) slows down by `slowdown` x (median of the last three steps) or one step
by `collapse` x, else after what the last
trial cost / `trial_cost` seconds (at least `min_interval_s`): trials take at most ~2% of the time.
"""
import os
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class TunerConfig:
    trial_steps: int = 3            # timed steps per candidate in a trial (their median decides)
    slowdown: float = 1.5           # a step this x the best median: drop the candidate / re-check now
    trial_cost: float = 0.02        # trials may take this fraction of the time: sets the re-check interval
    min_interval_s: float = 30.0    # seconds between trials at least
    collapse: float = 3.0           # one step this x the chosen median re-checks at once (a busy neighbour
                                    # made 2-thread steps 6-15x slower; three of them cost ~30 s)


class ThreadTuner:
    """Call step() once per training step: one clock read; during a trial, a thread count set."""

    def __init__(self, candidates=None, cfg: TunerConfig = None, log=None, clock=time.perf_counter):
        self.candidates = sorted(set(candidates or (1, torch.get_num_threads())))
        self.cfg, self.log, self.clock = cfg or TunerConfig(), log, clock
        self.choice, self.chosen_s = None, None
        self.trials = []                  # (count chosen, {count: median step s}, why) per trial
        self._last, self._recent = None, []
        self._start_trial("start")

    @classmethod
    def for_device(cls, device, log=None):
        """A tuner for CPU training on more than one core without an explicit OMP_NUM_THREADS; else None."""
        if torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() < 2:
            return None
        return cls(log=log)

    def pause(self):
        """Time outside training steps follows (sampling, evaluation): the next step() only reads the clock."""
        self._last = None

    def _start_trial(self, why):
        self._queue, self._times, self._why = list(self.candidates), {}, why
        self._set(self._queue[0])

    def _set(self, n):
        self.current = n
        torch.set_num_threads(n)

    def step(self):
        now = self.clock()
        last, self._last = self._last, now
        if last is None:                                   # the first call: no whole step seen yet
            return
        dt = now - last
        if not self._queue:                                # between trials
            self._recent = (self._recent + [dt])[-3:]
            # only several threads can collapse at a barrier; one thread slowing down is the machine's load
            slow = dt > self.cfg.collapse * self.chosen_s or (
                len(self._recent) == 3 and statistics.median(self._recent) > self.cfg.slowdown * self.chosen_s)
            if self.choice > 1 and slow:
                self._start_trial("slower steps")
            elif now - self._trial_end >= self.interval:
                self._start_trial("interval")
            return
        times = self._times.setdefault(self.current, [])
        times.append(dt)
        best = min((statistics.median(t) for c, t in self._times.items() if c != self.current), default=None)
        if len(times) >= self.cfg.trial_steps or (best is not None and dt > self.cfg.slowdown * best):
            self._queue.pop(0)
            if self._queue:
                self._set(self._queue[0])
            else:
                self._finish_trial(now)

    def _finish_trial(self, now):
        medians = {c: statistics.median(t) for c, t in self._times.items()}
        chosen = min(medians, key=medians.get)
        wasted = sum(max(0.0, dt - medians[chosen]) for t in self._times.values() for dt in t)
        self.interval = max(self.cfg.min_interval_s, wasted / self.cfg.trial_cost)
        changed = chosen != self.choice
        self.choice, self.chosen_s, self._trial_end, self._recent = chosen, medians[chosen], now, []
        self.trials.append((chosen, medians, self._why))
        self._set(chosen)
        if self.log and changed:
            steps = ", ".join(f"{c}: {1e3 * s:.0f} ms" for c, s in sorted(medians.items()))
            self.log(f"CPU threads: {chosen} (median step by thread count {steps}; trial at {self._why}); "
                     f"checked again within {self.interval:.0f} s")


def cpu_threads(n, device, log=None):
    """train.cpu_threads on this device: n > 0 fixes n intra-op threads on a CPU; 0 gives a ThreadTuner
    (ThreadTuner.for_device: None on GPUs, with OMP_NUM_THREADS set, or on one core), else None."""
    if torch.device(device).type != "cpu":
        return None
    if n > 0:
        torch.set_num_threads(n)
        return None
    return ThreadTuner.for_device(device, log)
