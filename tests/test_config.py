import json

import pytest
import torch

from pmf_fast.config import PRESETS, Config, ConfigError, get_config, save_config
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
])
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_config("pMF-B/16", overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'pMF-X/16'.*pMF-B/16"):
        get_config("pMF-X/16")
