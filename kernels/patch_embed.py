"""Fused patchify + bottleneck projection (JiT's bottleneck patch embedding, as pMF uses it).

    patch_embed(x, w1, b1, w2, b2) -> y [B, T, D]
    patch_embed_jvp(x, x_dot, w1, b1, w2, b2) -> (y, y_dot)     one launch for both images
x: [B, C, H, W] (contiguous or channels-last; any strides); w1: [r, C, p, p] and w2: [D, r, 1, 1],
b1 [r], b2 [D]: exactly the model's Conv2d parameters, so the op is a drop-in for the same state
dict. y = conv1x1(conv_pxp(x, w1, b1, stride p), w2, b2) flattened to tokens (row-major patches).
The map is linear, so y_dot is the same map of x_dot without the biases. y_dot is not
differentiable (stop-gradient in pMF's loss); y is differentiable in the weights and biases
(the pixels are data: no gradient for x). Eager reference: patch_embed_ref (the two convolutions).

patch_embed (the image alone) is a candidate: training runs only patch_embed_jvp, and the model's
forward without a tangent (sampling) runs its nn.Conv2d pair. It is kept until
bench/bench_patch_embed.py::test_patch_embed_image_only decides against that pair.

Kernel: one program per [BLOCK_M tokens] x {image, tangent image}. The A operand is gathered
straight from the image (K index = c * p * p + ph * p + pw, the conv weight's order), so no patch
tensor is materialised; the [BLOCK_M, r] bottleneck stays in registers (fp32) and feeds the second
GEMM, [BLOCK_M, r] x [r, BLOCK_N], written to [B, T, D]. Backward is two cuBLAS GEMM pairs on the
re-gathered patches (only there is the patch matrix formed).
"""

import torch
import torch.nn.functional as F

from ._triton import interpreting, tl, triton, use_kernel


def patch_embed_ref(x, w1, b1, w2, b2):
    """The two convolutions: [B, C, H, W] -> [B, T, D]."""
    p = w1.shape[-1]
    return F.conv2d(F.conv2d(x, w1, b1, stride=p), w2, b2).flatten(2).transpose(1, 2)


