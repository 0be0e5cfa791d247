import copy
import io
import math

import pytest
import torch

from pmf_fast.config import OptimConfig, get_config
from pmf_fast.kernels.newton_schulz import newton_schulz_ref
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import (
    Muon,
    NAdamW,
    Optimizers,
    assign_owners,
    build_optimizers,
    lr_factor,
    ns_cost,
    split_params,
)
from tests.helpers import assert_close_by_rule

NOTICE = "resumes from a torch.optim.AdamW state"


def test_param_split_follows_the_official_recipe():
    model = PMFDiT(get_config("pMF-XS/4-test").model)
    muon, adamw = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, adam_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert "shared_blocks.0.attn.q_proj.weight" in muon_names and "u_final_layer.linear.weight" in muon_names
    assert "h_embedder.mlp.0.weight" in muon_names
    assert {"x_embedder.proj1.weight", "y_embedder.embedding_table.weight", "pos_embed",
            "shared_blocks.0.attn_scale", "u_final_layer.linear.bias"} <= adam_names
    assert all(p.ndim == 2 for p in muon) and len(muon) + len(adamw) == len(list(model.parameters()))


def test_muon_step_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    q = torch.nn.Parameter(torch.randn(6, 4))
    opt = Muon([p, q], lr=0.1, momentum=0.9)
    p0, mu, beta = p.detach().clone(), torch.zeros(6, 4), 0.9
    for k in (1, 2):
        g = torch.randn(6, 4)
        p.grad, q.grad = g.clone(), torch.randn(6, 4)
        opt.step()
        mu = beta * mu + (1 - beta) * g
        upd = beta * mu / (1 - beta ** (k + 1)) + (1 - beta) * g / (1 - beta ** k)
        p0 = p0 - 0.1 * (6 / 4) ** 0.5 * newton_schulz_ref(upd)
        assert torch.allclose(p.detach(), p0, atol=1e-5)


def test_optimizers_cover_every_parameter_once():
    model = PMFDiT(get_config("pMF-XS/4-test").model)
    opts = build_optimizers(model, get_config("pMF-XS/4-test").optim)
    ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    adam = opts[1]
    assert isinstance(opts, Optimizers) and isinstance(adam, NAdamW)
    assert adam.defaults["betas"] == (0.9, 0.95) and adam.defaults["eps"] == 1e-8


# ----------------------------------------------------------------------------- the Adam group: optax's nadamw
def closed_form(p, grads, lr, b1, b2, eps, wd):
    """optax scale_by_adam(nesterov=True) + add_decayed_weights + scale_by_learning_rate, written out
    in float64 over one parameter's gradients (None: no gradient that step, so no step counted)."""
    p, mu, nu, t, out = p.double(), 0.0, 0.0, 0, []
    for g in grads:
        if g is not None:
            g, t = g.double(), t + 1
            mu = b1 * mu + (1 - b1) * g
            nu = b2 * nu + (1 - b2) * g * g
            mu_hat = b1 * mu / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
            nu_hat = nu / (1 - b2 ** t)
            p = p - lr * (mu_hat / (nu_hat.sqrt() + eps) + wd * p)
        out.append(p)
    return out


