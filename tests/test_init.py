"""train.init: a new run starts from an official release (synthetic state dicts in the official
layout, with and without the aux v-head) or from a pmf-fast checkpoint (.pt and sharded .dcp, its
sampling EMA or raw weights), on one rank and under FSDP2; a file that does not fit is one line
naming the first differing parameter; a resumed run ignores train.init."""
import os

import pytest
import torch

import train
from pmf_fast.config import ConfigError, get_config
from pmf_fast.model import PMFDiT, ours_to_official
from tests.helpers import spawn_train, wake_up, weights

B = 16


def args(tmp_path, name, *overrides):
    """One step at learning rate 1e-30 (optim.lr must be > 0): the checkpoint then holds the initial
    weights to within ~1e-30, far below any real difference (assert_equal)."""
    return ["--preset", "pMF-XS/4-test", "--name", name, f"train.out_dir={tmp_path}", f"train.batch_size={B}",
            "train.steps=1", "optim.lr=1e-30", "train.tensorboard=false", *overrides]


def source_model(seed=5, **overrides):
    torch.manual_seed(seed)
    cfg = get_config("pMF-XS/4-test", [f"model.{k}={v}" for k, v in overrides.items()])
    return {n: t.clone() for n, t in wake_up(PMFDiT(cfg.model)).state_dict().items()}


def emas_of(run_dir, step=1):
    return torch.load(run_dir / f"ckpt_{step:08d}.pt", weights_only=False)["emas"]


def assert_equal(got, want, what):
    assert got.keys() == want.keys(), what
    for n in want:
        assert got[n].shape == want[n].shape and (got[n] - want[n]).abs().max() <= 1e-24, f"{what}: {n}"


@pytest.mark.parametrize("v_head", [True, False], ids=["training-layout", "release-without-v-head"])
def test_official_layout(tmp_path, capsys, v_head):
    src = source_model()
    official = ours_to_official(src)
    if not v_head:                          # the released inference files: no v-head blocks, no v final layer
        official = {k: v for k, v in official.items() if ".v_heads." not in k and ".v_final_layer." not in k}
    official["net.rope_freqs"] = torch.randn(3, 4)                         # kept by the official model, not by us
    torch.save(official, tmp_path / "pMF-XS.pt")
    run_dir = tmp_path / "ft"
    train.main(args(tmp_path, "ft", f"train.init={tmp_path / 'pMF-XS.pt'}"))
    out = capsys.readouterr().out
    assert f"initialised from {tmp_path / 'pMF-XS.pt'}: official layout" in out
    assert ("the v-head starts as a copy of the u-head" in out) == (not v_head)
    want = dict(src)
    if not v_head:
        want.update({"v" + k[1:]: v for k, v in src.items() if k.startswith(("u_heads.", "u_final_layer."))})
    assert_equal(weights(run_dir, 1), want, "model")
    for key, ema in emas_of(run_dir).items():                              # every EMA starts from them too
        assert_equal(ema, want, key)


def test_pmf_fast_checkpoints_ema_and_raw_pt_and_dcp(tmp_path, capsys):
    """Sources trained 2 steps (.pt under DDP's layout, .dcp under train.parallel=fsdp); the new run takes
    the EMA sample.py picks ('auto': the longest half-life) or the raw weights."""
    src_args = ["--preset", "pMF-XS/4-test", f"train.out_dir={tmp_path}", f"train.batch_size={B}", "train.steps=2",
                "train.tensorboard=false"]
    train.main(src_args + ["--name", "src"])
    train.main(src_args + ["--name", "src_dcp", "train.parallel=fsdp", "train.seed=7"])     # other weights
    pt, dcp = tmp_path / "src" / "ckpt_00000002.pt", tmp_path / "src_dcp" / "ckpt_00000002.dcp"
    saved = torch.load(pt, weights_only=False)
    assert not torch.equal(saved["emas"]["ema_8"]["pos_embed"], saved["model"]["pos_embed"])   # they differ
    capsys.readouterr()
    for name, path, which, want in [("ema", pt, "ema", saved["emas"]["ema_8"]), ("raw", pt, "raw", saved["model"]),
                                    ("dcp", dcp, "ema", None)]:
        train.main(args(tmp_path, name, f"train.init={path}", f"train.init_weights={which}"))
        out = capsys.readouterr().out
        assert f"initialised from {path}: pmf-fast checkpoint of pMF-XS/4-test at step 2, " in out
        assert ("EMA ema_8 (the one it samples with)" if which == "ema" else "raw weights") in out
        if want is None:                        # the sharded source's own EMA, read back through DCP
            from pmf_fast.checkpoint import load_sharded
            want = {n: torch.empty_like(t) for n, t in saved["model"].items()}
            load_sharded(str(dcp), {"emas": {"ema_8": want}})
            assert not torch.equal(want["pos_embed"], saved["emas"]["ema_8"]["pos_embed"])    # seed 7's
        assert_equal(weights(tmp_path / name, 1), want, name)
        assert_equal(emas_of(tmp_path / name)["ema_2"], want, f"{name} ema_2")
        fresh = torch.load(tmp_path / name / "ckpt_00000001.pt", weights_only=False)["train"]
        assert fresh["step"] == 1                                          # counted from step 0


