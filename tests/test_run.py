"""A command's run (pmf_fast/run.py): every rank resumes from the same checkpoint at the same stage,
or all stop with one line naming the ranks, hosts and paths. (Run directories end to end, through
train.main: the same command resumes, a finished run is left alone, another config is refused:
tests/test_train.py.)"""
import socket

import pytest

from pmf_fast import run as R
from pmf_fast.checkpoint import CheckpointError


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