def grad_streams(shapes, steps, gen):
    """Fresh random gradients of several scales; the third parameter skips step 2."""
    return [[None if (i == 2 and k == 1) else torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 1)
             for k in range(steps)] for i, s in enumerate(shapes)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_nadamw_matches_the_closed_form(wd):
    """Every step from t = 1 to 12 (bias corrections at t = 1, 2, 3 and later), in float64 to 1e-13,
    and in float32 within the tolerance rule; odd shapes, one parameter missing a step."""
    gen = torch.Generator().manual_seed(0)
    shapes, steps, hp = [(7,), (3, 5), (2, 3, 3, 3)], 12, dict(lr=0.05, b1=0.9, b2=0.95, eps=1e-8, wd=wd)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = grad_streams(shapes, steps, gen)
    ref = [closed_form(p, g, **hp) for p, g in zip(init, grads)]
    ref32 = [closed_form(p.float(), [None if x is None else x.float() for x in g], **hp) for p, g in zip(init, grads)]
    for dtype in (torch.float64, torch.float32):
        params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in init]
        opt = NAdamW(params, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
        for k in range(steps):
            for i, p in enumerate(params):
                p.grad = None if grads[i][k] is None else grads[i][k].to(dtype)
            opt.step()
            for i, p in enumerate(params):
                if dtype == torch.float64:
                    err = (p.detach() - ref[i][k]).abs().max().item()
                    assert err <= 1e-13 * max(1.0, ref[i][k].abs().max().item()), (k + 1, i, err)
                else:
                    assert_close_by_rule(p.detach(), ref[i][k], ref32[i][k].float(), f"step {k + 1} param {i}")
    assert [opt.state[p]["step"].item() for p in params] == [steps, steps, steps - 1]


def test_nadamw_first_step_is_1_47_times_adamw():
    """At t = 1 the Nesterov step is (1 + b1 (1 - b1) / (1 - b1^2)) g / (|g| + eps): 1.47x AdamW's."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(5, 3, dtype=torch.float64)
    p.grad, q.grad = g.clone(), g.clone()
    before = p.detach().clone()
    NAdamW([p], lr=0.01, betas=(0.9, 0.95)).step()
    torch.optim.AdamW([q], lr=0.01, betas=(0.9, 0.95), weight_decay=0.0).step()
    ratio = 1 + 0.9 * 0.1 / (1 - 0.9 ** 2)
    assert torch.allclose(before - p.detach(), 0.01 * ratio * g / (g.abs() + 1e-8), rtol=1e-14, atol=0)
    assert torch.allclose((before - p.detach()) / (before - q.detach()), torch.full_like(g, ratio), rtol=1e-9)


def _tiny_run():
    """A model's Muon and NAdamW on random gradients: the optimizers, and a function to take one step."""
    model = PMFDiT(get_config("pMF-XS/4-test").model).double()
    opts = build_optimizers(model, get_config("pMF-XS/4-test").optim)

    def step(k):
        gen = torch.Generator().manual_seed(100 + k)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opts.step()
        opts.zero_grad()
    return model, opts, step


def test_state_dict_resume_is_exact_mid_run():
    """Two steps, save (through torch.save), a fresh model and optimizers load it, three more steps:
    bit-identical to five steps in one go, for both groups, through the container."""
    model, opts, step = _tiny_run()
    for k in range(2):
        step(k)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizers": opts.state_dict()}, buf)
    for k in range(2, 5):
        step(k)
    model2, opts2, step2 = _tiny_run()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2.load_state_dict(saved["model"])
    opts2.load_state_dict(saved["optimizers"])
    for k in range(2, 5):
        step2(k)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    assert opts[1].state_dict()["param_groups"] == opts2[1].state_dict()["param_groups"]


def _adamw_state(params, grads, steps):
    """What build_optimizers saved before the Adam group became NAdamW: torch's AdamW after `steps`."""
    adamw = torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for k in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[k].clone()
        adamw.step()
    return adamw


def test_adamw_checkpoint_resumes_with_its_moments_and_one_notice(capsys):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (3, 5), (4, 1, 2, 2)]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for _ in range(4)] for s in shapes]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    adamw = _adamw_state(params, grads, 3)
    saved = copy.deepcopy(adamw.state_dict())
    opt = NAdamW(params, lr=0.05, betas=(0.9, 0.95))
    opt.load_state_dict(saved)
    assert capsys.readouterr().out.count(NOTICE) == 1
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], adamw.state[p][key])
        assert opt.state[p]["step"].item() == 3 and opt.state[p]["step"].device.type == "cpu"
    assert set(opt.param_groups[0]) == {"params", "lr", "betas", "eps", "weight_decay", "foreach"}
    # step 4 follows the Nesterov rule from AdamW's moments
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g[3].clone()
    opt.step()
    b1, b2 = 0.9, 0.95
    for p, p0, g in zip(params, before, grads):
        mu = b1 * adamw.state[p]["exp_avg"] + (1 - b1) * g[3]
        nu = b2 * adamw.state[p]["exp_avg_sq"] + (1 - b2) * g[3] ** 2
        mu_hat = b1 * mu / (1 - b1 ** 5) + (1 - b1) * g[3] / (1 - b1 ** 4)
        assert torch.allclose(p.detach(), p0 - 0.05 * mu_hat / ((nu / (1 - b2 ** 4)).sqrt() + 1e-8),
                              rtol=0, atol=1e-14)
    opt.load_state_dict(opt.state_dict())                # its own state: no notice
    assert NOTICE not in capsys.readouterr().out


