"""The run directory's lock (pmf_fast/lock.py): a live holder is refused with one line naming it, a
dead one's lock is taken over (same host: its pid; another host: its heartbeat), a holder whose lock
was taken stops beating, and of several starters on a stale lock exactly one wins."""
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from pmf_fast.lock import LOCK, RunBusy, RunLock


def write_lock(run_dir, **holder):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK), "w") as f:
        json.dump({"since": "2026-01-01T00:00:00+00:00", "beat": 0, **holder}, f)


def test_lock_refuses_a_live_holder_and_takes_a_dead_ones(tmp_path):
    d = str(tmp_path / "run")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(d, host=socket.gethostname(), pid=live.pid)     # made before its pid's process started:
        RunLock(d).acquire().release()                             # the pid was reused, the lock is stale
        write_lock(d, host=socket.gethostname(), pid=os.getpid())  # likewise our own pid (a restarted container)
        RunLock(d).acquire().release()
        time.sleep(2.5)                                  # a real holder made its lock after it started
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        write_lock(d, host=socket.gethostname(), pid=live.pid, since=since)
        with pytest.raises(RunBusy, match=rf"in use by another run \(host {socket.gethostname()}, pid {live.pid}, "
                                          rf"since {re.escape(since)}\)"):
            RunLock(d).acquire()
    finally:
        live.kill()
        live.wait()
    lock = RunLock(d).acquire()                          # same host, pid gone (kill -9): stale, taken over
    holder = json.load(open(os.path.join(d, LOCK)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):    # held: a second start is refused
        RunLock(d).acquire()
    lock.release()
    assert os.listdir(d) == []
    lock = RunLock(str(tmp_path / "new")).acquire()      # created its directory, so removes it if left empty
    lock.release()
    assert not (tmp_path / "new").exists()


def test_lock_of_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    """Another host's pid means nothing here: a beating holder is refused within a heartbeat, a
    silent one is taken after stale_after_s, a file older than that at once."""
    d = str(tmp_path / "run")
    other = RunLock(d, heartbeat_s=0.1)
    other.me["host"] = "node-b"
    other.acquire()
    t0 = time.monotonic()
    with pytest.raises(RunBusy, match="host node-b"):
        RunLock(d, heartbeat_s=0.1, stale_after_s=2).acquire()
    assert time.monotonic() - t0 < 1.5                    # a beat seen, no wait for the full timeout
    other._stop.set()                                     # the node is lost: no more beats
    other._thread.join()
    t0 = time.monotonic()
    lock = RunLock(d, heartbeat_s=0.1, stale_after_s=1).acquire()          # waits ~1 s less the last beat's age
    assert 0.8 <= time.monotonic() - t0 < 10 and json.load(open(os.path.join(d, LOCK)))["pid"] == os.getpid()
    lock.release()
    write_lock(d, host="node-c", pid=1)
    old = time.time() - 120
    os.utime(os.path.join(d, LOCK), (old, old))
    t0 = time.monotonic()
    RunLock(d, stale_after_s=60).acquire().release()    # last written 2 minutes ago: stale at once
    assert time.monotonic() - t0 < 5


def test_lock_holder_stops_beating_when_taken_over(tmp_path):
    d = str(tmp_path / "run")
    lock = RunLock(d, heartbeat_s=0.05).acquire()
    write_lock(d, host="node-b", pid=1)                  # judged gone (e.g. paused past the timeout) and taken
    lock._thread.join(10)                                # its next heartbeat sees the take-over and stops
    assert json.load(open(os.path.join(d, LOCK)))["host"] == "node-b" and not lock._thread.is_alive()
    lock.release()
    assert json.load(open(os.path.join(d, LOCK)))["host"] == "node-b"     # not ours: left alone


def test_two_starters_on_a_stale_lock_one_wins(tmp_path):
    d = str(tmp_path / "run")
    write_lock(d, host=socket.gethostname(), pid=2 ** 22 + 12345)          # no such pid
    results = []

    def start():
        try:
            results.append(RunLock(d).acquire())
        except RunBusy as e:
            results.append(e)
    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, (RunLock, RunBusy)) for r in results) and len(results) == 4
    # threads share a pid, so all but the winner see a live holder (this process) and are refused
    assert sum(isinstance(r, RunLock) for r in results) == 1, results
