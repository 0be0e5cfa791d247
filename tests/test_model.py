import math

import pytest
import torch

from pmf_fast import layers as L
from pmf_fast.config import get_config
from pmf_fast.model import PMFDiT, load_official_state_dict, ours_to_official
from tests.helpers import wake_up

DT = torch.float64


def tiny(aux=True, **kw):
    cfg = get_config("pMF-XS/4-test", [f"model.{k}={v}" for k, v in kw.items()]).model
    return wake_up(PMFDiT(cfg, aux_head=aux).to(DT), std=0.5)


def inputs(model, B=3):
    c = model.cfg
    x = torch.randn(B, c.in_channels, c.image_size, c.image_size, dtype=DT)
    t = 0.06 + 0.9 * torch.rand(B, dtype=DT)
    r = t * torch.rand(B, dtype=DT)
    omega = 1 + 6 * torch.rand(B, dtype=DT)
    t_min, t_max = 0.5 * torch.rand(B, dtype=DT), 0.5 + 0.5 * torch.rand(B, dtype=DT)
    y = torch.randint(0, c.num_classes + 1, (B,))
    return x, t, r, omega, t_min, t_max, y


def check_jvp(layer, args, tangents, extra=()):
    ref, ref_dot = torch.func.jvp(lambda *a: layer(*a, *extra), args, tangents)
    if isinstance(layer, L.TransformerBlock):     # the block takes the tangent through its module call
        out, out_dot = layer(*args, *extra, *tangents)
    else:
        out, out_dot = layer.jvp(*[v for pair in zip(args, tangents) for v in pair], *extra)
    assert not out_dot.requires_grad, "the tangent must be computed without autograd"
    assert out.requires_grad
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert torch.allclose(out_dot, ref_dot, atol=1e-10, rtol=1e-10), (out_dot - ref_dot).abs().max()
    assert ref_dot.abs().max() > 1e-3             # a non-trivial tangent


