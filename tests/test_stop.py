"""The stop signals (pmf_fast/stop.py): SIGTERM or SIGINT asks for a stop at the next check, a
second Ctrl-C interrupts at once, and the old handlers come back."""
import os
import signal

import pytest

from pmf_fast.stop import StopSignals


def test_first_signal_asks_for_a_stop_second_ctrl_c_interrupts():
    signals = StopSignals()
    try:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"                         # no exit: the loop stops at its check
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
