"""The pMF objective (arXiv 2601.22158 Alg. 2, as the official pmf.py implements it) and sampling.

One training step:  draws = sample_draws(...)  ->  loss, logs = pmf_loss(model, x, y, draws, cfg).
The random draws are separate from the loss so that the reference and explicit JVP paths can be
compared on exactly the same draws.
"""
from dataclasses import dataclass

import torch

from .config import ObjectiveConfig
from .kernels.attention import upcast
from .perceptual import start_host_copy


# ----------------------------------------------------------------------------- samplers
def logit_normal(n, P_mean, P_std, gen, device):
    return torch.sigmoid(torch.randn(n, generator=gen, device=device) * P_std + P_mean)


def sample_t_r(n, cfg: ObjectiveConfig, gen, device):
    """t, r ~ logit-normal independently; a tr_uniform fraction redrawn from U[0, 1]; the first
    data_proportion of the batch gets r = t (flow-matching samples); then (t, r) = (max, min)."""
    t = logit_normal(n, cfg.P_mean, cfg.P_std, gen, device)
    r = logit_normal(n, cfg.P_mean, cfg.P_std, gen, device)
    if cfg.tr_uniform > 0:
        unif = torch.rand(n, generator=gen, device=device) < cfg.tr_uniform
        t = torch.where(unif, torch.rand(n, generator=gen, device=device), t)
        r = torch.where(unif, torch.rand(n, generator=gen, device=device), r)
    fm_mask = torch.arange(n, device=device) < int(n * cfg.data_proportion)
    r = torch.where(fm_mask, t, r)
    return torch.maximum(t, r), torch.minimum(t, r), fm_mask


def sample_omega(n, cfg_max, beta, gen, device):
    """omega on [1, 1 + cfg_max] with density proportional to omega^-beta, by inverse CDF."""
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    s_max = torch.tensor(float(cfg_max), dtype=torch.float64)
    if beta == 1.0:                                   # log-uniform
        omega = torch.exp(u * torch.log1p(s_max))
    else:
        log_base = (1.0 - beta) * torch.log1p(s_max)
        omega = torch.exp(torch.log1p(u * torch.expm1(log_base)) / (1.0 - beta))
    return omega.float()


def sample_interval(fm_mask, gen):
    """Guidance interval t_min ~ U[0, 0.5], t_max ~ U[0.5, 1]; [0, 1] for the r = t samples."""
    n, device = fm_mask.shape[0], fm_mask.device
    t_min = torch.rand(n, generator=gen, device=device) * 0.5
    t_max = 0.5 + torch.rand(n, generator=gen, device=device) * 0.5
    return torch.where(fm_mask, 0.0, t_min), torch.where(fm_mask, 1.0, t_max)


def sample_label_drop(n, cfg: ObjectiveConfig, gen, device):
    """Which samples lose their label (CFG dropout).
    "bernoulli": each sample independently with probability p.
    "first": the official code's quirk: num_drop ~ Bin(n, p), then the *first* num_drop samples
    are dropped, which all fall in the r = t half (official pmf.py cond_drop; upstream PR #7)."""
    coin = torch.rand(n, generator=gen, device=device) < cfg.class_dropout_prob
    if cfg.label_dropout == "first":
        return torch.arange(n, device=device) < coin.sum()
    return coin


@dataclass
class Draws:
    """Every random draw of one training step, [B] each unless noted."""
    t: torch.Tensor
    r: torch.Tensor
    fm_mask: torch.Tensor    # r = t samples
    e: torch.Tensor          # noise, [B, C, H, W], already scaled by noise_scale
    omega: torch.Tensor
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop: torch.Tensor       # label dropped
    crop_seed: int           # seeds the perceptual loss's paired random crop


def sample_draws(x, cfg: ObjectiveConfig, gen, cpu_gen=None) -> Draws:
    """All draws from `gen` (on x's device), but the crop seed, a Python int, from `cpu_gen` (a CPU
    generator; `gen` itself when that is on the CPU): drawing it on the GPU would sync every step."""
    n, device = x.shape[0], x.device
    if cpu_gen is None:
        if gen.device.type != "cpu":
            raise ValueError("sample_draws: pass cpu_gen (a CPU generator) for the crop seed when gen is on "
                             f"{gen.device}; reading a GPU draw back would sync every step")
        cpu_gen = gen
    t, r, fm_mask = sample_t_r(n, cfg, gen, device)
    e = torch.randn(x.shape, generator=gen, device=device) * cfg.noise_scale
    t_min, t_max = sample_interval(fm_mask, gen)
    omega = sample_omega(n, cfg.cfg_max, cfg.cfg_beta, gen, device)
    drop = sample_label_drop(n, cfg, gen, device)
    crop_seed = int(torch.randint(0, 2**62, (1,), generator=cpu_gen))
    return Draws(t, r, fm_mask, e, omega, t_min, t_max, drop, crop_seed)


# ----------------------------------------------------------------------------- loss pieces
def adaptive_weight(loss, p=1.0, eps=0.01):
    """loss / sg((loss + eps)^p), on per-sample sums (MeanFlow's adaptive weighting)."""
    return loss / (loss.detach() + eps).pow(p)


def _b(t):                                          # [B] -> [B, 1, 1, 1]
    return t.view(-1, 1, 1, 1)


