"""A run's record (pmf_fast/log.py): log.jsonl cut back to a checkpoint's step on resume (torn or
unparsable lines dropped with a warning), TensorBoard's scalars, and a one-line notice without
TensorBoard."""
import json
import os

import pytest

from pmf_fast.log import Log


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
