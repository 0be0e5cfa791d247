import pytest
import torch

from pmf_fast.ema import EMAs, ema_beta


def test_ema_beta_schedule():
    # ramp-up: half-life = min(H * 1000, step * batch * 0.05) images
    assert abs(ema_beta(10, 2000, 1024) - 0.5 ** (1024 / (10 * 1024 * 0.05))) < 1e-12
    assert abs(ema_beta(10 ** 6, 2000, 1024) - 0.5 ** (1024 / 2_000_000)) < 1e-12


def test_emas_track_and_restore():
    model = torch.nn.Linear(3, 2)
    emas = EMAs(model, (1, 4), batch_size=100)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    emas.update(model, step=1000)
    fast, slow = emas.copy_into(model, "ema_1"), emas.copy_into(model, "ema_4")
    b1, b4 = ema_beta(1000, 1, 100), ema_beta(1000, 4, 100)
    assert torch.allclose(fast.weight, start + (1 - b1)) and torch.allclose(slow.weight, start + (1 - b4))
    state = emas.state_dict()
    other = EMAs(model, (1, 4), batch_size=100)
    other.load_state_dict(state)
    assert torch.equal(other.params["ema_4"]["weight"], emas.params["ema_4"]["weight"])


def test_sampling_ema_choice():
    from pmf_fast.sampling import pick_ema
    model = torch.nn.Linear(3, 2)
    emas = EMAs(model, (1, 4), batch_size=100)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert pick_ema(emas, "auto") == "ema_4" and pick_ema(emas, "1") == "ema_1"
    assert torch.equal(emas.copy_into(model, pick_ema(emas, "raw")).weight, model.weight)   # raw weights
    with pytest.raises(ValueError, match="no EMA with half-life 3"):
        pick_ema(emas, "3")
