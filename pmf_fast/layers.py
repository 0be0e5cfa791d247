"""Layers of the pMF DiT. Each layer the tangent passes through has `forward(x)` and
`jvp(x, x_dot) -> (y, y_dot)`; LabelEmbedder has only forward (class labels carry no tangent).

forward: the primal with autograd; the reference path runs torch.func.jvp over it.
jvp:     the same primal with autograd, plus the tangent computed by hand from the primal's
         intermediates without autograd (it enters the loss under stop-gradient, so keeping its
         activations for a backward would be waste).
The transformer block (what DDP, FSDP2, activation checkpointing and torch.compile wrap) takes the
tangent through its module call instead: `block(x, rope, x_dot)` returns (y, y_dot), so every hook
on `__call__` sees every use of every parameter.
impl:    "eager" (plain PyTorch) or "fast" (model.set_impl("fast")): routes the tangent path and the
         primal-only attention to the Triton kernels (pmf_fast.kernels): Linear runs [x; x_dot] through one
         GEMM and saves only x, attention returns (o, o_dot) in one pass, the patch embedding takes
         both images in one launch. Same parameters and state dict either way. ("reference" runs
         these modules as "eager": it differs only in how the loss takes the JVP, meanflow.py.)
Parameter names and shapes follow the official PyTorch model (Lyy-iiis/pMF, branch torch,
models/torch_models.py, models/embedder.py) without its `_flax_linear` / `_flax_embedding` levels.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels.attention import attention, attention_jvp, attention_jvp_ref, attention_ref, upcast
from .kernels.patch_embed import patch_embed_jvp


def compute_dtype(x):
    """The dtype autocast would run a matmul on x in: x's own outside autocast and for fp64 (which
    autocast leaves alone)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) and x.dtype != torch.float64 else x.dtype


class LinearJVP(torch.autograd.Function):
    """(y, y_dot) = (x W^T + b, x_dot W^T) as one GEMM over the stacked rows [x; x_dot]; saves only
    x (in the compute dtype) for backward; y_dot is not differentiable (stop-gradient in pMF)."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias):
        dt = compute_dtype(x)
        x, w = x.to(dt), weight.to(dt)
        both = F.linear(torch.cat([x, x_dot.to(dt)]), w)
        y, y_dot = both[: x.shape[0]], both[x.shape[0]:]
        if bias is not None:
            y = y + bias.to(dt)
        ctx.save_for_backward(x, w)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(y_dot)
        return y, y_dot

    @staticmethod
    def backward(ctx, dy, _dy_dot):
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = dy @ w
        dw = (dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(ctx.dtypes[0])
        db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.dtypes[1]) if ctx.dtypes[1] is not None else None
        return dx, None, dw, db


def silu_grad(a):
    """d/da silu(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


class Linear(nn.Linear):
    """nn.Linear with the official initialisations: N(0, (c / sqrt(fan_in))^2) or zeros; zero bias."""
    impl = "eager"

    def __init__(self, in_features, out_features, bias=True, init_constant=1.0, zero_init=False):
        super().__init__(in_features, out_features, bias=bias)
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=init_constant / math.sqrt(in_features))
        if bias:
            nn.init.zeros_(self.bias)

    def jvp(self, x, x_dot):
        if self.impl == "fast":
            return LinearJVP.apply(x, x_dot, self.weight, self.bias)
        with torch.no_grad():
            y_dot = F.linear(x_dot, self.weight)          # linear: no bias on the tangent
        return self(x), y_dot


