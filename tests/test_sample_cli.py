"""sample.py on bad input: one-line errors (no traceback) for a missing, unreadable or foreign --ckpt
and an unwritable --out, and command-line sample settings checked by pmf_fast.config.validate; an error
of sample.py's own code keeps its type; a refusal on rank 0 stops every rank."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import sample
from tests.helpers import ROOT


def one_line_error(argv):
    """The message sample.py exits with (status 1) for argv."""
    with pytest.raises(SystemExit) as e:
        sample.cli(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_missing_unreadable_and_foreign_checkpoints(tmp_path):
    out = str(tmp_path / "grid.png")
    assert one_line_error(["--ckpt", str(tmp_path / "nope.pt"), "--out", out]).startswith("error: checkpoint")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 333, dtype=np.uint8).tobytes())
    assert "is unreadable" in one_line_error(["--ckpt", str(junk), "--out", out])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(3)}, foreign)
    assert "not a pmf-fast checkpoint" in one_line_error(["--ckpt", str(foreign), "--out", out])
    assert "does not match" in one_line_error(["--ckpt", str(foreign), "--preset", "pMF-XS/4-test", "--out", out])
    assert one_line_error(["--ckpt", str(foreign), "--preset", "pMF-Z/9", "--out", out]).startswith(
        "config error: unknown preset")
    assert not os.path.exists(out)


def test_missing_ema(sample_ckpt, tmp_path):
    msg = one_line_error(["--ckpt", sample_ckpt, "--ema", "7", "--out", str(tmp_path / "g.png")])
    assert msg.startswith("error: cannot sample from") and "no EMA with half-life 7" in msg


def test_unwritable_out_is_refused_before_sampling(sample_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_for_sampling", lambda *a: pytest.fail("loaded before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    msg = one_line_error(["--ckpt", sample_ckpt, "--out", str(blocker / "sub" / "grid.png")])
    assert msg.startswith("error: cannot write --out") and "not a writable directory" in msg
    assert "must end in .png" in one_line_error(["--ckpt", sample_ckpt, "--out", str(tmp_path / "grid.jpeg")])
    os.mkdir(tmp_path / "d.npz")
    assert "is a directory" in one_line_error(["--ckpt", sample_ckpt, "--out", str(tmp_path / "d.npz")])
    if os.geteuid() != 0:                          # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not a writable directory" in one_line_error(["--ckpt", sample_ckpt, "--out", str(ro / "g.png")])


@pytest.mark.parametrize("flags", [["--omega", "0.5"], ["--steps", "0"], ["--t-min", "0.9", "--t-max", "0.2"],
                                   ["--t-max", "1.5"]])
def test_sample_settings_are_validated(sample_ckpt, tmp_path, flags):
    out = tmp_path / "g.png"
    msg = one_line_error(["--ckpt", sample_ckpt, "--out", str(out)] + flags)
    assert msg.startswith("config error: sample: need omega >= 1"), msg
    assert not out.exists()


def test_valid_overrides_sample_and_write_atomically(sample_ckpt, tmp_path):
    out = tmp_path / "s.npz"
    sample.cli(["--ckpt", sample_ckpt, "--out", str(out), "--num-samples", "5", "--batch", "2", "--omega", "1.5",
                "--t-min", "0.2", "--t-max", "0.7", "--steps", "2"])
    z = np.load(out)
    assert z["arr_0"].shape == (5, 16, 16, 1) and z["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["s.npz"]                  # the parts folder and temporaries are gone


def test_command_line_exit_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pt"), "--out",
                        str(tmp_path / "g.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {str(tmp_path / 'missing.pt')!r} not found"]


def test_a_preset_that_disagrees_with_the_checkpoint_is_refused(sample_ckpt, tmp_path):
    """Our checkpoints carry their config: --preset of another model is refused, naming the preset the
    checkpoint holds (sampling would otherwise use the checkpoint's model under another name); the
    same preset is accepted."""
    out = tmp_path / "g.png"
    msg = one_line_error(["--ckpt", sample_ckpt, "--preset", "pMF-B/16", "--out", str(out)])
    assert msg.startswith("config error: --preset pMF-B/16 disagrees with") and "holds a pMF-XS/4-test model" in msg
    assert "model.depth: 3 vs 16" in msg and not out.exists()
    sample.cli(["--ckpt", sample_ckpt, "--preset", "pMF-XS/4-test", "--out", str(out), "--classes", "2",
                "--per-row", "2"])
    assert out.stat().st_size > 0


def _edited(sample_ckpt, path, edit):
    """A copy of the checkpoint at `path` after edit(state) (in place)."""
    state = torch.load(sample_ckpt, weights_only=False)
    edit(state)
    torch.save(state, path)
    return str(path)


def _misshape(d):
    """Give the first tensor of a state dict another shape."""
    name = next(iter(d))
    d[name] = torch.zeros(d[name].numel() + 1)


def test_files_that_cannot_be_sampled_from_are_one_line(sample_ckpt, tmp_path):
    from pmf_fast.model import ours_to_official
    cases = {
        "misshapen weights": (lambda s: _misshape(s["model"]), "size mismatch"),
        "a missing weight": (lambda s: s["model"].pop(next(iter(s["model"]))), "Missing key(s)"),
        "no EMAs": (lambda s: s.pop("emas"), "holds no EMA weights"),
        "misshapen EMAs": (lambda s: _misshape(next(iter(s["emas"].values()))), "EMAs do not fit"),
        "other EMAs": (lambda s: s["emas"].update(ema_1e9={}), "EMAs do not fit"),
        "config not a dict": (lambda s: s.update(config="pMF-XS/4-test"), "config is not a dict"),
        "unknown config field": (lambda s: s["config"]["model"].update(width=3), "its config: unknown field"),
        "model not a state dict": (lambda s: s.update(model=[1, 2]), "not a state dict"),
    }
    for name, (edit, words) in cases.items():
        path = _edited(sample_ckpt, tmp_path / "edited.pt", edit)
        msg = one_line_error(["--ckpt", path, "--out", str(tmp_path / "g.png")])
        assert msg.startswith(f"error: cannot sample from {path!r}: ") and words in msg, (name, msg)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds a Tensor" in one_line_error(["--ckpt", str(tmp_path / "tensor.pt"), "--out", str(tmp_path / "g.png")])
    official = ours_to_official(torch.load(sample_ckpt, weights_only=False)["model"])
    _misshape(official)
    torch.save(official, tmp_path / "official.pt")
    msg = one_line_error(["--ckpt", str(tmp_path / "official.pt"), "--preset", "pMF-XS/4-test", "--out",
                          str(tmp_path / "g.png")])
    assert msg.startswith("error: cannot sample from") and "size mismatch" in msg
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("target, error", [
    ("pick_ema", AttributeError("'EMAs' object has no attribute 'halflife'")),
    ("PMFDiT", TypeError("PMFDiT.__init__() got an unexpected keyword argument 't_eps'")),
    ("PMFDiT.load_state_dict", RuntimeError("CUDA error: device-side assert triggered")),
])
def test_an_error_of_our_code_keeps_its_type(sample_ckpt, tmp_path, monkeypatch, target, error):
    """Only a file's problems become "cannot sample from": a bug (here monkeypatched into the loading
    code) or a CUDA error is raised as it is, with its traceback."""
    from pmf_fast import sampling

    def broken(*args, **kwargs):
        raise error
    owner, _, name = target.rpartition(".")
    monkeypatch.setattr(getattr(sampling, owner) if owner else sampling, name, broken)
    with pytest.raises(type(error)) as e:
        sample.cli(["--ckpt", sample_ckpt, "--out", str(tmp_path / "g.png")])
    assert e.value is error


def test_ema_must_be_auto_raw_or_a_half_life(sample_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.cli(["--ckpt", sample_ckpt, "--ema", "best", "--out", str(tmp_path / "g.png")])
    assert "--ema 'best': expected auto, raw or an EMA half-life" in capsys.readouterr().err


def _sample_rank(rank, port, argv, out_dir):
    """sample.cli(argv) on one of 2 spawned ranks (torchrun's environment set by hand, the CPU and
    gloo); writes the message it exits with (None: no error) to out_dir/rank<r>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    try:
        sample.cli(argv)
        msg = None
    except SystemExit as e:
        msg = e.code
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(msg, f)


