"""The pieces around the training loop (pmf_fast/run.py): the learning-rate schedule, config
differences on resume, the stop signals and the log."""
import datetime
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pmf_fast import run as R
from pmf_fast.checkpoint import CheckpointError
from pmf_fast.config import OptimConfig, config_diff, get_config
from pmf_fast.lock import LOCK, RunBusy, RunLock
from pmf_fast.log import Log
from pmf_fast.optimizers import lr_factor
from pmf_fast.stop import StopSignals


def test_lr_schedule():
    const = OptimConfig()
    assert [lr_factor(const, s, p) for s, p in ((0, 0.0), (10, 0.5), (99, 1.0))] == [1.0, 1.0, 1.0]   # official
    warm = OptimConfig(warmup_steps=10)
    assert lr_factor(warm, 0, 0.0) == 0.0 and lr_factor(warm, 5, 0.0) == 0.5 and lr_factor(warm, 50, 0.9) == 1.0
    cos = OptimConfig(decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 0.0) == pytest.approx(1.0) and lr_factor(cos, 0, 1.0) == pytest.approx(0.1)
    assert lr_factor(cos, 0, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 0, 0.25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cos, 0, 1.7) == pytest.approx(0.1)                  # past the planned end: the floor


def test_config_diff_names_each_changed_field():
    a = get_config("pMF-XS/4-test").to_dict()
    b = get_config("pMF-XS/4-test", ["model.depth=5", "train.steps=9", "train.ema_halflives_kimg=(1, 2)"]).to_dict()
    diff = {k: (x, y) for k, x, y in config_diff(a, b)}
    assert diff == {"model.depth": (3, 5), "train.steps": (4, 9), "train.ema_halflives_kimg": ((2.0, 8.0), (1, 2))}
    assert config_diff(a, a) == []


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


def test_log_truncate_drops_steps_after_the_checkpoint(tmp_path):
    log = Log(str(tmp_path), enabled=True, tensorboard=False)
    for step in range(1, 6):
        log.row(step, {"loss": float(step)})
    log.truncate(3)
    log.row(4, {"loss": 40.0})
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [(l["step"], l["loss"]) for l in lines] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_tensorboard_gets_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional dependency")
    log = Log(str(tmp_path), enabled=True, tensorboard=True)
    log.row(1, {"loss": 0.5, "img_per_s": 10.0})
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "img_per_s"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("loss")[0].value == pytest.approx(0.5)


def test_without_tensorboard_a_one_line_notice(tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tb)
    log = Log(str(tmp_path), enabled=True, tensorboard=True)
    log.row(1, {"loss": 0.5})
    assert log.tb is None and "TensorBoard is not installed" in capsys.readouterr().out
    assert (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("tail, dropped, kept", [(b'{"step": 6, "loss": 0.', 2, []), (b"\x00\x00\x00", 2, []),
                                                  (b'{"step": 6, "loss": 6.0}', 1, [6])],
                         ids=["torn", "zeros", "no-newline"])
def test_log_truncate_drops_a_torn_line_with_a_warning(tmp_path, capsys, tail, dropped, kept):
    """A kill or a full disk while appending leaves a torn last line (or a block of zeros): the
    resume drops it with a warning, rewrites the file whole, and later rows append cleanly. A row
    cut just before its newline is whole and kept."""
    log = Log(str(tmp_path), enabled=True, tensorboard=False)
    for step in range(1, 6):
        log.row(step, {"loss": float(step)})
    path = tmp_path / "log.jsonl"
    with open(path, "ab") as f:
        f.write(b"not json at all\n" + tail)
    log.truncate(6)
    out = capsys.readouterr().out
    assert f"warning: {path}: dropped {dropped} torn or unparsable line(s)" in out, out
    log.row(7, {"loss": 7.0})
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3, 4, 5, *kept, 7]
    assert os.listdir(tmp_path) == ["log.jsonl"]                          # no temporary left


# ----------------------------------------------------------------------------- the run directory's lock
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
    time.sleep(0.3)
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


def test_all_ranks_agree_on_the_checkpoint_to_resume_from(monkeypatch, tmp_path):
    """A rank that sees another newest checkpoint, or none, stops every rank with one line naming
    the ranks, hosts and paths (here the other ranks' views are injected into the all-gather)."""
    def gather(views):
        return lambda mine: [mine] + views
    d = str(tmp_path)
    monkeypatch.setattr(R, "all_gather_objects", gather([("b", d, "ckpt_00000004.pt", "train", None)]))
    R.agree_on_resume(d, f"{d}/ckpt_00000004.pt", "train")             # the same: fine
    monkeypatch.setattr(R, "all_gather_objects", gather([("b", "/other", None, "train", None),
                                                         ("c", d, "ckpt_00000002.pt", "train", None)]))
    with pytest.raises(CheckpointError) as e:
        R.agree_on_resume(d, f"{d}/ckpt_00000004.pt", "train")
    msg = str(e.value)
    assert "\n" not in msg and "disagree" in msg and "storage every node sees" in msg
    assert f"rank(s) 0 on {socket.gethostname()} see ckpt_00000004.pt (train) in {d}" in msg
    assert "rank(s) 1 on b see no checkpoint (train) in /other" in msg and "rank(s) 2 on c see ckpt_00000002.pt" in msg
    monkeypatch.setattr(R, "all_gather_objects", gather([("b", d, "ckpt_00000004.pt", "done", None)]))
    with pytest.raises(CheckpointError, match=r"see ckpt_00000004.pt \(done\)"):   # the stage is agreed too
        R.agree_on_resume(d, f"{d}/ckpt_00000004.pt", "end")
    same, other = ("a", d, "ckpt_00000004.pt", "train", None), ("b", "/local", None, "train", None)
    monkeypatch.setattr(R, "all_gather_objects", gather([same, other, same, same, other]))
    with pytest.raises(CheckpointError, match=r"rank\(s\) 0-1,3-4 on a,.* see ckpt_00000004.pt .*rank\(s\) 2,5 on b "):
        R.agree_on_resume(d, f"{d}/ckpt_00000004.pt", "train")             # ranks as ranges: short on many
    # a rank that could not resolve the run stops the others with its message (no one left waiting)
    monkeypatch.setattr(R, "all_gather_objects", gather([("b", d, None, None, "holds a run with another config")]))
    with pytest.raises(CheckpointError, match="rank 1 on b stopped: holds a run with another config"):
        R.agree_on_resume(d, f"{d}/ckpt_00000004.pt", "train")
