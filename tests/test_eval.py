"""Evaluation: the metric math on closed-form cases, sample files, distributed and resumable
sampling, and the whole pipeline with a small random feature extractor standing in for Inception
(a test-only stand-in: real numbers need the Inception weights, see pmf_fast/eval.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

import sample
from pmf_fast import eval as E
from pmf_fast.judge import spread
from pmf_fast.model import ours_to_official
from tests.helpers import ROOT, RandomExtractor


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    S, T = A @ A.T + np.eye(6), B @ B.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    st = lambda mu, s: {"mu": mu, "sigma": s}
    assert np.isclose(E.fid(st(mu1, S), st(mu2, S)), ((mu1 - mu2) ** 2).sum())          # equal covariances
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    assert np.isclose(E.fid(st(mu1, np.diag(a)), st(mu1, np.diag(b))), ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(S + T - 2 * linalg.sqrtm(S @ T).real)   # scipy's sqrtm
    assert np.isclose(E.fid(st(mu1, S), st(mu2, T)), expect)


def test_inception_score_closed_forms():
    uniform = np.zeros((100, 10))                       # p(y|x) = p(y): IS = 1
    assert np.isclose(E.inception_score(uniform, splits=1)[0], 1.0)
    confident = np.full((100, 10), -50.0)               # one sure class per image, all 10 equally: IS = 10
    confident[np.arange(100), np.arange(100) % 10] = 50.0
    assert np.isclose(E.inception_score(confident, splits=1)[0], 10.0, rtol=1e-6)


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert E.precision_recall(real.copy(), real) == pytest.approx((1.0, 1.0))
    far = real + 100.0
    assert E.precision_recall(far, real) == pytest.approx((0.0, 0.0))


def test_spread():
    f = np.array([[0.0, 0], [2, 0], [10, 10], [10, 14]])
    assert np.isclose(spread(f, np.array([0, 0, 1, 1])), (1 + 2) / 2)


def test_pipeline_with_stand_in_extractor(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    ex = RandomExtractor()
    same = E.evaluate(ref, str(tmp_path / "ref.npz"), ex, batch=25)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    noisy = np.clip(ref.astype(int) + rng.integers(-60, 60, ref.shape), 0, 255).astype(np.uint8)
    other = E.evaluate(noisy, str(tmp_path / "ref.npz"), ex, batch=25)
    assert other["fid"] > 1e-3 and other["extractor"].startswith("test-only")
    assert {"fid", "inception_score", "inception_score_std", "precision", "recall", "num_samples"} <= other.keys()
    # an ADM-style reference with precomputed statistics gives the same FID
    pool, _ = E.extract(ex, ref)
    np.savez(tmp_path / "adm.npz", mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), arr_0=ref)
    assert np.isclose(E.evaluate(noisy, str(tmp_path / "adm.npz"), ex)["fid"], other["fid"])
    st, feats = E.reference(str(tmp_path / "adm.npz"), ex, features=False)   # training's FID: no 10k features
    assert feats is None and np.array_equal(st["sigma"], np.cov(pool, rowvar=False))


def test_missing_files_name_what_where_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("PMF_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"weights-inception-2015-12-05-6726825d\.pth.*github\.com/toshas"):
        E.InceptionExtractor()
    with pytest.raises(FileNotFoundError, match=r"VIRTUAL_imagenet256_labeled\.npz"):
        E.reference(str(tmp_path / "nope.npz"), RandomExtractor(), 256)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        E.load_samples(str(tmp_path / "bad.npz"))


ARGS = ["--num-samples", "10", "--batch", "3", "--ema", "raw", "--device", "cpu"]


def test_sampling_is_independent_of_batch_and_resumes(sample_ckpt, tmp_path, monkeypatch):
    sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "a.npz"), *ARGS])
    full = np.load(tmp_path / "a.npz")
    assert full["arr_0"].shape == (10, 16, 16, 1) and full["arr_1"].tolist() == [i % 10 for i in range(10)]
    assert not (tmp_path / "a.npz.parts").exists()
    assert len({full["arr_0"][i].tobytes() for i in range(10)}) == 10               # distinct seeds

    # interrupted after two batches, then resumed: the same samples, and only the rest is drawn
    calls, real = [], sample.sample_images

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(sample, "sample_images", flaky)
    with pytest.raises(KeyboardInterrupt):
        sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "b.npz"), *ARGS])
    assert len(os.listdir(tmp_path / "b.npz.parts")) == 3                             # settings + 2 chunks
    monkeypatch.setattr(sample, "sample_images", real)
    sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "b.npz"), *ARGS])
    assert np.array_equal(np.load(tmp_path / "b.npz")["arr_0"], full["arr_0"])
    # other settings on top of an interrupted run are refused
    os.makedirs(tmp_path / "c.npz.parts")
    json.dump({"n": 3}, open(tmp_path / "c.npz.parts" / "settings.json", "w"))
    with pytest.raises(sample.OutputError, match="other settings"):
        sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "c.npz"), *ARGS])
    # another batch size gives the same images
    sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "d.npz"), "--num-samples", "10", "--batch", "4",
                 "--ema", "raw"])
    assert np.array_equal(np.load(tmp_path / "d.npz")["arr_0"], full["arr_0"])


def test_sampling_on_two_ranks(sample_ckpt, tmp_path):
    sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "one.npz"), *ARGS])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "sample.py"), "--ckpt", sample_ckpt, "--out", str(tmp_path / "two.npz"), *ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["arr_1"], one["arr_1"])


def test_official_layout_generates_identically(sample_ckpt, tmp_path):
    state = torch.load(sample_ckpt, weights_only=False)["model"]
    official = {k: v for k, v in ours_to_official(state).items() if ".v_heads." not in k and "v_final" not in k}
    torch.save(official, tmp_path / "official.pt")
    sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / "ours.npz"), *ARGS])
    sample.main(["--ckpt", str(tmp_path / "official.pt"), "--preset", "pMF-XS/4-test", "--out",
                 str(tmp_path / "theirs.npz"), *ARGS])
    assert np.array_equal(np.load(tmp_path / "ours.npz")["arr_0"], np.load(tmp_path / "theirs.npz")["arr_0"])


def test_fid_of_model_and_the_training_notice(sample_ckpt, tmp_path, monkeypatch, capsys):
    from pmf_fast.sampling import fid_of_model, load_for_sampling
    model, cfg = load_for_sampling(sample_ckpt, ema="raw")
    ex = RandomExtractor()
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    ref_stats = E.stats(E.extract(ex, ref)[0])
    value = fid_of_model(model, cfg, 30, ex, ref_stats, "cpu", batch=8)
    assert value > 0 and np.isclose(value, fid_of_model(model, cfg, 30, ex, ref_stats, "cpu", batch=7))
    # without the Inception weights, training goes on and says why there is no FID
    import train
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("PMF_INCEPTION_WEIGHTS", raising=False)
    train.main(["--preset", "pMF-XS/4-test", "--name", "f", f"train.out_dir={tmp_path}", "train.steps=2",
                "train.eval_every=1", "train.fid_ref=ref.npz"])
    out = capsys.readouterr().out
    assert out.count("periodic FID skipped: Inception weights not found") == 1


def test_periodic_fid_in_training(tmp_path, monkeypatch):
    """With an extractor and a reference (here the test-only stand-in), train.py logs fid_<n> every
    eval_every steps."""
    import train
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(E, "InceptionExtractor", lambda device: RandomExtractor())
    run = train.main(["--preset", "pMF-XS/4-test", "--name", "p", f"train.out_dir={tmp_path}", "train.steps=4",
                      "train.eval_every=2", "train.eval_samples=20", f"train.fid_ref={tmp_path / 'ref.npz'}"])
    rows = [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]
    fids = [(r["step"], r["fid_20"]) for r in rows if "fid_20" in r]
    assert [s for s, _ in fids] == [2, 4] and all(v > 0 for _, v in fids)


def _eval_error(argv):
    """The exit message of `python -m pmf_fast.eval argv` run through main()."""
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_eval_cli_bad_input_is_one_line(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=good)
    ref = ["--ref", str(tmp_path / "ref.npz"), "--device", "cpu"]
    cases = {"float.npz": dict(arr_0=rng.random((4, 16, 16, 3)).astype(np.float32)),
             "flat.npz": dict(arr_0=good[:, :, :, 0]),
             "rgba.npz": dict(arr_0=np.concatenate([good, good[..., :1]], -1)),
             "empty.npz": dict(arr_0=good[:0]),
             "named.npz": dict(images=good)}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    expect = {"float.npz": "arr_0 is float32 [4, 16, 16, 3]; expected uint8", "flat.npz": "expected uint8 [N, H, W, C]",
              "rgba.npz": "C 3 or 1", "empty.npz": "N > 0", "named.npz": "has no arr_0"}
    for name, words in expect.items():
        assert words in _eval_error([str(tmp_path / name), *ref]), name
    (tmp_path / "text.npz").write_text("not an archive")
    assert "text.npz is not a readable .npz archive" in _eval_error([str(tmp_path / "text.npz"), *ref])
    whole = (tmp_path / "ref.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])                   # a copy cut short
    assert "cut.npz is not a readable .npz archive" in _eval_error([str(tmp_path / "cut.npz"), *ref])
    np.save(tmp_path / "one.npy", good)
    assert "single .npy array" in _eval_error([str(tmp_path / "one.npy"), *ref])
    assert "sample.py --out" in _eval_error([str(tmp_path / "missing.npz"), *ref])
    # a damaged reference batch names its source; missing or damaged Inception weights name theirs
    msg = _eval_error([str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "cut.npz"), "--weights", "x"])
    assert "weights-inception" in msg and "not found" in msg
    monkeypatch.setattr(E, "InceptionExtractor", lambda device, weights: RandomExtractor())
    assert "VIRTUAL_imagenet" in _eval_error([str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "cut.npz")])
    monkeypatch.undo()
    (tmp_path / "w.pth").write_bytes(b"\x80\x02 half a weight file")
    msg = _eval_error([str(tmp_path / "ref.npz"), *ref, "--weights", str(tmp_path / "w.pth")])
    assert "cannot be read" in msg and E.INCEPTION_URL in msg


def test_eval_cli_error_exits_without_a_traceback(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.ones((2, 4, 4, 3), dtype=np.int64))
    res = subprocess.run([sys.executable, "-m", "pmf_fast.eval", str(tmp_path / "bad.npz"), "--ref", "r.npz"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.npz'}: arr_0 is int64 [2, 4, 4, 3]; expected "
                                               "uint8 [N, H, W, C] with N > 0 and C 3 or 1; write one with sample.py "
                                               "--out x.npz"]


def test_temporary_names_are_unique_per_host_and_pid(tmp_path, monkeypatch):
    """Two containers (pid 1 each) writing one FID cache on shared storage use two temporary files,
    and neither removes the other's."""
    import socket

    from pmf_fast.atomic import clean_temporaries, temporary_path
    path = str(tmp_path / "fid_stats-x.npz")
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: 1)
        m.setattr(socket, "gethostname", lambda: "node-a")
        a = temporary_path(path)
        m.setattr(socket, "gethostname", lambda: "node-b.cluster")
        b = temporary_path(path)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b.cluster")            # this host from here on
    assert a != b and a.startswith(path + ".tmp.1.") and b.endswith(".node-b.cluster")
    for p in (a, b, path + ".tmp.999999999"):                   # the last: the pid-only form, a dead pid here
        open(p, "w").write("part")
    assert clean_temporaries(str(tmp_path)) == [path + ".tmp.999999999"]     # node-a's is not ours to remove
    assert clean_temporaries(str(tmp_path), all_hosts=True) == [a]           # node-b is this host; pid 1 lives
    assert os.path.exists(b)