def test_a_file_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path):
    torch.save(ours_to_official(source_model(hidden_size=64)), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"train.init=.*wide.pt does not fit this model: time_tokens is "
                                          r"\[1, 1, 64\] there and \[1, 1, 32\] here; start from weights of the same"):
        train.main(args(tmp_path, "bad", f"train.init={tmp_path / 'wide.pt'}"))
    assert not (tmp_path / "bad").exists()
    deeper = ours_to_official(source_model(depth=4, aux_head_depth=1))
    torch.save(deeper, tmp_path / "deeper.pt")
    with pytest.raises(ConfigError, match=r"it holds shared_blocks.2.attn_scale, which this model has not"):
        train.main(args(tmp_path, "bad", f"train.init={tmp_path / 'deeper.pt'}"))
    with pytest.raises(ConfigError, match=r"train.init=.*missing.pt: no such file"):
        train.main(args(tmp_path, "bad", f"train.init={tmp_path / 'missing.pt'}"))
    with pytest.raises(ConfigError, match=r"train.init=.* is a directory, not a checkpoint: name one of its"):
        train.main(args(tmp_path, "bad", f"train.init={tmp_path}"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"train.init=.*junk.pt: unreadable"):
        train.main(args(tmp_path, "bad", f"train.init={tmp_path / 'junk.pt'}"))
    assert not (tmp_path / "bad").exists()


def test_a_resumed_run_ignores_init(tmp_path, capsys):
    torch.save(ours_to_official(source_model()), tmp_path / "w.pt")
    train.main(args(tmp_path, "r", f"train.init={tmp_path / 'w.pt'}", "train.steps=1"))
    first = weights(tmp_path / "r", 1)
    os.remove(tmp_path / "w.pt")                                           # not read again
    capsys.readouterr()
    train.main(args(tmp_path, "r", f"train.init={tmp_path / 'w.pt'}", "train.steps=2"))
    out = capsys.readouterr().out
    assert f"train.init={tmp_path / 'w.pt'} ignored: this run resumes from its own checkpoint" in out
    assert_equal(weights(tmp_path / "r", 2), first, "resumed at lr 0")


@pytest.mark.slow
def test_init_under_fsdp2(tmp_path):
    """Two FSDP2 ranks start from an official-layout file and from a sharded checkpoint: their sharded
    checkpoints hold the source's weights, and their EMA shards too."""
    src = source_model()
    torch.save(ours_to_official(src), tmp_path / "w.pt")
    spawn_train(2, args(tmp_path, "from_pt", f"train.init={tmp_path / 'w.pt'}", "train.parallel=fsdp"))
    assert_equal(weights(tmp_path / "from_pt", 1), src, "fsdp from .pt")
    spawn_train(2, args(tmp_path, "from_dcp", f"train.init={tmp_path / 'from_pt' / 'ckpt_00000001.dcp'}",
                  "train.parallel=fsdp", "train.init_weights=raw"))
    assert_equal(weights(tmp_path / "from_dcp", 1), src, "fsdp from .dcp")
    from pmf_fast.checkpoint import load_sharded
    ema = {n: torch.empty_like(t) for n, t in src.items()}
    load_sharded(str(tmp_path / "from_dcp" / "ckpt_00000001.dcp"), {"emas": {"ema_8": ema}})
    assert_equal(ema, src, "fsdp EMA")
