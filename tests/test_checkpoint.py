"""Checkpoints and the atomic-write helper: fallbacks, stale temporaries, non-finite states, and
failures that must leave earlier files intact."""
import os
import subprocess
import sys

import pytest
import torch

from pmf_fast.atomic import atomic_write, clean_temporaries
from pmf_fast.checkpoint import (
    CheckpointError,
    all_finite,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    remove_stale_temporaries,
    save_checkpoint,
)


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=g)}, "step": seed}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_replaces_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(str(path), lambda f: f.write(b"old"))
    assert path.read_bytes() == b"old"

    def boom(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(str(path), boom)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]   # old file kept, no temporary
    atomic_write(str(path), lambda f: f.write("new text"), mode="w")
    assert path.read_text() == "new text" and os.listdir(tmp_path) == ["f.bin"]


def test_clean_temporaries_removes_dead_writers_only(tmp_path):
    dead, live = tmp_path / f"ckpt_00000010.pt.tmp.{dead_pid()}", tmp_path / f"ckpt_00000020.pt.tmp.{os.getppid()}"
    other = tmp_path / f"scan.json.tmp.{dead_pid()}"
    for p in (dead, live, other):
        p.write_bytes(os.urandom(100))
    (tmp_path / "ckpt_00000005.pt").write_bytes(b"x")
    assert clean_temporaries(str(tmp_path), "ckpt_*.pt") == [str(dead)]
    assert live.exists() and other.exists() and (tmp_path / "ckpt_00000005.pt").exists()


def test_remove_stale_temporaries_after_a_kill(tmp_path):
    run = str(tmp_path)
    save_checkpoint(run, 1, state(1))
    code = (f"import os, torch, sys; sys.path.insert(0, {os.getcwd()!r})\n"
            "from pmf_fast.checkpoint import save_checkpoint\n"
            "torch.save = lambda obj, f: (f.write(os.urandom(1000)), f.flush(), os.kill(os.getpid(), 9))\n"
            f"save_checkpoint({run!r}, 2, {{}})\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = [n for n in os.listdir(run) if ".tmp." in n]
    assert len(left) == 1 and left[0].startswith("ckpt_00000002.pt.tmp.")      # what a kill -9 leaves
    assert remove_stale_temporaries(run) == [os.path.join(run, left[0])]
    assert os.listdir(run) == ["ckpt_00000001.pt"] and remove_stale_temporaries(run) == []
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []


def test_load_latest_falls_back_past_a_truncated_checkpoint(tmp_path):
    run = str(tmp_path)
    for step in (3, 7):
        save_checkpoint(run, step, state(step))
    newest = list_checkpoints(run)[-1][1]
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[:len(data) // 2])                  # truncated (a copy cut short, a full disk)
    logged = []
    got, path = load_latest(run, log=logged.append)
    assert path.endswith("ckpt_00000003.pt") and torch.equal(got["model"]["w"], state(3)["model"]["w"])
    assert len(logged) == 1 and "ckpt_00000007.pt" in logged[0] and "unreadable" in logged[0]
    assert open(newest, "rb").read() == data[:len(data) // 2]          # left untouched

    open(list_checkpoints(run)[0][1], "wb").write(b"not a torch file")
    with pytest.raises(CheckpointError, match="no readable checkpoint.*ckpt_00000007.pt, ckpt_00000003.pt"):
        load_latest(run, log=lambda s: None)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_latest(str(tmp_path / "empty"))


def test_load_latest_of_good_checkpoints_warns_nothing(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, state(step), keep=2)
    logged = []
    got, path = load_latest(str(tmp_path), log=logged.append)
    assert got["step"] == 3 and not logged and [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite(bad):
    s = {"model": {"a": torch.randn(5), "b": torch.arange(4)}, "opt": [{"m": torch.randn(2, 2)}, (torch.ones(1),)],
         "step": 3, "empty": torch.empty(0), "cfg": {"name": "x"}}
    assert all_finite(s)
    i = torch.randint(0, 4, ()).item()
    s["opt"][0]["m"].view(-1)[i] = bad
    assert not all_finite(s)
    assert not all_finite({"x": [(torch.tensor([1.0, bad], dtype=torch.bfloat16),)]})
    assert all_finite({"ints": torch.tensor([2 ** 62]), "half": torch.ones(3, dtype=torch.float16)})


def test_save_into_an_unwritable_directory_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(str(run), 1, state(1))
    run.chmod(0o500)
    if os.geteuid() == 0:                           # root writes anyway: refuse as the kernel would for a user
        import pmf_fast.atomic

        def refuse(path, *a, **k):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(pmf_fast.atomic, "open", refuse, raising=False)
    try:
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(str(run), 2, state(2))
    finally:
        run.chmod(0o700)
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and "ckpt_00000002.pt" in msg and "Permission denied" in msg
    assert os.listdir(run) == ["ckpt_00000001.pt"] and load_checkpoint(str(run / "ckpt_00000001.pt"))["step"] == 1


def test_full_disk_keeps_previous_checkpoints(tmp_path, monkeypatch):
    run = str(tmp_path)
    for step in (1, 2):
        save_checkpoint(run, step, state(step))
    before = {f: open(os.path.join(run, f), "rb").read() for f in os.listdir(run)}
    real_save = torch.save

    def full(obj, f):                               # a disk that fills after some bytes are written
        f.write(os.urandom(4096))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"No space left on device"):
        save_checkpoint(run, 3, state(3))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(run)) == ["ckpt_00000001.pt", "ckpt_00000002.pt"]      # none deleted, no temporary
    assert before == {f: open(os.path.join(run, f), "rb").read() for f in before}     # nor changed, byte for byte
    assert load_latest(run, log=print)[0]["step"] == 2


def test_save_into_a_vanished_directory_is_one_line(tmp_path):
    run = tmp_path / "run"                          # deleted (or an unmounted volume) after the start
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(str(run), 5, state(5))
    assert "\n" not in str(e.value) and str(run) in str(e.value) and not run.exists()
