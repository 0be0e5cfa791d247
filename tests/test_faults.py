"""Faults a user meets, each a clear line and nothing left behind: a run whose lock is taken over
stops without writing there again; a failed start leaves nothing, so the same command works once the
cause is fixed; bad paths, names and numbers are one line; a full disk names the file and keeps the
previous checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from pmf_fast.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from pmf_fast.config import ConfigError, get_config
from pmf_fast.lock import LOCK
from pmf_fast.log import Log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--preset", "pMF-XS/4-test"]


# ----------------------------------------------------------------------------- the lock taken over
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["removed", "garbage", "another holder"])
def test_a_run_whose_lock_is_taken_over_stops_and_writes_nothing_more(tmp_path, fault):
    """The run checks its lock at every agreed stop check (here every step): once the lock is no longer
    its own it stops with one line and exit 1, and neither logs nor checkpoints again."""
    args = [sys.executable, "train.py", *BASE, "--name", "held", f"train.out_dir={tmp_path}", "train.steps=100000",
            "train.log_every=1", "train.ckpt_every=2", "train.stop_check_every=1", "train.sample_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    d, lock = tmp_path / "held", tmp_path / "held" / LOCK
    try:
        deadline = time.time() + 120
        while not list_checkpoints(str(d)) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert list_checkpoints(str(d)), "the run wrote no checkpoint in time"
        if fault == "removed":
            lock.unlink()
        elif fault == "garbage":
            lock.write_text("not a lock")
        else:
            lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00", "beat": 0,
                                        "token": "0"}))
        taken = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "another run took over" in err and f"{LOCK} lost" in err, err[-2000:]
    late = [p for _, p in list_checkpoints(str(d)) if os.path.getmtime(p) > taken + 0.5]
    assert not late, f"checkpoints written after the take-over: {late}"
    assert os.path.getmtime(d / "log.jsonl") < taken + 0.5        # nor a log line (a step takes ~0.1 s)
    if fault == "another holder":
        assert "elsewhere" in json.loads(lock.read_text())["host"]     # the new holder's lock is left alone


# ----------------------------------------------------------------------------- failed starts
def test_a_failed_start_leaves_nothing_and_the_same_command_then_works(tmp_path, monkeypatch):
    """Missing VGG weights fail after TensorBoard opened its folder: the run directory (and the
    train.out_dir it created) go again, and the command with the cause fixed trains in the same place."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    out = tmp_path / "out" / "runs"
    # batch 2: LPIPS runs VGG16 at 224 px, so the one step took 20 s at batch 8, 8 s at 2 (2 shared cores)
    cmd = [*BASE, "--name", "first", f"train.out_dir={out}", "objective.lpips_weight=0.4",
           "objective.convnext_weight=0", "train.steps=1", "train.sample_every=0", "train.batch_size=2"]
    with pytest.raises(FileNotFoundError, match="weights not found"):
        train.main(cmd + ["objective.perceptual_weights=pretrained"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()                   # an existing, empty train.out_dir stays as it was
    with pytest.raises(FileNotFoundError):
        train.main(cmd + ["objective.perceptual_weights=pretrained"])
    assert os.listdir(tmp_path / "out") == []
    d = train.main(cmd + ["objective.perceptual_weights=random"])
    assert list_checkpoints(d)


def test_what_a_killed_start_leaves_is_reused(tmp_path, capsys):
    """A start killed during set-up leaves tb/ and a stale lock; the next start takes the directory."""
    d = tmp_path / "killed"
    (d / "tb").mkdir(parents=True)
    (d / "tb" / "events.out").write_text("")
    (d / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7, "since": "2026-01-01T00:00:00"}))
    run_dir = train.main([*BASE, "--name", "killed", f"train.out_dir={tmp_path}", "train.steps=1",
                          "train.sample_every=0"])
    assert list_checkpoints(run_dir)
    assert "starting over" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["missing", "file", "checkpoint"])
def test_resume_of_a_bad_path_is_one_line_and_creates_nothing(tmp_path, how):
    if how == "missing":
        target, match = tmp_path / "gone" / "a" / "b", "no such run directory"
    else:
        target, match = tmp_path / "ckpt_00000001.pt", "takes a run directory, not a checkpoint"
        torch.save({"weights": torch.ones(1)} if how == "file" else {"config": {}, "train": {}}, target)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=match):
        train.main(["--resume", str(target)])
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_of_a_directory_holding_a_foreign_torch_file_is_one_line(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    torch.save({"model": {"w": torch.ones(1)}}, d / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="not a pmf-fast training checkpoint.*train.init"):
        train.main(["--resume", str(d)])


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".."])
def test_a_run_name_cannot_leave_the_out_dir(tmp_path, name):
    with pytest.raises(ConfigError, match="one directory name under train.out_dir"):
        train.main([*BASE, "--name", name, f"train.out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("override, match", [
    ("optim.lr=-1", r"optim.lr=-1.0 must be in \(0, inf\)"),
    ("optim.lr=1e999", "optim.lr=inf must be a finite number"),
    ("optim.adam_betas=(0.9,1.0)", r"must each be in \[0, 1\)"),
    ("optim.adam_eps=0", "optim.adam_eps"),
    ("objective.perceptual_max_t=2", "objective.perceptual_max_t"),
    ("objective.norm_eps=-0.1", "objective.norm_eps"),
    ("train.num_workers=-1", "train.num_workers"),
    ("optim.muon_momentum=1", "optim.muon_momentum"),
])
def test_numbers_out_of_range_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        get_config("pMF-XS/4-test", [override])


def test_the_command_line_says_bad_input_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "train.py", *BASE, "optim.lr=-1", f"train.out_dir={tmp_path}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("config error: optim.lr=-1.0 must be in")


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a real ENOSPC, as a full disk gives it (needs root, as CI and this machine run)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous(full_disk):
    run_dir = str(full_disk)
    first = save_checkpoint(run_dir, 1, {"w": torch.ones(8)})
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(run_dir, 2, {"w": torch.randn(1 << 20)})        # 4 MiB into 1 MiB
    msg = str(e.value)
    assert "ckpt_00000002.pt" in msg and "MiB free" in msg and "previous checkpoints are intact" in msg
    assert "inline_container" not in msg and "\n" not in msg
    assert [p for _, p in list_checkpoints(run_dir)] == [first]
    assert torch.load(first)["w"].sum() == 8
    assert sorted(os.listdir(run_dir)) == ["ckpt_00000001.pt"]         # no temporary file left


def test_a_log_line_on_a_full_disk_names_the_file(full_disk):
    (full_disk / "fill").write_bytes(b"x" * (1 << 20))
    log = Log(str(full_disk), True, tensorboard=False)
    with pytest.raises(OSError) as e:
        log.row(1, {"loss": 1.0})
    assert e.value.filename == str(full_disk / "log.jsonl") and "No space" in e.value.strerror


def test_signal_handlers_are_restored_when_training_fails(tmp_path, monkeypatch):
    """An exception inside the loop must not leave train.py's SIGTERM/SIGINT handlers installed."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train, "pmf_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("planted")))
    with pytest.raises(RuntimeError, match="planted"):
        train.main([*BASE, "--name", "sig", f"train.out_dir={tmp_path}", "train.steps=2"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