def test_an_unreadable_reference_image_is_one_line(tmp_path, monkeypatch):
    """A reference folder with a file that is not an image, or one cut short, stops with one line naming
    the file and the checker, not with PIL's traceback."""
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "ref" / c)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "ref" / c / f"{i}.png")
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(E, "InceptionExtractor", lambda device, weights: RandomExtractor())
    argv = [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), "--device", "cpu",
            "--out", str(tmp_path / "m.json")]
    assert E.main(argv)["num_samples"] == 6                          # the folder itself is a usable reference
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    for name, data in (("junk.png", rng.integers(0, 256, 300, dtype=np.uint8).tobytes()),
                       ("cut.png", buf.getvalue()[: len(buf.getvalue()) // 2])):
        bad = tmp_path / "ref" / "b" / name
        bad.write_bytes(data)
        msg = _eval_error(argv)
        assert msg.startswith(f"error: reference image {bad} cannot be read") and \
            f"python -m pmf_fast.data check {tmp_path / 'ref'}" in msg, msg
        bad.unlink()


def test_a_device_error_loading_the_weights_is_not_a_bad_file(tmp_path, monkeypatch):
    """Errors of the GPU while the Inception weights load (out of memory, a device-side assert) keep
    their type; only the file's own errors become "cannot be read"."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"present")

    def raising(error):
        def build(*args, **kwargs):
            raise error
        return build
    for error in (RuntimeError("CUDA error: out of memory"), RuntimeError("CUDA error: device-side assert triggered"),
                  torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")):
        monkeypatch.setattr(fe, "FeatureExtractorInceptionV3", raising(error))
        with pytest.raises(type(error)) as e:
            E.InceptionExtractor("cpu", str(weights))
        assert e.value is error

    class OnTheCPU(torch.nn.Module):                 # builds, then runs out of memory on the way to the GPU
        def to(self, device):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 92.00 MiB")
    monkeypatch.setattr(fe, "FeatureExtractorInceptionV3", lambda *a, **k: OnTheCPU())
    with pytest.raises(torch.OutOfMemoryError):
        E.InceptionExtractor("cuda", str(weights))
    bad_file = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    monkeypatch.setattr(fe, "FeatureExtractorInceptionV3", raising(bad_file))
    with pytest.raises(ValueError, match=r"w\.pth cannot be read \(PytorchStreamReader"):
        E.InceptionExtractor("cpu", str(weights))
