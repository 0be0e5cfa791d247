import copy
import math
import secrets

import pytest
import torch

from pmf_fast.config import ObjectiveConfig, get_config
from pmf_fast.meanflow import (
    adaptive_weight,
    cfg_targets,
    generate,
    jvp_explicit,
    jvp_reference,
    pmf_loss,
    sample_draws,
    sample_interval,
    sample_label_drop,
    sample_omega,
    sample_t_r,
)
from pmf_fast.model import PMFDiT
from tests.helpers import wake_up

N = 200_000


def test_time_sampler():
    cfg = ObjectiveConfig(P_mean=0.8, P_std=0.8, data_proportion=0.5)
    t, r, fm = sample_t_r(N, cfg, torch.Generator().manual_seed(0), "cpu")
    assert (t >= r).all() and fm[: N // 2].all() and not fm[N // 2:].any()
    assert torch.equal(t[fm], r[fm]) and (t[~fm] > r[~fm]).all()
    lt = torch.logit(t[fm].double())
    assert abs(lt.mean() - 0.8) < 0.01 and abs(lt.std() - 0.8) < 0.01
    # max / min of two independent N(0.8, 0.8) logits: means 0.8 +- 0.8 / sqrt(pi)
    assert abs(torch.logit(t[~fm].double()).mean() - (0.8 + 0.8 / math.sqrt(math.pi))) < 0.01
    assert abs(torch.logit(r[~fm].double()).mean() - (0.8 - 0.8 / math.sqrt(math.pi))) < 0.01


def test_uniform_tr_draws():
    cfg = ObjectiveConfig(tr_uniform=1.0, data_proportion=0.0)
    t, r, _ = sample_t_r(N, cfg, torch.Generator().manual_seed(0), "cpu")
    assert abs(t.mean() - 2 / 3) < 0.005 and abs(r.mean() - 1 / 3) < 0.005   # max / min of two U[0, 1]


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_omega_power_law(beta):
    omega = sample_omega(N, 7.0, beta, torch.Generator().manual_seed(0), "cpu").double()
    assert omega.min() >= 1.0 and omega.max() <= 8.0
    # CDF of density omega^-beta on [1, 8]
    if beta == 1.0:
        cdf = lambda w: math.log(w) / math.log(8)
    else:
        cdf = lambda w: (w ** (1 - beta) - 1) / (8 ** (1 - beta) - 1)
    for w in (1.5, 2.0, 4.0, 6.0):
        assert abs((omega <= w).double().mean().item() - cdf(w)) < 0.005


def test_interval_and_label_drop():
    g = torch.Generator().manual_seed(0)
    fm = torch.arange(N) < N // 2
    t_min, t_max = sample_interval(fm, g)
    assert (t_min[fm] == 0).all() and (t_max[fm] == 1).all()
    assert t_min[~fm].max() <= 0.5 and t_max[~fm].min() >= 0.5 and abs(t_min[~fm].mean() - 0.25) < 0.005
    drop = sample_label_drop(N, ObjectiveConfig(class_dropout_prob=0.1, label_dropout="bernoulli"), g, "cpu")
    assert abs(drop.double().mean() - 0.1) < 0.005 and drop[: N // 2].any() and drop[N // 2:].any()
    first = sample_label_drop(1000, ObjectiveConfig(class_dropout_prob=0.1, label_dropout="first"), g, "cpu")
    k = int(first.sum())
    assert k > 0 and first[:k].all() and not first[k:].any()      # the official quirk: a prefix


@pytest.mark.parametrize("rule", [None, "first", "bernoulli"])
def test_label_dropout_fraction_per_half(rule):
    """Dropped fraction in the r = t half and the r < t half, over many batches of 256.
    "first" (official cond_drop, the paper presets' default): num_drop ~ Bin(B, p) per batch and the
    first num_drop samples dropped: 2p of the r = t half, none of the r < t half.
    "bernoulli": p of each half. Both: the per-batch count is Bin(B, p) (mean B p, variance B p (1 - p))."""
    B, batches, p = 256, 2000, 0.1
    cfg = get_config("pMF-B/16", [f"objective.label_dropout={rule}"] if rule else []).objective
    assert cfg.class_dropout_prob == p
    seed = secrets.randbits(62)
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, 1, 1, 1)
    fm_drops = tr_drops = 0
    counts = []
    for _ in range(batches):
        d = sample_draws(x, cfg, g)
        fm_drops += int(d.drop[d.fm_mask].sum())
        tr_drops += int(d.drop[~d.fm_mask].sum())
        k = int(d.drop.sum())
        counts.append(k)
        if cfg.label_dropout == "first":
            assert d.drop[:k].all() and not d.drop[k:].any()          # a prefix of the batch
    half = B // 2 * batches
    counts = torch.tensor(counts, dtype=torch.float64)
    assert abs(counts.mean() - B * p) < 0.8 and abs(counts.var() / (B * p * (1 - p)) - 1) < 0.2
    if cfg.label_dropout == "first":
        assert abs(fm_drops / half - 2 * p) < 0.005 and tr_drops == 0
    else:
        assert abs(fm_drops / half - p) < 0.004 and abs(tr_drops / half - p) < 0.004
    assert cfg.label_dropout == (rule or "first")


def test_adaptive_weight():
    l = torch.tensor([0.5, 3.0, 100.0], requires_grad=True)
    w = adaptive_weight(l, 1.0, 0.01)
    assert torch.allclose(w, l.detach() / (l.detach() + 0.01))
    w.sum().backward()
    assert torch.allclose(l.grad, 1 / (l.detach() + 0.01))           # the weight is stop-gradient


class FakeVHead(torch.nn.Module):
    """v = a(y) * omega + b(t) * z: known, so the CFG algebra can be checked in closed form."""

    def forward(self, z, t, h, omega, t_min, t_max, y, heads="uv"):
        assert (h == 0).all() and (t_min == 0).all() and (t_max == 1).all()
        return None, (y.double() + 1).view(-1, 1, 1, 1) * omega.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) * z