@pytest.mark.parametrize("name", ["linear", "rmsnorm", "swiglu", "attention", "block", "final", "timestep", "patch"])
def test_layer_jvp_matches_torch_func(name):
    D, H, T, P = 32, 2, 16, 4
    x = torch.randn(2, 5 + T, D, dtype=DT)
    dx = torch.randn_like(x)
    rope = tuple(r.to(DT) for r in L.rope_cos_sin(D // H, T))
    if name == "linear":
        check_jvp(L.Linear(D, 24).to(DT), (x,), (dx,))
    elif name == "rmsnorm":
        n = L.RMSNorm(D).to(DT)
        torch.nn.init.normal_(n.weight)
        check_jvp(n, (x,), (dx,))
    elif name == "swiglu":
        check_jvp(L.SwiGLUMlp(D, 40, 1.0).to(DT), (x,), (dx,))
    elif name == "attention":
        check_jvp(L.Attention(D, H, 1.0).to(DT), (x,), (dx,), extra=(rope,))
    elif name == "block":
        b = L.TransformerBlock(D, H, 8 / 3, 1.0).to(DT)
        torch.nn.init.normal_(b.attn_scale)
        torch.nn.init.normal_(b.mlp_scale)
        check_jvp(b, (x,), (dx,), extra=(rope,))
    elif name == "final":
        f = L.FinalLayer(D, P, 3).to(DT)
        torch.nn.init.normal_(f.linear.weight)
        check_jvp(f, (x,), (dx,))
    elif name == "timestep":
        t = torch.rand(4, dtype=DT)
        check_jvp(L.TimestepEmbedder(D).to(DT), (t,), (torch.randn_like(t),))
    elif name == "patch":
        img = torch.randn(2, 3, 16, 16, dtype=DT)
        check_jvp(L.BottleneckPatchEmbedder(16, P, 3, 8, D).to(DT), (img,), (torch.randn_like(img),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_under_autocast_is_its_fp32_result_rounded_once(dtype):
    """Under bf16 autocast the norm (and its tangent) is the fp32 result rounded once to bf16, for
    fp32 and bf16 inputs alike: what attention needs to run its bf16 kernels (layers.RMSNorm)."""
    n = L.RMSNorm(40)
    torch.nn.init.normal_(n.weight)
    x, x_dot = torch.randn(3, 7, 40).to(dtype), torch.randn(3, 7, 40).to(dtype)
    y32, y32_dot = n.jvp(x.float(), x_dot.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dot = n.jvp(x, x_dot)
        y_fwd = n(x)
    assert y.dtype == y_dot.dtype == y_fwd.dtype == torch.bfloat16
    assert torch.equal(y, y32.bfloat16()) and torch.equal(y_fwd, y)
    assert torch.equal(y_dot, y32_dot.bfloat16())
    y.float().square().sum().backward()
    assert n.weight.grad.dtype == torch.float32 and n.weight.grad.abs().max() > 0


def test_model_jvp_matches_torch_func():
    model = tiny()
    x, t, r, omega, t_min, t_max, y = inputs(model)
    t[0] = 0.03                                   # below t_eps: the clamp's derivative is 0 there
    x_dot = torch.randn_like(x)
    ones = torch.ones_like(t)
    u_fn = lambda z, t_, r_: model(z, t_, t_ - r_, omega, t_min, t_max, y)
    (u, v), u_dot = model(x, t, t - r, omega, t_min, t_max, y, x_dot=x_dot, t_dot=ones, h_dot=ones)
    ref_u, ref_dot, ref_v = torch.func.jvp(u_fn, (x, t, r), (x_dot, ones, torch.zeros_like(r)), has_aux=True)
    assert torch.allclose(u, ref_u, atol=1e-12) and torch.allclose(v, ref_v, atol=1e-12)
    assert torch.allclose(u_dot, ref_dot, atol=1e-9, rtol=1e-9)
    assert not u_dot.requires_grad


def test_rope_only_on_image_tokens():
    cos, sin = L.rope_cos_sin(8, 16)
    x = torch.randn(1, 1, 20, 8)
    out = L.apply_rope(x, cos, sin)
    assert torch.equal(out[:, :, :4], x[:, :, :4])                      # prefix untouched
    assert torch.allclose(out[:, :, 4:].norm(dim=-1), x[:, :, 4:].norm(dim=-1), atol=1e-5)  # rotation
    assert torch.allclose(out[:, :, 4], x[:, :, 4])                     # patch (0, 0): angle 0
    assert not torch.allclose(out[:, :, 5], x[:, :, 5])


def official_rope(x, hd, side):
    """The official code rotates consecutive pairs as complex numbers by exp(i * angle), with
    angles row * f for the first head_dim / 4 pairs and col * f for the rest (fp64)."""
    f = 1.0 / 10000 ** (torch.arange(0, hd // 2, 2, dtype=torch.float64) / (hd // 2))
    xc = torch.view_as_complex(x.clone().reshape(*x.shape[:2], side * side, hd // 2, 2))
    for i in range(side):
        for j in range(side):
            ang = torch.cat([i * f, j * f])
            xc[:, :, i * side + j] *= torch.polar(torch.ones_like(ang), ang)
    return torch.view_as_real(xc).flatten(-2)


def test_rope_matches_official_complex_form():
    hd, side = 16, 4
    cos, sin = L.rope_cos_sin(hd, side * side)
    x = torch.randn(1, 1, side * side, hd, dtype=torch.float64)
    assert torch.allclose(L.apply_rope(x, cos, sin), official_rope(x, hd, side), atol=1e-6)


def test_rope_tables_of_a_float64_model_are_exact():
    """A model moved to fp64 rotates by the fp64 angles (tables rounded to fp32 were off by ~6e-8)."""
    model = PMFDiT(get_config("pMF-XS/4-test").model).double()
    T, hd = model.rope_cos.shape[0], 2 * model.rope_cos.shape[1]
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    err = (L.apply_rope(x, *model.rope) - official_rope(x, hd, math.isqrt(T))).abs().max().item()
    assert err < 1e-13, err


def test_zero_init():
    cfg = get_config("pMF-XS/4-test").model
    model = PMFDiT(cfg)
    for name in ("u_final_layer", "v_final_layer"):
        assert torch.count_nonzero(getattr(model, name).linear.weight) == 0
    assert all(torch.count_nonzero(b.attn_scale) == 0 and torch.count_nonzero(b.mlp_scale) == 0
               for b in list(model.shared_blocks) + list(model.u_heads) + list(model.v_heads))
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([0.5, 0.01])
    u, v = model(x, t, t * 0, t * 0 + 2, t * 0, t * 0 + 1, torch.tensor([1, 2]))
    clamped = torch.tensor([0.5, 0.05]).view(-1, 1, 1, 1)
    assert torch.allclose(u, x / clamped) and torch.allclose(v, x / clamped)   # x_hat = 0 at init
    # the block linears follow std = 0.32 / sqrt(fan_in)
    w = PMFDiT(get_config("pMF-B/16").model).shared_blocks[0].mlp.w1.weight
    assert abs(w.std().item() - 0.32 / 768 ** 0.5) < 2e-4


def official_keys(model):
    """The official torch model's state-dict names (Lyy-iiis/pMF, branch torch, models/*.py),
    enumerated from its module structure: a `net.` prefix (pixelMeanFlow), `_flax_linear` inside
    every TorchLinear, `_flax_embedding` inside the label table, and a complex `rope_freqs` buffer."""
    lin = lambda p, bias: [f"{p}._flax_linear.weight"] + ([f"{p}._flax_linear.bias"] if bias else [])
    keys = ["net.x_embedder.proj1.weight", "net.x_embedder.proj1.bias", "net.x_embedder.proj2.weight",
            "net.x_embedder.proj2.bias", "net.y_embedder.embedding_table._flax_embedding.weight",
            "net.time_tokens", "net.class_tokens", "net.omega_tokens", "net.t_min_tokens", "net.t_max_tokens",
            "net.rope_freqs", "net.pos_embed"]
    for e in ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder"):
        keys += lin(f"net.{e}.mlp.0", True) + lin(f"net.{e}.mlp.2", True)
    groups = [("shared_blocks", len(model.shared_blocks)), ("u_heads", len(model.u_heads))]
    if model.aux_head:
        groups.append(("v_heads", len(model.v_heads)))
    for g, n in groups:
        for i in range(n):
            p = f"net.{g}.{i}"
            keys += [f"{p}.norm1.weight", f"{p}.norm2.weight", f"{p}.attn_scale", f"{p}.mlp_scale",
                     f"{p}.attn.q_norm.weight", f"{p}.attn.k_norm.weight"]
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys += lin(f"{p}.attn.{proj}", False)
            for w in ("w1", "w2", "w3"):
                keys += lin(f"{p}.mlp.{w}", False)
    for head in ["u"] + (["v"] if model.aux_head else []):
        keys += [f"net.{head}_final_layer.norm.weight"] + lin(f"net.{head}_final_layer.linear", True)
    return set(keys)


@pytest.mark.parametrize("aux", [True, False])
def test_official_checkpoint_loads(aux):
    src = tiny(aux=True)
    official = ours_to_official(src.state_dict())
    if not aux:                                               # eval checkpoints: no v-head
        official = {k: v for k, v in official.items() if not k.startswith(("net.v_heads", "net.v_final_layer"))}
    official["net.rope_freqs"] = torch.zeros(16, 4, dtype=torch.complex64)
    dst = tiny(aux=aux)
    assert set(official) == official_keys(dst)
    load_official_state_dict(dst, official)
    args = inputs(src)
    x, t, r, omega, t_min, t_max, y = args
    assert torch.equal(src(x, t, t - r, omega, t_min, t_max, y, heads="u")[0],
                       dst(x, t, t - r, omega, t_min, t_max, y, heads="u")[0])


def test_official_checkpoint_mismatch_is_clear():
    official = ours_to_official(tiny().state_dict())
    official.pop("net.pos_embed")
    with pytest.raises(ValueError, match="missing.*pos_embed.*preset"):
        load_official_state_dict(tiny(), official)
