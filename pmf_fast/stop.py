"""Every decision to stop a run, agreed by all ranks: SIGTERM / SIGINT, the time budget, a
non-finite loss, and a run lock lost to another run."""
import signal
import time

import torch

from .dist import agree_max
from .lock import LOCK


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
    check; with skip, all ranks agree every step whether to drop the update (a sync per step). Checks
    run every train.stop_check_every steps and on log, checkpoint, sample and FID steps (so before anything
    is written): one small all-reduce and host sync each, not one per step. The step's other host
    reads are the log steps' values and, with perceptual terms, the kept-sample mask
    (perceptual.start_host_copy: read while the forward runs)."""

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