def test_cfg_target_matches_official_three_pass():
    B, null = 64, 10
    g = torch.Generator().manual_seed(1)
    fm = torch.arange(B) < B // 2
    t = torch.rand(B, generator=g, dtype=torch.float64)
    t_min, t_max = sample_interval(fm, g)
    t_min, t_max = t_min.double(), t_max.double()
    omega = sample_omega(B, 7.0, 1.0, g, "cpu").double()
    z, v_t = torch.randn(B, 1, 4, 4, dtype=torch.float64), torch.randn(B, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, null, (B,))
    f = FakeVHead()
    v_g, v_c = cfg_targets(f, z, t, omega, t_min, t_max, y, v_t, null)
    # official: pass 1 (cond omega, uncond omega = 1, null class), pass 2 (cond omega'), select by fm
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    run = lambda w, yy: f(z, t, zeros, w, zeros, ones, yy)[1]
    b = lambda s: s.view(-1, 1, 1, 1)
    v_c0, v_u = run(omega, y), run(ones, torch.full_like(y, null))
    w2 = torch.where((t >= t_min) & (t <= t_max), omega, ones)
    v_c2 = run(w2, y)
    expect = torch.where(b(fm), v_t + b(1 - 1 / omega) * (v_c0 - v_u), v_t + b(1 - 1 / w2) * (v_c2 - v_u))
    assert torch.allclose(v_g, expect) and torch.allclose(v_c, v_c2)
    assert not torch.equal(w2, omega)                         # some samples fall outside the interval


def test_unguided_targets_skip_the_unconditional_pass():
    """cfg_max = 0: omega is 1 everywhere, so v_g = v_t and the unguided path's one conditional pass
    gives the v_c of the doubled pass, and the same loss and gradients."""
    cfg, model, x, y, d = tiny_setup(B=6, cfg_max=0.0)
    assert (d.omega == 1).all()
    z, v_t = x + d.e, torch.randn_like(x)
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    v_g1, v_c1 = cfg_targets(model, z, d.t, d.omega, d.t_min, d.t_max, y, v_t, 10, guided=True)
    v_g0, v_c0 = cfg_targets(model, z, d.t, d.omega, d.t_min, d.t_max, y, v_t, 10, guided=False)
    hook.remove()
    assert calls == [12, 6]
    assert torch.equal(v_g0, v_t) and torch.equal(v_g1, v_t)           # 1 - 1 / omega = 0 exactly
    assert torch.allclose(v_c0, v_c1, rtol=1e-12, atol=1e-12)

    out = []
    for cfg_max in (0.0, 1e-300):        # 1e-300: guided path, omega still 1 to double precision
        cfg.objective.cfg_max = cfg_max
        model.zero_grad()
        loss, _ = pmf_loss(model, x, y, d, cfg.objective, 10)
        loss.backward()
        out.append((loss.detach(), grads(model)))
    (l0, g0), (l1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-12)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-9, atol=1e-12), n