def test_adamw_dcp_checkpoint_resumes_with_its_moments_and_one_notice(tmp_path, capsys):
    """torch.distributed.checkpoint asks for NAdamW's keys (a subset of AdamW's) and fills in the
    saved values, as train.py resumes a train.parallel=fsdp run."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from pmf_fast.checkpoint import load_sharded, save_sharded
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    grads = [[torch.randn_like(p) for _ in range(3)] for p in old.parameters()]
    adamw = _adamw_state(list(old.parameters()), grads, 3)
    msd, osd = get_state_dict(old, [adamw])
    path = save_sharded(str(tmp_path), 3, {"model": msd, "optimizers": osd}, {})
    new = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    opt = NAdamW(new.parameters(), lr=0.5, betas=(0.9, 0.95))
    msd, osd = get_state_dict(new, [opt])
    shards = {"model": msd, "optimizers": osd}
    load_sharded(path, shards)
    set_state_dict(new, [opt], model_state_dict=shards["model"], optim_state_dict=shards["optimizers"])
    assert capsys.readouterr().out.count(NOTICE) == 1
    for p, q in zip(old.parameters(), new.parameters()):
        assert torch.equal(p, q) and opt.state[q]["step"].item() == 3
        assert torch.equal(opt.state[q]["exp_avg"], adamw.state[p]["exp_avg"])
        assert torch.equal(opt.state[q]["exp_avg_sq"], adamw.state[p]["exp_avg_sq"])
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["foreach"] is True


def test_a_state_of_another_optimizer_is_refused():
    p = torch.nn.Parameter(torch.randn(4, 3))
    muon = Muon([p])
    p.grad = torch.randn(4, 3)
    muon.step()
    with pytest.raises(ValueError, match=r"has keys \['mu', 'step'\], not step, exp_avg and exp_avg_sq"):
        NAdamW([p]).load_state_dict(muon.state_dict())
    opts = Optimizers([NAdamW([p])])
    with pytest.raises(ValueError, match="the checkpoint holds 2 optimizer states, this run has 1 optimizers"):
        opts.load_state_dict([{}, {}])


# ----------------------------------------------------------------------------- the container
def test_container_steps_zeroes_and_sets_the_lr_of_every_optimizer():
    model, opts, _ = _tiny_run()
    twin = copy.deepcopy(model)
    twin_opts = build_optimizers(twin, get_config("pMF-XS/4-test").optim)
    opts.set_lr(0.02)
    assert {g["lr"] for o in opts for g in o.param_groups} == {0.02} and len(opts) == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opts.step()
    for o in twin_opts:                                  # the loop the container replaces
        for g in o.param_groups:
            g["lr"] = 0.02
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    opts.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # torch.distributed.checkpoint takes the container as it takes a list of optimizers
    from torch.distributed.checkpoint.state_dict import get_state_dict
    _, osd = get_state_dict(model, opts)
    assert len(osd["param_groups"]) == 2 and len(osd["state"]) == len(list(model.parameters()))


def test_lr_schedule():
    const = OptimConfig()
    assert [lr_factor(const, s, p) for s, p in ((0, 0.0), (10, 0.5), (99, 1.0))] == [1.0, 1.0, 1.0]   # official
    warm = OptimConfig(warmup_steps=10)
    assert lr_factor(warm, 0, 0.0) == 0.0 and lr_factor(warm, 5, 0.0) == 0.5 and lr_factor(warm, 50, 0.9) == 1.0
    cos = OptimConfig(decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 0.0) == pytest.approx(1.0) and lr_factor(cos, 0, 1.0) == pytest.approx(0.1)
    assert lr_factor(cos, 0, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 0, 0.25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cos, 0, 1.7) == pytest.approx(0.1)                  # past the planned end: the floor


def test_owners_balance_newton_schulz_cost():
    """Distributed Muon's owners of the Newton-Schulz work: balanced to within one matrix's cost,
    and the same on every rank (tests/test_dist.py runs the steps on 2 and 3 ranks)."""
    shapes = [(32, 32)] * 7 + [(32, 85)] * 3 + [(85, 32)] * 2 + [(10, 256)]
    for world in (2, 3):
        owner = assign_owners(shapes, world)
        load = [sum(ns_cost(s) for s, o in zip(shapes, owner) if o == r) for r in range(world)]
        assert max(load) - min(load) <= max(ns_cost(s) for s in shapes), load
        assert owner == assign_owners(shapes, world)         # the same on every rank