class RMSNorm(nn.Module):
    """RMSNorm, eps 1e-6. Statistics in fp32; under autocast the result is the fp32 product with the
    weight rounded once to the autocast dtype, outside autocast x's dtype times the weight.

    Why the autocast dtype: the q/k norms feed attention (through RoPE, which keeps the dtype), and
    autocast casts matmuls, not custom kernels or elementwise products. x's dtype times the fp32
    weight would promote the bf16 projections to fp32, and every attention call of a bf16 step would
    run the fp32 kernels: IEEE dots without tensor cores, the forward+tangent kernel spilling
    3.2-4.6 KiB per thread, and the two-pass Triton backward instead of PyTorch's flash backward,
    which takes fp16/bf16 only (kernels/attention.py BACKWARD). The official JAX model sets no dtype
    (fp32 parameters and activations, softmax in fp32) and runs on TPUs, whose default precision
    runs fp32 matmuls as bf16 passes: autocast with fp32 parameters, statistics and residual stream,
    matmuls and attention in bf16, is the same split."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _scaled(self, y32, like):
        """y32 (fp32, fp64 for fp64 inputs) times the weight, in the dtype the next op computes in."""
        if torch.is_autocast_enabled(like.device.type):
            return (y32 * self.weight).to(compute_dtype(like))
        return y32.to(like.dtype) * self.weight          # outside autocast: an fp32 model stays fp32

    def forward(self, x):
        x32 = upcast(x)
        return self._scaled(x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps), x)

    def jvp(self, x, x_dot):
        with torch.no_grad():
            x32, d32 = upcast(x.detach()), upcast(x_dot)
            r = torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
            y_dot = self._scaled(d32 * r - x32 * r.pow(3) * (x32 * d32).mean(-1, keepdim=True), x_dot)
        return self(x), y_dot


def rope_cos_sin(head_dim: int, num_patches: int, theta: float = 10000.0):
    """2-D RoPE tables [T, head_dim / 2] as in the official `precompute_rope_freqs`: the first
    half of the rotated pairs turn with the patch row, the second half with the column."""
    side = math.isqrt(num_patches)
    assert side * side == num_patches, "2-D RoPE needs a square patch grid"
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # [head_dim / 4]
    pos = torch.arange(side, dtype=torch.float64)
    rows = (pos[:, None, None] * freqs).expand(side, side, -1)   # angle depends on the row index
    cols = (pos[None, :, None] * freqs).expand(side, side, -1)   # ... and on the column index
    ang = torch.cat([rows, cols], dim=-1).reshape(num_patches, half)
    # kept in fp64 and cast where used (apply_rope): a model moved to fp64 then rotates by the exact
    # angles, where tables rounded to fp32 first were off by up to 6e-8
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) of the last T tokens of x [B, H, N, D]; the prefix
    (conditioning) tokens are left as they are. Linear in x, so the tangent uses the same op."""
    T = cos.shape[0]
    x32 = upcast(x)
    cos, sin = cos.to(x32.dtype), sin.to(x32.dtype)          # no-op when the tables already have it
    pre, img = x32[:, :, :-T], x32[:, :, -T:]
    a, b = img[..., 0::2], img[..., 1::2]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([pre, rot], dim=2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: bias-free q/k/v/o, per-head q/k RMSNorm, 2-D RoPE on image
    tokens, softmax in fp32 (official RoPEAttention)."""
    impl = "eager"

    def __init__(self, dim, num_heads, init_constant):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        kw = dict(bias=False, init_constant=init_constant)
        self.q_proj, self.k_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
        self.v_proj, self.out_proj = Linear(dim, dim, **kw), Linear(dim, dim, **kw)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def _split(self, y):                                   # [B, N, D] -> [B, N, H, hd]
        return y.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x, rope):
        q = apply_rope(self.q_norm(self._split(self.q_proj(x))).transpose(1, 2), *rope)   # [B, H, N, hd]
        k = apply_rope(self.k_norm(self._split(self.k_proj(x))).transpose(1, 2), *rope)
        v = self._split(self.v_proj(x)).transpose(1, 2)
        o = attention(q, k, v.to(q.dtype)) if self.impl == "fast" else attention_ref(q, k, v)
        return self.out_proj(o.transpose(1, 2).flatten(2))

    def _qk_jvp(self, proj, norm, x, x_dot, rope):
        y, y_dot = proj.jvp(x, x_dot)
        y, y_dot = norm.jvp(self._split(y), self._split(y_dot))
        with torch.no_grad():
            y_dot = apply_rope(y_dot.transpose(1, 2), *rope)
        return apply_rope(y.transpose(1, 2), *rope), y_dot

    def jvp(self, x, x_dot, rope):
        q, q_dot = self._qk_jvp(self.q_proj, self.q_norm, x, x_dot, rope)
        k, k_dot = self._qk_jvp(self.k_proj, self.k_norm, x, x_dot, rope)
        v, v_dot = self.v_proj.jvp(x, x_dot)
        v, v_dot = self._split(v).transpose(1, 2), self._split(v_dot).transpose(1, 2)
        if self.impl == "fast":                            # one kernel pass; tangents in the primal dtype
            v = v.to(q.dtype)
            o, o_dot = attention_jvp(q, k, v, q_dot.to(q.dtype), k_dot.to(q.dtype), v_dot.to(q.dtype))
        else:
            o, o_dot = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
        return self.out_proj.jvp(o.transpose(1, 2).flatten(2), o_dot.transpose(1, 2).flatten(2))


class SwiGLUMlp(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, dim, hidden, init_constant):
        super().__init__()
        kw = dict(bias=False, init_constant=init_constant)
        self.w1, self.w3, self.w2 = Linear(dim, hidden, **kw), Linear(dim, hidden, **kw), Linear(hidden, dim, **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def jvp(self, x, x_dot):
        a, a_dot = self.w1.jvp(x, x_dot)
        b, b_dot = self.w3.jvp(x, x_dot)
        s = F.silu(a)
        with torch.no_grad():
            h_dot = silu_grad(a.detach()) * a_dot * b.detach() + s.detach() * b_dot
        return self.w2.jvp(s * b, h_dot)


def mlp_hidden(dim, ratio):
    hidden = int(dim * ratio)
    return (hidden + 7) // 8 * 8 if dim > 1024 else hidden  # the H models round up to 8 (hsdp branch)


class TransformerBlock(nn.Module):
    """Pre-norm block with zero-initialised per-channel residual gates. Under autocast the residual
    stream (and its tangent) is fp32, a bf16 branch times an fp32 gate; the norms hand bf16 on."""

    def __init__(self, dim, num_heads, mlp_ratio, init_constant):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, init_constant)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLUMlp(dim, mlp_hidden(dim, mlp_ratio), init_constant)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope, x_dot=None):
        """x [B, N, D] -> y; with the tangent x_dot, (y, y_dot)."""
        if x_dot is not None:
            return self._jvp(x, x_dot, rope)
        x = x + self.attn(self.norm1(x), rope) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale

    def _jvp(self, x, x_dot, rope):
        a, a_dot = self.attn.jvp(*self.norm1.jvp(x, x_dot), rope)
        x = x + a * self.attn_scale
        x_dot = x_dot + a_dot * self.attn_scale.detach()
        m, m_dot = self.mlp.jvp(*self.norm2.jvp(x, x_dot))
        # The tangent is stop-gradient; detached so that a compiled block says so on every torch: torch
        # 2.11's compile drops the fast impl's non-differentiable marks, and the next block would
        # recompile for a tangent that requires grad (4 graphs instead of 3, tests/test_compile.py).
        return x + m * self.mlp_scale, (x_dot + m_dot * self.mlp_scale.detach()).detach()


class FinalLayer(nn.Module):
    """RMSNorm, then a zero-initialised Linear(D -> p * p * C) with bias."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = Linear(dim, patch_size * patch_size * out_channels, zero_init=True)

    def forward(self, x):
        return self.linear(self.norm(x))

    def jvp(self, x, x_dot):
        return self.linear.jvp(*self.norm.jvp(x, x_dot))


class TimestepEmbedder(nn.Module):
    """DiT scalar embedder: 256-d sinusoid of the raw value (max period 1e4), Linear, SiLU, Linear."""

    def __init__(self, dim, freq_dim=256, init_constant=1.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim, init_constant=init_constant), nn.SiLU(),
                                 Linear(dim, dim, init_constant=init_constant))

    def _freqs(self, t):
        half = self.freq_dim // 2
        return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=upcast(t).dtype, device=t.device) / half)

    def sinusoid(self, t):
        args = upcast(t)[:, None] * self._freqs(t)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))

    def jvp(self, t, t_dot):
        with torch.no_grad():
            f = self._freqs(t)[None]
            args = upcast(t)[:, None] * f
            e_dot = (torch.cat([-torch.sin(args), torch.cos(args)], dim=-1) * torch.cat([f, f], -1)
                     * upcast(t_dot)[:, None])
        dtype = self.mlp[0].weight.dtype
        a, a_dot = self.mlp[0].jvp(self.sinusoid(t).to(dtype), e_dot.to(dtype))
        with torch.no_grad():
            s_dot = silu_grad(a.detach()) * a_dot
        return self.mlp[2].jvp(F.silu(a), s_dot)


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; the last row is the null (unconditional) class."""

    def __init__(self, num_classes, dim, init_constant=1.0):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=init_constant / math.sqrt(dim))

    def forward(self, y):
        return self.embedding_table(y)


class BottleneckPatchEmbedder(nn.Module):
    """p x p conv (C -> r, bias) then 1 x 1 conv (r -> D, bias), xavier-uniform on the flattened
    weights (JiT's bottleneck; official embedder.py). [B, C, H, W] -> [B, T, D]."""
    impl = "eager"

    def __init__(self, image_size, patch_size, in_channels, bottleneck, dim):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size)
        self.proj2 = nn.Conv2d(bottleneck, dim, 1)
        for conv, fan_in, fan_out in ((self.proj1, patch_size * patch_size * in_channels, bottleneck),
                                      (self.proj2, bottleneck, dim)):
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(conv.weight, -limit, limit)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)

    def jvp(self, x, x_dot):
        if self.impl == "fast":   # image and tangent image in one fused launch
            dt = compute_dtype(x)
            return patch_embed_jvp(x.to(dt), x_dot.to(dt), self.proj1.weight, self.proj1.bias,
                                   self.proj2.weight, self.proj2.bias)
        with torch.no_grad():   # linear map: tangent without the biases
            y_dot = F.conv2d(F.conv2d(x_dot, self.proj1.weight, stride=self.patch_size), self.proj2.weight)
        return self(x), y_dot.flatten(2).transpose(1, 2)