def tiny_setup(B=4, **obj):
    cfg = get_config("pMF-XS/4-test", [f"objective.{k}={v}" for k, v in obj.items()])
    model = wake_up(PMFDiT(cfg.model).double())
    m = cfg.model
    x = torch.rand(B, m.in_channels, m.image_size, m.image_size, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, m.num_classes, (B,))
    draws = sample_draws(x, cfg.objective, torch.Generator().manual_seed(3))
    for k in ("t", "r", "e", "omega", "t_min", "t_max"):
        setattr(draws, k, getattr(draws, k).double())
    return cfg, model, x, y, draws


def test_reference_jvp_against_finite_difference():
    cfg, model, x, _, d = tiny_setup()
    y = torch.randint(0, 10, (x.shape[0],))
    z, v_c = x + d.e, torch.randn_like(x)
    t = d.t.clamp(min=0.1)
    r = t * 0.5
    u, du_dt, _ = jvp_reference(model, z, v_c, t, r, d.omega, d.t_min, d.t_max, y)
    eps = 1e-6
    f = lambda s: model(z + s * v_c, t + s, (t + s) - r, d.omega, d.t_min, d.t_max, y)[0]
    with torch.no_grad():
        fd = (f(eps) - f(-eps)) / (2 * eps)
    assert torch.allclose(du_dt, fd, atol=1e-6, rtol=1e-5), (du_dt - fd).abs().max()
    assert du_dt.abs().max() > 1e-2


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_explicit_equals_reference():
    cfg, model, x, y, d = tiny_setup(B=6)
    out = {}
    for impl in ("reference", "eager"):
        model.zero_grad()
        loss, logs = pmf_loss(model, x, y, d, cfg.objective, cfg.model.num_classes, impl=impl)
        loss.backward()
        out[impl] = (logs, grads(model))
    (lr, gr), (le, ge) = out["reference"], out["eager"]
    assert lr.keys() == le.keys()
    for k in lr:
        assert torch.allclose(lr[k], le[k], rtol=1e-10, atol=1e-12), k
    assert gr.keys() == ge.keys() and len(gr) == len(list(model.parameters()))
    for n in gr:
        assert torch.allclose(gr[n], ge[n], rtol=1e-8, atol=1e-12), n


@pytest.mark.parametrize("impl", ["reference", "eager"])
def test_stop_gradients(impl):
    """Gradients reach the parameters only through u (in V), the aux v loss and x_hat: rebuilding the
    loss with du/dt and the targets from a separate copy of the model must give the same gradients."""
    cfg, model, x, y, d = tiny_setup(B=6)
    o = cfg.objective
    loss, _ = pmf_loss(model, x, y, d, o, cfg.model.num_classes, impl=impl)
    loss.backward()
    g1 = grads(model)

    model.zero_grad()
    frozen = copy.deepcopy(model)
    b = lambda s: s.view(-1, 1, 1, 1)
    z = (1 - b(d.t)) * x + b(d.t) * d.e
    v_t = (z - x) / b(d.t.clamp(min=o.t_eps))
    v_g, v_c = cfg_targets(frozen, z, d.t, d.omega, d.t_min, d.t_max, y, v_t, 10)
    y_in = torch.where(d.drop, torch.full_like(y, 10), y)
    v_g = torch.where(b(d.drop), v_t, v_g)
    _, du_dt, _ = jvp_explicit(frozen, z, v_c, d.t, d.r, d.omega, d.t_min, d.t_max, y_in)
    u, v = model(z, d.t, d.t - d.r, d.omega, d.t_min, d.t_max, y_in)
    V = u + b(d.t - d.r) * du_dt
    adp = lambda l: l / (l.detach() + o.norm_eps)
    (adp((V - v_g).square().sum((1, 2, 3))) + adp((v - v_g).square().sum((1, 2, 3)))).mean().backward()
    g2 = grads(model)
    for n in g1:
        # fp64 round-off differs a little between torch.func.jvp and plain forward; a leak would be O(1)
        err, scale = (g1[n] - g2[n]).abs().max(), g1[n].abs().max()
        assert err <= 1e-6 * scale, (n, err, scale)