if triton is not None:
    from ._triton import dot

    @triton.jit
    def _embed_tile(X, W1, B1, W2, B2, Y, pid_m, M, T, G, P, K, R, Dout, sxb, sxc, sxh, sxw,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    ADD_BIAS: tl.constexpr, IEEE: tl.constexpr):
        """Rows pid_m * BLOCK_M + [0, BLOCK_M) of Y [M = B * T, Dout] from the image X: T tokens
        (patches) per image on a G x G grid of P x P patches, K = C * P * P."""
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)               # token index over B * T
        row_ok = rows < M
        image, token = rows // T, rows % T
        gy, gx = token // G, token % G
        row_base = image.to(tl.int64) * sxb + (gy * P).to(tl.int64) * sxh + (gx * P).to(tl.int64) * sxw
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            c, rem = kk // (P * P), kk % (P * P)
            col_off = c.to(tl.int64) * sxc + (rem // P).to(tl.int64) * sxh + (rem % P).to(tl.int64) * sxw
            a = tl.load(X + row_base[:, None] + col_off[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            w1 = tl.load(W1 + rr[None, :] * K + kk[:, None], mask=(kk < K)[:, None] & r_ok[None, :], other=0.0)
            acc += dot(a, w1, IEEE)
        if ADD_BIAS:
            acc += tl.load(B1 + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        h = acc.to(W2.dtype.element_ty)
        for n0 in range(0, Dout, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            w2 = tl.load(W2 + nn[None, :] * R + rr[:, None], mask=r_ok[:, None] & (nn < Dout)[None, :], other=0.0)
            out = dot(h, w2, IEEE)
            if ADD_BIAS:
                out += tl.load(B2 + nn, mask=nn < Dout, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rows.to(tl.int64)[:, None] * Dout + nn[None, :], out.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & (nn < Dout)[None, :])

    @triton.jit
    def _patch_embed_kernel(X, X_DOT, W1, B1, W2, B2, Y, Y_DOT, M, T, G, P, K, R, Dout, sxb, sxc, sxh, sxw,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        pid_m, which = tl.program_id(0), tl.program_id(1)
        if which == 0:                                                # the image: with biases
            _embed_tile(X, W1, B1, W2, B2, Y, pid_m, M, T, G, P, K, R, Dout, sxb, sxc, sxh, sxw,
                        BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, True, IEEE)
        else:                                                         # its tangent: linear part only
            _embed_tile(X_DOT, W1, B1, W2, B2, Y_DOT, pid_m, M, T, G, P, K, R, Dout, sxb, sxc, sxh, sxw,
                        BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_N, False, IEEE)


def _check(x, w1, b1, w2, b2, x_dot=None):
    if x.ndim != 4 or w1.ndim != 4 or w2.ndim != 4 or w1.shape[-1] != w1.shape[-2] or w2.shape[-2:] != (1, 1):
        raise ValueError("patch_embed expects x [B, C, H, W], w1 [r, C, p, p], w2 [D, r, 1, 1]")
    p = w1.shape[-1]
    if x.shape[1] != w1.shape[1] or w2.shape[1] != w1.shape[0] or x.shape[-1] % p or x.shape[-2] != x.shape[-1]:
        raise ValueError(f"patch_embed: image {tuple(x.shape)} does not fit w1 {tuple(w1.shape)} / "
                         f"w2 {tuple(w2.shape)} "
                         "(square image, size divisible by p, matching channels)")
    if x_dot is not None and (x_dot.shape != x.shape or x_dot.dtype != x.dtype):
        raise ValueError("x_dot must match x in shape and dtype")


def _tiles(r, dtype):
    """Tile sizes, warps and pipeline stages for bottleneck width r. Shared memory per program, as
    Triton compiles it for sm_90 (bench/kernel_resources.py; limit 227 KiB):
      bf16 / fp16, 3 stages: r = 128: 120 KiB; r = 256 (M tile 32, 8 warps: the fp32 bottleneck
        stays in registers): 136 KiB.
      fp32 with the bf16 tiles, 3 stages: r = 128: 192 KiB; r = 256: 304 KiB with [256, 64] w2
        tiles, 240 KiB with [256, 32]: over the limit (an H200 refuses that r = 256 launch, as
        the tool predicts; of all cases only fp32 r = 256 is over).
        fp32 is a test dtype, not a training one (its IEEE products use no tensor cores), so it
        takes 32-token tiles, 8 warps and 2 stages: 88 and 136 KiB (within an A100's 163 KiB),
        no spills (r = 128 spills 2.5 KiB per thread with the bf16 tiles), and r = 128 compiles in
        4 s against 13 s (2 CPU cores)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16)
    big = r > 128
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32 if big else 64, BLOCK_K=64, BLOCK_N=64, num_warps=8 if big else 4)


def _launch(x, x_dot, w1, b1, w2, b2):
    B, C, H, W = x.shape
    r, p, D = w1.shape[0], w1.shape[-1], w2.shape[0]
    G = H // p
    T, M, K = G * G, B * G * G, C * p * p
    if x_dot is not None and x_dot.stride() != x.stride():
        x_dot = x_dot.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) and not x.is_contiguous() else x_dot.contiguous()
        x = x.contiguous() if x_dot.is_contiguous() else x
    w1f, w2f = w1.reshape(r, K).to(x.dtype).contiguous(), w2.reshape(D, r).to(x.dtype).contiguous()
    y = torch.empty(B, T, D, device=x.device, dtype=x.dtype)
    y_dot = torch.empty_like(y) if x_dot is not None else y
    tiles = _tiles(r, x.dtype)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]), 2 if x_dot is not None else 1)
    _patch_embed_kernel[grid](x, x_dot if x_dot is not None else x, w1f, b1.to(x.dtype), w2f, b2.to(x.dtype), y,
                              y_dot, M, T, G, p, K, r, D, *x.stride(), BLOCK_R=max(16, triton.next_power_of_2(r)),
                              IEEE=x.dtype == torch.float32, **tiles)
    return y, y_dot


@torch.library.custom_op("pmf_fast::patch_embed", mutates_args=())
def _patch_embed_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    if use_kernel(x):
        return _launch(x, None, w1, b1, w2, b2)[0]
    return patch_embed_ref(x, w1.to(x.dtype), b1.to(x.dtype), w2.to(x.dtype), b2.to(x.dtype)).contiguous()


@torch.library.custom_op("pmf_fast::patch_embed_jvp", mutates_args=())
def _patch_embed_jvp_op(x: torch.Tensor, x_dot: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                        w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_kernel(x):
        return _launch(x, x_dot, w1, b1, w2, b2)
    y = _patch_embed_op(x, w1, b1, w2, b2)
    y_dot = patch_embed_ref(x_dot, w1.to(x.dtype), None, w2.to(x.dtype), None).contiguous()
    return y, y_dot


def _fake_y(x, w1, w2):
    p = w1.shape[-1]
    return x.new_empty(x.shape[0], (x.shape[-2] // p) * (x.shape[-1] // p), w2.shape[0])


@_patch_embed_op.register_fake
def _(x, w1, b1, w2, b2):
    return _fake_y(x, w1, w2)


@_patch_embed_jvp_op.register_fake
def _(x, x_dot, w1, b1, w2, b2):
    return _fake_y(x, w1, w2), _fake_y(x, w1, w2)


def _setup(ctx, inputs, output):             # both ops: the image first, the four weights last
    x, (w1, b1, w2, b2) = inputs[0], inputs[-4:]
    ctx.save_for_backward(x, w1, b1, w2)
    ctx.b2_dtype = b2.dtype


def _weight_grads(ctx, dy):
    """dW2 = dY^T H1, db2 = sum dY, dH1 = dY W2, dW1 = dH1^T patches, db1 = sum dH1 (cuBLAS)."""
    x, w1, b1, w2 = ctx.saved_tensors
    r, C, p, _ = w1.shape
    D = w2.shape[0]
    B, _, H, W = x.shape
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p * p).to(dy.dtype)
    dy = dy.reshape(-1, D)
    w1f, w2f = w1.reshape(r, -1).to(dy.dtype), w2.reshape(D, r).to(dy.dtype)
    h1 = patches @ w1f.T + b1.to(dy.dtype)                         # recomputed, not saved
    dh1 = dy @ w2f
    dw2 = (dy.T @ h1).reshape(w2.shape).to(w2.dtype)
    dw1 = (dh1.T @ patches).reshape(w1.shape).to(w1.dtype)
    return dw1, dh1.sum(0).to(b1.dtype), dw2, dy.sum(0).to(ctx.b2_dtype)


def _backward(ctx, dy):
    return (None,) + _weight_grads(ctx, dy)


def _backward_jvp(ctx, dy, _dy_dot):          # y_dot is stop-gradient: its cotangent is ignored
    return (None, None) + _weight_grads(ctx, dy)


_patch_embed_op.register_autograd(_backward, setup_context=_setup)
_patch_embed_jvp_op.register_autograd(_backward_jvp, setup_context=_setup)


def patch_embed(x, w1, b1, w2, b2):
    """[B, C, H, W] -> [B, T, D], differentiable in w1, b1, w2, b2. A candidate (module docstring)."""
    _check(x, w1, b1, w2, b2)
    return _patch_embed_op(x, w1, b1, w2, b2)


def patch_embed_jvp(x, x_dot, w1, b1, w2, b2):
    """(y, y_dot) for the image and its tangent image in one launch; y_dot is detached."""
    _check(x, w1, b1, w2, b2, x_dot)
    y, y_dot = _patch_embed_jvp_op(x, x_dot, w1, b1, w2, b2)
    return y, y_dot.detach()
