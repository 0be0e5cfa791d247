import json

import pytest
import torch

from pmf_fast.config import PRESETS, Config, ConfigError, config_diff, get_config, save_config
from pmf_fast.model import PMFDiT, num_params

# paper Tab. 5-7 eval parameter counts (M), without the aux v-head
PAPER_PARAMS = {"pMF-B/16": 119, "pMF-L/16": 411, "pMF-H/16": 956, "pMF-B/32": 120, "pMF-L/32": 413, "pMF-H/32": 959}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_shapes(preset):
    cfg = get_config(preset)
    m = cfg.model
    with torch.device("meta"):
        model = PMFDiT(m)
    T = (m.image_size // m.patch_size) ** 2
    assert model.pos_embed.shape == (1, model.prefix_tokens + T, m.hidden_size)
    assert model.u_final_layer.linear.weight.shape == (m.patch_size ** 2 * m.in_channels, m.hidden_size)
    assert len(model.shared_blocks) + len(model.u_heads) == m.depth
    assert len(model.v_heads) == m.aux_head_depth
    if preset in PAPER_PARAMS:
        assert T == 256 and model.prefix_tokens == 20            # N = 276 at every resolution
        assert abs(num_params(model) / 1e6 - PAPER_PARAMS[preset]) / PAPER_PARAMS[preset] < 0.01


def test_h_mlp_rounded_to_8():
    with torch.device("meta"):
        h = PMFDiT(get_config("pMF-H/16").model)
        b = PMFDiT(get_config("pMF-B/16").model)
    assert h.shared_blocks[0].mlp.w1.weight.shape[0] == 3416     # int(1280 * 8 / 3) = 3413 -> 3416
    assert b.shared_blocks[0].mlp.w1.weight.shape[0] == 2048
    assert h.x_embedder.proj1.out_channels == 256 and b.x_embedder.proj1.out_channels == 128


def test_overrides_and_roundtrip(tmp_path):
    cfg = get_config("pMF-B/16", ["model.depth=12", "--train.batch_size=256", "lr=3e-4",
                                  "optim.adam_betas=(0.8,0.9)", "train.impl=reference"])
    assert (cfg.model.depth, cfg.train.batch_size, cfg.optim.lr) == (12, 256, 3e-4)
    assert cfg.optim.adam_betas == (0.8, 0.9) and cfg.train.impl == "reference"
    save_config(cfg, tmp_path / "c.json")
    back = Config.from_dict(json.load(open(tmp_path / "c.json")))
    assert back.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, match", [
    (["model.patch_size=15"], "not divisible by model.patch_size"),
    (["model.num_heads=7"], "not divisible by model.num_heads"),
    (["model.hidden_size=760", "model.num_heads=20"], "multiple of 4"),
    (["model.depth=ten"], "cannot parse"),
    (["model.depth=1.5"], "expected int"),
    (["model.nope=1"], "unknown field 'nope'"),
    (["modle.depth=1"], "unknown config section"),
    (["nope=1"], "unknown config field"),
    (["model.depth"], "section.field=value"),
    (["train.impl=magic"], "train.impl"),
    (["model.aux_head_depth=20"], "aux_head_depth"),
    (["sample.omega=0.5"], "omega"),
    (["objective.label_dropout=random"], "objective.label_dropout='random'"),
    (["objective.perceptual_crop=center"], "objective.perceptual_crop='center'"),
    # refused before any work, each naming the field
    (["train.log_every=0"], r"train\.log_every=0 must be a positive"),
    (["train.ckpt_every=-5"], r"train\.ckpt_every=-5 must be a positive"),
    (["train.sample_every=-1"], r"train\.sample_every=-1 must be >= 0"),
    (["train.eval_every=-1"], r"train\.eval_every=-1 must be >= 0"),
    (["train.time_budget_s=-1"], r"train\.time_budget_s=-1 must be >= 0"),
    (["sample.ema=7"], r"sample\.ema='7' names no EMA.*500, 1000, 2000"),
    (["sample.ema=best"], r"sample\.ema='best' names no EMA"),
    (["train.ema_halflives_kimg=(1,2)"], r"sample\.ema='2000' names no EMA.*\(1, 2\)"),
    (["train.parallel=zero3"], r"train\.parallel='zero3': use 'ddp' or 'fsdp'"),
    (["train.shard_size=-2"], r"train\.shard_size=-2 must be >= 0"),
    (["train.checkpointing=all"], r"train\.checkpointing='all': use 'none' or 'blocks'"),
    (["train.compile=inductor"], r"train\.compile='inductor': use 'auto', 'blocks' or 'none'"),
    (["train.nonfinite=ignore"], r"train\.nonfinite='ignore': use 'stop' or 'skip'"),
    (["train.max_nonfinite=0"], r"train\.max_nonfinite=0 must be >= 1"),
    (["train.stop_check_every=0"], r"train\.stop_check_every=0 must be >= 1"),
    (["optim.warmup_steps=-1"], r"optim\.warmup_steps=-1 must be >= 0"),
    (["optim.decay=linear"], r"optim\.decay='linear': use 'none' or 'cosine'"),
    (["optim.min_lr_ratio=1.5"], r"optim\.min_lr_ratio=1\.5 must be in \[0, 1\]"),
    (["optim.min_lr_ratio=-0.1"], r"optim\.min_lr_ratio=-0\.1 must be in \[0, 1\]"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_config("pMF-B/16", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'pMF-X/16'.*pMF-B/16"):
        get_config("pMF-X/16")


@pytest.mark.parametrize("overrides", [
    ["sample.ema=raw"], ["sample.ema=auto"], ["sample.ema=500"], ["sample.ema=1000.0"],
    ["train.ema_halflives_kimg=(1,2)", "sample.ema=2"], ["train.sample_every=0", "train.eval_every=0"],
    ["train.time_budget_s=0"], ["train.parallel=fsdp", "train.shard_size=8", "train.checkpointing=blocks"],
    ["train.nonfinite=skip", "train.max_nonfinite=1", "train.stop_check_every=1", "train.compile=blocks"],
    ["optim.warmup_steps=0", "optim.decay=cosine", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1"],
])
def test_edge_values_accepted(overrides):
    get_config("pMF-B/16", overrides)


def test_errors_are_one_line():
    for bad in (["train.log_every=0"], ["sample.ema=7"], ["optim.decay=step"], ["train.parallel=x"]):
        with pytest.raises(ConfigError) as e:
            get_config("pMF-B/16", bad)
        assert "\n" not in str(e.value) and bad[0].split("=")[0] in str(e.value)


# ----------------------------------------------------------------------------- presets against the paper
# Written from the paper (arXiv 2601.22158 Tab. 5-8 and the "longer training" recipe of Tab. 6/7) and,
# for sampling, the official torch branch's README defaults; not from config.py.
#               noise  P_mean tr_unif t_thr  omega  t_min  t_max  EMA kimg  epochs
PAPER_TABLE = {
    "pMF-B/16": (1.0,   0.8,   0.0,    0.8,   7.5,   0.1,   0.8,   2000,     320),
    "pMF-L/16": (1.0,   0.8,   0.0,    0.8,   7.0,   0.2,   0.7,   1000,     320),
    "pMF-H/16": (2.0,   0.0,   0.1,    0.6,   7.0,   0.2,   0.6,   1000,     360),
    "pMF-B/32": (2.0,   0.8,   0.0,    0.8,   6.5,   0.1,   0.7,   2000,     320),
    "pMF-L/32": (4.0,   0.0,   0.1,    0.6,   7.5,   0.2,   0.6,   2000,     320),
    "pMF-H/32": (4.0,   0.0,   0.1,    0.6,   5.5,   0.1,   0.6,   500,      360),
}


@pytest.mark.parametrize("preset", list(PAPER_TABLE))
def test_presets_match_the_paper(preset):
    c = get_config(preset)
    o, s = c.objective, c.sample
    got = (o.noise_scale, o.P_mean, o.tr_uniform, o.perceptual_max_t, s.omega, s.t_min, s.t_max,
           float(s.ema), c.train.epochs)
    assert got == PAPER_TABLE[preset], (preset, got)
    # shared by every paper preset (Tab. 8; official pmf.py / default.py)
    assert (o.P_std, o.data_proportion, o.class_dropout_prob, o.cfg_max, o.t_eps) == (0.8, 0.5, 0.1, 7.0, 0.05)
    assert (o.lpips_weight, o.convnext_weight, o.norm_p, o.norm_eps) == (0.4, 0.1, 1.0, 0.01)
    assert o.label_dropout == "first" and o.perceptual_crop == "official"    # the official rules
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.decay, c.optim.weight_decay) == (1e-3, 0, "none", 0.0)
    assert c.optim.adam_betas == (0.9, 0.95) and c.train.batch_size == 1024
    assert c.train.ema_halflives_kimg == (500, 1000, 2000)
    assert c.optim.ns_coefficients == (3.4445, -4.7750, 2.0315)


def test_one_home_for_the_newton_schulz_coefficients():
    from pmf_fast.config import OptimConfig
    from pmf_fast.kernels.newton_schulz import NS_COEFFICIENTS
    assert OptimConfig().ns_coefficients is NS_COEFFICIENTS


def test_cpu_presets_keep_bernoulli_label_dropout():
    assert get_config("pMF-T/4-digits").objective.label_dropout == "bernoulli"


def test_every_choice_field_is_checked():
    """Each Literal[...] field refuses a value outside its choices, naming the field and the choices."""
    import dataclasses
    import typing
    cfg = get_config("pMF-B/16")
    fields = [(s.name, f.name, typing.get_args(typing.get_type_hints(type(getattr(cfg, s.name)))[f.name]))
              for s in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, s.name))
              for f in dataclasses.fields(getattr(cfg, s.name))
              if typing.get_origin(typing.get_type_hints(type(getattr(cfg, s.name)))[f.name]) is typing.Literal]
    assert len(fields) >= 10
    for section, name, choices in fields:
        with pytest.raises(ConfigError, match=rf"{section}\.{name}='bogus': use '{choices[0]}'"):
            get_config("pMF-B/16", [f"{section}.{name}=bogus"])
        ok = get_config("pMF-B/16", [f"{section}.{name}={choices[-1]}"])
        assert getattr(getattr(ok, section), name) == choices[-1]


def test_config_diff_names_each_changed_field():
    a = get_config("pMF-XS/4-test").to_dict()
    b = get_config("pMF-XS/4-test", ["model.depth=5", "train.steps=9", "train.ema_halflives_kimg=(1, 2)"]).to_dict()
    diff = {k: (x, y) for k, x, y in config_diff(a, b)}
    assert diff == {"model.depth": (3, 5), "train.steps": (4, 9), "train.ema_halflives_kimg": ((2.0, 8.0), (1, 2))}
    assert config_diff(a, a) == []