def test_label_dropout_feeds_null_class_and_unguided_target():
    cfg, model, x, y, d = tiny_setup(B=6)
    d.drop = torch.tensor([True, False, True, False, False, False])
    seen = []
    orig = model.forward

    def spy(*args, **kw):
        if kw.get("x_dot") is not None:              # the JVP pass (the targets pass has no tangent)
            seen.append(args[6].clone())
        return orig(*args, **kw)
    model.forward = spy
    pmf_loss(model, x, y, d, cfg.objective, 10)
    assert len(seen) == 1 and torch.equal(seen[0], torch.where(d.drop, torch.tensor(10), y))


def test_one_step_generation_is_x_prediction():
    cfg, model, _, _, _ = tiny_setup()
    noise = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ones = torch.ones(3, dtype=torch.float64)
    u, _ = model(noise, ones, ones, 2 * ones, 0.1 * ones, 0.8 * ones, y, heads="u")
    assert torch.allclose(generate(model, noise, y, 2.0, 0.1, 0.8, 1), (noise - u).clamp(-1, 1))
    two = generate(model, noise, y, 2.0, 0.1, 0.8, 2)
    assert two.shape == noise.shape and not torch.allclose(two, generate(model, noise, y, 2.0, 0.1, 0.8, 1))


@pytest.mark.parametrize("kept", [0, 5, 10])
def test_perceptual_on_kept_samples_equals_the_masked_loss(kept):
    """The perceptual networks on the samples with t < perceptual_max_t only (gathered, padded to a
    bucket, scattered back) give the loss, the logged terms and every gradient of running them on
    every sample and multiplying by the mask, as the official code does (fp64; batch 10: 5 kept run
    as 6 rows, one of them padding)."""
    from pmf_fast.perceptual import PerceptualLoss
    cfg, model, x, y, d = tiny_setup(B=10, lpips_weight=0.4, convnext_weight=0.1)
    o = cfg.objective
    order = torch.randperm(10)
    d.t = torch.where(order < kept, torch.rand(10) * o.perceptual_max_t, o.perceptual_max_t + torch.rand(10) * 0.2)
    d.t[order == kept] = o.perceptual_max_t               # the threshold itself is dropped (no-op at 10)
    d.t, d.r = d.t.double(), (d.t * torch.rand(10)).double()
    loss_fn = wake_up(PerceptualLoss(0.4, 0.1, "random", "convnextv2_atto", size=32).double())
    calls = []

    def gathered(x_hat, x_, seed, keep):
        calls.append(int(keep.sum()))
        return loss_fn(x_hat, x_, seed, keep)

    def masked(x_hat, x_, seed, keep):                # every sample through the networks, then x mask
        return tuple(v * keep.to(v.dtype) for v in loss_fn(x_hat, x_, seed))

    out = {}
    for name, fn in (("gathered", gathered), ("masked", masked)):
        model.zero_grad()
        loss, logs = pmf_loss(model, x, y, d, o, cfg.model.num_classes, perceptual=fn)
        loss.backward()
        out[name] = (logs, grads(model))
    assert calls == [kept]
    (lg, gg), (lm, gm) = out["gathered"], out["masked"]
    assert lg.keys() == lm.keys() and {"lpips", "convnext"} <= lg.keys()
    for k in lg:
        assert torch.allclose(lg[k], lm[k], rtol=1e-12, atol=1e-14), (k, lg[k], lm[k])
    assert gg.keys() == gm.keys()
    for n in gg:
        assert torch.allclose(gg[n], gm[n], rtol=1e-10, atol=1e-14), n