@torch.no_grad()
def cfg_targets(model, z, t, omega, t_min, t_max, y, v_t, null_class, guided=True):
    """The CFG target v_g and the JVP tangent v_c, from the aux v-head without gradient.

    The official code runs the v-head three times: (cond, omega) and (uncond, omega = 1) as one
    doubled batch, then cond again with omega' = omega inside [t_min, t_max] and 1 outside; v_g
    uses the omega run for r = t samples and the omega' run otherwise. For r = t samples the
    interval is [0, 1], so omega' = omega there and the omega' run serves every sample: one
    doubled batch (cond with omega', uncond with omega = 1) gives identical targets.
    The v-head is evaluated with h = 0 and interval [0, 1].

    guided=False (objective.cfg_max = 0, omega is 1 everywhere): v_g = v_t and the unconditional
    half would be multiplied by 0, so only the conditional half runs."""
    w = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
    n = z.shape[0]
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    if not guided:
        _, v_c = model(z, t, zeros, w, zeros, ones, y, heads="v")
        return v_t, v_c
    _, v = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([zeros, zeros]),
                 torch.cat([w, ones]), torch.cat([zeros, zeros]), torch.cat([ones, ones]),
                 torch.cat([y, torch.full_like(y, null_class)]), heads="v")
    v_c, v_u = v[:n], v[n:]
    v_g = v_t + _b(1 - 1 / w) * (v_c - v_u)
    return v_g, v_c


def jvp_reference(model, z, v_c, t, r, omega, t_min, t_max, y):
    """torch.func.jvp over model.forward along (v_c, dt = 1, dr = 0): the definition of correct."""
    def u_fn(z_, t_, r_):
        return model(z_, t_, t_ - r_, omega, t_min, t_max, y)   # (u, v): v rides along as aux

    u, du_dt, v = torch.func.jvp(u_fn, (z, t, r), (v_c, torch.ones_like(t), torch.zeros_like(r)), has_aux=True)
    return u, du_dt.detach(), v


def jvp_explicit(model, z, v_c, t, r, omega, t_min, t_max, y):
    """The same quantities with the tangent carried by hand through model.forward (no forward-mode AD)."""
    ones = torch.ones_like(t)
    (u, v), du_dt = model(z, t, t - r, omega, t_min, t_max, y, x_dot=v_c, t_dot=ones, h_dot=ones)
    return u, du_dt, v


# how each training step takes the JVP (train.impl; README "Which --impl")
JVP = {"reference": jvp_reference, "eager": jvp_explicit, "fast": jvp_explicit}


def pmf_loss(model, x, y, d: Draws, cfg: ObjectiveConfig, num_classes: int, perceptual=None, impl="eager"):
    """Algorithm 2 as the official code does it. impl: "reference" (torch.func.jvp over the primal
    forward) or "eager" / "fast" (explicit tangents through forward; which kernels run is the
    model's set_impl). Returns (scalar loss, dict of logged terms)."""
    t, r = d.t, d.r
    use_perceptual = perceptual is not None and (cfg.lpips_weight > 0 or cfg.convnext_weight > 0)
    if use_perceptual:                                # official: strict; read after the forward is queued
        keep = start_host_copy(t < cfg.perceptual_max_t)
    z = (1 - _b(t)) * x + _b(t) * d.e
    v_t = (z - x) / _b(t.clamp(min=cfg.t_eps))
    v_g, v_c = cfg_targets(model, z, t, d.omega, d.t_min, d.t_max, y, v_t, num_classes, cfg.cfg_max > 0)

    # label dropout: the network sees the null class; the target falls back to v_t; the tangent
    # v_c keeps the original label (official behaviour)
    y_in = torch.where(d.drop, torch.full_like(y, num_classes), y)
    v_g = torch.where(_b(d.drop), v_t, v_g)

    u, du_dt, v = JVP[impl](model, z, v_c, t, r, d.omega, d.t_min, d.t_max, y_in)
    V = u + _b(t - r) * du_dt.detach()               # compound function, stop-gradient on du/dt

    adp = lambda l: adaptive_weight(l, cfg.norm_p, cfg.norm_eps)
    err_u, err_v = upcast(V - v_g).square(), upcast(v - v_g).square()      # fp32 (fp64 stays fp64)
    loss_u, loss_v = adp(err_u.sum((1, 2, 3))), adp(err_v.sum((1, 2, 3)))
    total = loss_u + loss_v
    logs = {"loss_u": err_u.mean().detach(), "loss_v": err_v.mean().detach()}
    if use_perceptual:
        x_hat = z - _b(t) * u                         # = the u-head's x prediction for t >= t_eps
        lp, cn = perceptual(x_hat, x, d.crop_seed, keep())    # 0 where t >= perceptual_max_t
        if lp is not None:
            total = total + cfg.lpips_weight * adp(lp)
            logs["lpips"] = lp.mean().detach()
        if cn is not None:
            total = total + cfg.convnext_weight * adp(cn)
            logs["convnext"] = cn.mean().detach()
    loss = total.mean()
    logs["loss"] = loss.detach()
    return loss, logs


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(model, noise, y, omega, t_min, t_max, num_steps=1):
    """z_1 = noise (already scaled), then z_r = z_t - (t - r) u(z_t, r, t) on linspace(1, 0, N + 1).
    With one step this is the u-head's x prediction at h = 1. Returns images in [-1, 1]."""
    n = noise.shape[0]
    z = noise
    steps = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)
    full = lambda v: torch.full((n,), float(v), device=noise.device)
    for i in range(num_steps):
        t, r = full(steps[i]), full(steps[i + 1])
        u, _ = model(z, t, t - r, full(omega), full(t_min), full(t_max), y, heads="u")
        z = z - _b(t - r) * u.float()
    return z.clamp(-1, 1)


def to_uint8(images):
    """[-1, 1] NCHW -> uint8 NHWC, as the official sampler: 127.5 x + 128, clipped."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
