"""End-to-end: train.py and sample.py on the tiny test preset (digits, CPU)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import sample
import train
from pmf_fast.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from pmf_fast.config import ConfigError
from pmf_fast.model import ours_to_official

BASE = ["--preset", "pMF-XS/4-test"]


def run(tmp_path, name, *overrides, resume=False):
    args = (["--resume", str(tmp_path / name)] if resume else BASE + ["--name", name])
    return train.main(args + [f"train.out_dir={tmp_path}", *overrides])


def losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")} | {"step": json.loads(line)["step"]}
                for line in f]


def test_short_run_loss_falls(tmp_path):
    d = run(tmp_path, "fall", "train.steps=80", "train.batch_size=32", "train.log_every=20")
    log = losses(d)
    assert [l["step"] for l in log] == [20, 40, 60, 80]
    assert log[-1]["loss_u"] < 0.8 * log[0]["loss_u"], log
    metrics = json.load(open(os.path.join(d, "metrics.json")))          # the digits judge ran
    assert metrics["judge_test_accuracy"] > 0.9 and metrics["num_samples"] == 360
    assert os.path.exists(os.path.join(d, "samples_00000080.png"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["preset"] == "pMF-XS/4-test" and cfg["train"]["steps"] == 80


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["train.log_every=1", "train.ckpt_every=3", "train.batch_size=16"]
    full = losses(run(tmp_path, "full", "train.steps=7", *common))
    run(tmp_path, "split", "train.steps=3", *common)
    resumed = losses(run(tmp_path, "split", "train.steps=7", resume=True))
    assert len(full) == len(resumed) == 7
    assert full == resumed                  # every loss term, bit for bit


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="patch_size"):
        run(tmp_path, "bad", "model.patch_size=5")
    assert not (tmp_path / "bad").exists()


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_lost(tmp_path):
    d = run(tmp_path, "c", "train.steps=2")
    good = list_checkpoints(d)[-1][1]
    before = digest(good)
    bad = os.path.join(d, "ckpt_00000009.pt")
    with open(bad, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="ckpt_00000009.pt.*unreadable.*move it aside"):
        run(tmp_path, "c", resume=True)
    assert digest(good) == before and os.path.exists(bad)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), 1, {"w": torch.ones(3)})
    before = digest(tmp_path / "ckpt_00000001.pt")

    def crash(obj, f):
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), 2, {"w": torch.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000001.pt"]         # no half file, no temp left
    assert digest(tmp_path / "ckpt_00000001.pt") == before


def test_sample_cli_ours_and_official_layout(tmp_path):
    d = run(tmp_path, "s", "train.steps=2")
    ckpt = list_checkpoints(d)[-1][1]
    out = tmp_path / "s.npz"
    sample.main(["--ckpt", ckpt, "--out", str(out), "--num-samples", "20", "--batch", "8", "--ema", "raw"])
    z = np.load(out)
    assert z["arr_0"].shape == (20, 16, 16, 1) and z["arr_0"].dtype == np.uint8
    assert np.bincount(z["arr_1"], minlength=10).tolist() == [2] * 10             # balanced labels
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "g.png"), "--per-row", "4", "--classes", "3"])
    assert (tmp_path / "g.png").stat().st_size > 0

    # an official-layout file needs its preset (generation from it: tests/test_eval.py)
    torch.save(ours_to_official(torch.load(ckpt, weights_only=False)["model"]), tmp_path / "official.pt")
    with pytest.raises(ValueError, match="--preset"):
        sample.main(["--ckpt", str(tmp_path / "official.pt"), "--out", str(tmp_path / "x.png")])
