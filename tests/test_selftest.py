"""python -m pmf_fast.selftest: passes on this machine (as a user runs it: a subprocess, its JSON and
exit status), names a planted wrong kernel and exits 1, and train.py stops on a failing check
before its first step with one line that names it and the remedy."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pmf_fast import selftest
from pmf_fast.kernels import attention, patch_embed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_selftest_passes_as_a_user_runs_it(tmp_path):
    out = tmp_path / "selftest.json"
    proc = subprocess.run([sys.executable, "-m", "pmf_fast.selftest", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["failed"] == []
    names = [c["check"] for c in report["checks"]]
    for part in ("attention", "o_dot", "dq", "patch embed", "y_dot", "dw1", "newton-schulz", "fast step",
                 "grad x_embedder.proj1.weight"):
        assert any(part in n for n in names), part
    assert all(c["ok"] and c["err"] <= c["bound"] for c in report["checks"])
    assert f"{len(names)} of {len(names)} checks within bound" in proc.stdout


def _off_by_a_bit(fn):
    """A wrong kernel: the tangent 1% too large, the primal right (what a bad tile could do)."""
    def wrong(*args):
        o, o_dot = fn(*args)
        return o, o_dot * 1.01
    return wrong


def test_a_wrong_kernel_is_named_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(attention, "attention_jvp", _off_by_a_bit(attention.attention_jvp))
    monkeypatch.setattr(selftest, "check_fast_step", lambda *a, **k: None)     # the kernels are the point here
    assert selftest.main(["--json", str(tmp_path / "s.json")]) == 1
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "s.json").read_text())
    assert not report["ok"] and report["failed"]
    assert all("o_dot" in n for n in report["failed"])         # only the planted fault fails
    assert f"FAIL {report['failed'][0]}: err" in out and "FAILED: attention (1, 2, 37, 64) float32 o_dot" in out


def test_check_run_raises_one_line_naming_the_check(monkeypatch):
    monkeypatch.setattr(patch_embed, "patch_embed_jvp", _off_by_a_bit(patch_embed.patch_embed_jvp))
    from pmf_fast.config import get_config
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test card")
    with pytest.raises(selftest.SelftestFailed) as e:
        selftest.check_run(get_config("pMF-XS/4-test").model, torch.float32, torch.device("cpu"), echo=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "y_dot" in msg and "--impl eager" in msg and "a test card" in msg


def test_train_stops_before_the_first_step_when_a_kernel_is_wrong(tmp_path, monkeypatch):
    """train.py with impl fast on "CUDA" (the device and the failing check faked: no GPU here) stops
    before building the model or writing anything, with the check's own line."""
    import train
    from pmf_fast import dist
    line = ("kernel self-test failed on a test card: attention (2, 2, 20, 16) bfloat16 o_dot (1 of 12 checks "
            "off the eager reference); train with --impl eager, or train.selftest=off to train anyway")
    calls = []

    def failing(model_cfg, dtype, device, echo=print):
        calls.append((dtype, device.type))
        raise selftest.SelftestFailed(line)

    monkeypatch.setattr(selftest, "check_run", failing)
    monkeypatch.setattr(dist, "setup", lambda: (0, 1, 0, torch.device("cuda", 0)))
    monkeypatch.setattr(dist, "step_settings", lambda tc, device, log: ("fast", True, True))
    with pytest.raises(selftest.SelftestFailed) as e:
        train.main(["--preset", "pMF-XS/4-test", f"train.out_dir={tmp_path}", "train.steps=2"])
    assert str(e.value) == line and calls == [(torch.bfloat16, "cuda")]
    assert not list(tmp_path.rglob("*.pt")), "a checkpoint was written"


def test_before_training_runs_only_for_fast_on_cuda(monkeypatch):
    from pmf_fast.config import get_config
    cfg = get_config("pMF-XS/4-test")
    calls = []
    monkeypatch.setattr(selftest, "check_run", lambda *a, **k: calls.append(a) or selftest.Checks())
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for impl, device, setting in (("eager", cuda, "quick"), ("fast", cpu, "quick"), ("fast", cuda, "off")):
        cfg.train.selftest = setting
        selftest.before_training(cfg.train, cfg.model, impl, True, device, log=lambda s: None)
    assert calls == []
    cfg.train.selftest = "quick"
    selftest.before_training(cfg.train, cfg.model, "fast", False, cuda, log=lambda s: None)
    assert len(calls) == 1 and calls[0][1] == torch.float32


def test_interpreter_problem_names_the_remedy(monkeypatch):
    import numpy
    import triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "pip install 'numpy<2.4'" in selftest.interpreter_problem()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert selftest.interpreter_problem() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert selftest.interpreter_problem() is None