def test_a_refusal_on_rank_0_stops_every_rank(sample_ckpt, tmp_path):
    """Rank 0 alone reads <out>.parts/settings.json; when it refuses them, the other rank stops too, with
    rank 0's line. Unagreed, the other rank waits in a barrier for a rank that has gone: gloo ends it with
    a traceback once the peer's connection closes, NCCL leaves it hanging until its timeout."""
    from tests.helpers import free_port
    out = tmp_path / "s.npz"
    os.makedirs(f"{out}.parts")
    with open(f"{out}.parts/settings.json", "w") as f:
        json.dump({"n": 3}, f)
    argv = ["--ckpt", sample_ckpt, "--out", str(out), "--num-samples", "4", "--batch", "2", "--device", "cpu"]
    ranks = mp.spawn(_sample_rank, args=(free_port(), argv, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240          # the test takes ~10 s on 2 CPU cores: past 240 s a rank hangs
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("a rank was still running 240 s after a refusal on rank 0 (left waiting in a collective)")
    msgs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    refusal = f"{out}.parts holds an interrupted run with other settings"
    assert all(isinstance(m, str) and "\n" not in m for m in msgs), msgs
    assert msgs[0].startswith(f"error: {refusal}"), msgs[0]
    assert msgs[1].startswith("error: rank 0 on ") and f"failed in opening {out}.parts: {refusal}" in msgs[1], msgs[1]
    assert not out.exists()
