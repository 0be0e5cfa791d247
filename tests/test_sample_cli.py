"""sample.py on bad input: one-line errors (no traceback) for a missing, unreadable or foreign --ckpt
and an unwritable --out, and command-line sample settings checked by pmf_fast.config.validate."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
from pmf_fast.checkpoint import save_checkpoint
from pmf_fast.config import get_config
from pmf_fast.ema import EMAs
from pmf_fast.model import PMFDiT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real (untrained) checkpoint of the tiny test preset, written as train.py writes one."""
    cfg = get_config("pMF-XS/4-test")
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model = PMFDiT(cfg.model, t_eps=cfg.objective.t_eps)
    emas = EMAs(model, cfg.train.ema_halflives_kimg, cfg.train.batch_size)
    run = tmp_path_factory.mktemp("run")
    return save_checkpoint(str(run), 1, {"model": model.state_dict(), "emas": emas.state_dict(),
                                         "config": cfg.to_dict(), "step": 1})


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
    junk.write_bytes(np.random.default_rng().integers(0, 256, 333, dtype=np.uint8).tobytes())
    assert "is unreadable" in one_line_error(["--ckpt", str(junk), "--out", out])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(3)}, foreign)
    assert "not a pmf-fast checkpoint" in one_line_error(["--ckpt", str(foreign), "--out", out])
    assert "does not match" in one_line_error(["--ckpt", str(foreign), "--preset", "pMF-XS/4-test", "--out", out])
    assert one_line_error(["--ckpt", str(foreign), "--preset", "pMF-Z/9", "--out", out]).startswith(
        "config error: unknown preset")
    assert not os.path.exists(out)


def test_missing_ema(ckpt, tmp_path):
    msg = one_line_error(["--ckpt", ckpt, "--ema", "7", "--out", str(tmp_path / "g.png")])
    assert msg.startswith("error: cannot sample from") and "no EMA with half-life 7" in msg


def test_unwritable_out_is_refused_before_sampling(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_for_sampling", lambda *a: pytest.fail("loaded before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    msg = one_line_error(["--ckpt", ckpt, "--out", str(blocker / "sub" / "grid.png")])
    assert msg.startswith("error: cannot write --out") and "not a writable directory" in msg
    assert "must end in .png" in one_line_error(["--ckpt", ckpt, "--out", str(tmp_path / "grid.jpeg")])
    os.mkdir(tmp_path / "d.npz")
    assert "is a directory" in one_line_error(["--ckpt", ckpt, "--out", str(tmp_path / "d.npz")])
    if os.geteuid() != 0:                          # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not a writable directory" in one_line_error(["--ckpt", ckpt, "--out", str(ro / "g.png")])


@pytest.mark.parametrize("flags", [["--omega", "0.5"], ["--steps", "0"], ["--t-min", "0.9", "--t-max", "0.2"],
                                   ["--t-max", "1.5"]])
def test_sample_settings_are_validated(ckpt, tmp_path, flags):
    out = tmp_path / "g.png"
    msg = one_line_error(["--ckpt", ckpt, "--out", str(out)] + flags)
    assert msg.startswith("config error: sample: need omega >= 1"), msg
    assert not out.exists()


def test_valid_overrides_sample_and_write_atomically(ckpt, tmp_path):
    out = tmp_path / "s.npz"
    sample.cli(["--ckpt", ckpt, "--out", str(out), "--num-samples", "5", "--batch", "2", "--omega", "1.5",
                "--t-min", "0.2", "--t-max", "0.7", "--steps", "2"])
    z = np.load(out)
    assert z["arr_0"].shape == (5, 16, 16, 1) and z["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["s.npz"]                  # the parts folder and temporaries are gone


def test_command_line_exit_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pt"), "--out",
                        str(tmp_path / "g.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {str(tmp_path / 'missing.pt')!r} not found"]


def test_a_preset_that_disagrees_with_the_checkpoint_is_refused(ckpt, tmp_path):
    """Our checkpoints carry their config: --preset of another model is refused (it was silently
    ignored), naming the preset the checkpoint holds; the same preset is accepted."""
    out = tmp_path / "g.png"
    msg = one_line_error(["--ckpt", ckpt, "--preset", "pMF-B/16", "--out", str(out)])
    assert msg.startswith("config error: --preset pMF-B/16 disagrees with") and "holds a pMF-XS/4-test model" in msg
    assert "model.depth: 3 vs 16" in msg and not out.exists()
    sample.cli(["--ckpt", ckpt, "--preset", "pMF-XS/4-test", "--out", str(out), "--classes", "2", "--per-row", "2"])
    assert out.stat().st_size > 0
