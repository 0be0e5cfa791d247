"""Softmax attention that also returns its forward-mode JVP, with a backward for the primal.

Layout everywhere: q, k, v and their tangents are [B, H, N, D]; non-causal, no mask, scale 1/sqrt(D).
Any N (pMF: N = 276 = 20 conditioning tokens + 256 patches), head dims up to 128 (80 for pMF-H is
padded to 128 with masked loads), fp32 / fp16 / bf16 inputs with fp32 softmax and accumulators.

    attention(q, k, v) -> o                                  differentiable in q, k, v
    attention_jvp(q, k, v, q_dot, k_dot, v_dot) -> (o, o_dot)
        o is differentiable in q, k, v; o_dot is NOT differentiable by design: pMF's loss uses the
        tangent under stop-gradient, so the backward is plain flash-attention backward on o, from the
        saved log-sum-exp, and no tangent state is kept for it.
Eager references (the definition of correct): attention_ref, attention_jvp_ref.

Kernels (flash-attention 2 style, one program per [BLOCK_M query rows] of one (batch, head)):
  _attn_fwd_kernel   online softmax; with HAS_TANGENT it also carries (the blockwise JVP of sCM, arXiv 2410.11081, App. F)
                     r = sum_j p_j s_dot_j and G = sum_j p_j s_dot_j v_j + p_j v_dot_j, rescaled by
                     the same alpha as l and O; epilogue O = acc / l, O_dot = G / l - (r / l) O.
                     Tangent math per query row: s_dot_j = tau (q_dot.k_j + q.k_dot_j),
                     o_dot = sum_j p_j s_dot_j v_j - (sum_j p_j s_dot_j) o + sum_j p_j v_dot_j.
  _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel   two passes (no atomics: deterministic),
                     D_i = rowsum(dO o O), dS = P o (dO V^T - D), dQ = tau dS K, dK = tau dS^T Q, dV = P^T dO.
Registered with torch.library.custom_op + register_fake + register_autograd, so torch.compile
(fullgraph) traces them, on GPU and in Triton's CPU interpreter alike (triton_op + wrap_triton
fails under compile in the interpreter, where the launch runs during fake-tensor tracing).
On CPU without TRITON_INTERPRET=1 the ops fall back to the eager reference.
"""
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the references still work
    triton = None


def upcast(x):
    """fp32 for half types, fp64 stays fp64 (so fp64 tests stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- eager references
def attention_ref(q, k, v):
    """Eager math attention, fp32 scores and softmax. q, k, v: [B, H, N, D] -> o [B, H, N, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, upcast(v)).to(q.dtype)


def attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot):
    """Eager attention and its tangent. The primal keeps autograd; the tangent is computed
    without autograd (pMF's loss takes it under stop-gradient), from the primal's softmax."""
    dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhqk,bhkd->bhqd", p, upcast(v))
    with torch.no_grad():
        p, o32, q, k, v = p.detach(), o.detach(), upcast(q.detach()), upcast(k.detach()), upcast(v.detach())
        s_dot = (torch.einsum("bhqd,bhkd->bhqk", upcast(q_dot), k)
                 + torch.einsum("bhqd,bhkd->bhqk", q, upcast(k_dot))) * scale
        ps = p * s_dot
        o_dot = (torch.einsum("bhqk,bhkd->bhqd", ps, v) - ps.sum(-1, keepdim=True) * o32
                 + torch.einsum("bhqk,bhkd->bhqd", p, upcast(v_dot)))
    return o.to(dtype), o_dot.to(dtype)


# ----------------------------------------------------------------------------- kernels
def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_kernel(t):
    return triton is not None and (t.is_cuda or _interpreting())


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # fp32 inputs: IEEE products (the GPU default would be TF32, ~1e-3 relative error)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, QD, KD, VD, O, OD, LSE, N, D, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_TANGENT: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok, dim_ok = rows < N, dims < D
        q_off = base + rows[:, None] * D + dims[None, :]
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_TANGENT:
            qd = tl.load(QD + q_off, mask=q_mask, other=0.0)
            g_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # sum p s_dot v + p v_dot (one tile for both sums)
            r_i = tl.zeros([BLOCK_M], tl.float32)
        qk_scale = scale * 1.4426950408889634                   # log2(e): scores in the exp2 domain
        for start in range(0, N, BLOCK_N):
            kv_rows = start + cols
            kv_off = base + kv_rows[:, None] * D + dims[None, :]
            kv_mask = (kv_rows < N)[:, None] & dim_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            s = tl.where((kv_rows < N)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            if HAS_TANGENT:
                kd = tl.load(KD + kv_off, mask=kv_mask, other=0.0)
                vd = tl.load(VD + kv_off, mask=kv_mask, other=0.0)
                sd = (_dot(qd, tl.trans(k), IEEE) + _dot(q, tl.trans(kd), IEEE)) * scale
                psd = p * sd                                     # masked columns: p = 0
                r_i = r_i * alpha + tl.sum(psd, 1)
                g_acc = g_acc * alpha[:, None] + _dot(psd.to(v.dtype), v, IEEE) + _dot(p.to(vd.dtype), vd, IEEE)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_ok)
        if HAS_TANGENT:
            od = g_acc / l_i[:, None] - (r_i / l_i)[:, None] * o
            tl.store(OD + q_off, od.to(OD.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, N, D, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              IEEE: tl.constexpr):
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        kv_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        kv_off = base + kv_rows[:, None] * D + dims[None, :]
        kv_mask = (kv_rows < N)[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q_off = base + rows[:, None] * D + dims[None, :]
            q_mask = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(row_ok[:, None] & (kv_rows < N)[None, :], p, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N, D, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok, dim_ok = rows < N, dims < D
        q_off = base + rows[:, None] * D + dims[None, :]
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, N, BLOCK_N):
            kv_rows = start + tl.arange(0, BLOCK_N)
            kv_off = base + kv_rows[:, None] * D + dims[None, :]
            kv_mask = (kv_rows < N)[:, None] & dim_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where((kv_rows < N)[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# Tile sizes: the interpreter runs programs one by one, so small tiles keep CPU tests quick; on GPU
# 64 x 64 tiles with 4 warps (tangent: more registers, so BLOCK_M 64 and BLOCK_N 32). Tuning on an
# H100 is pending (no GPU was available when this was written): see bench/bench_attention.py.
def _blocks(D, tangent):
    if _interpreting():
        return 16, 16
    return (64, 32) if tangent and D > 64 else (64, 64)


def _block_d(D):
    if D > 128:
        raise ValueError(f"head dim {D} > 128 is not supported by the attention kernel")
    return max(16, triton.next_power_of_2(D))


def _check(*ts):
    q = ts[0]
    if q.ndim != 4:
        raise ValueError(f"attention expects [B, H, N, D] tensors, got shape {tuple(q.shape)}")
    for t in ts[1:]:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError("q, k, v (and tangents) must share shape, dtype and device: "
                             f"{tuple(q.shape)} {q.dtype} vs {tuple(t.shape)} {t.dtype}")


def _fwd(q, k, v, qd=None, kd=None, vd=None):
    B, H, N, D = q.shape
    tangent = qd is not None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    od = torch.empty_like(q) if tangent else o
    if tangent:
        qd, kd, vd = qd.contiguous(), kd.contiguous(), vd.contiguous()
    else:
        qd = kd = vd = q
    BM, BN = _blocks(D, tangent)
    grid = (triton.cdiv(N, BM), B * H)
    _attn_fwd_kernel[grid](q, k, v, qd, kd, vd, o, od, lse, N, D, 1.0 / math.sqrt(D),
                           BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), HAS_TANGENT=tangent,
                           IEEE=q.dtype == torch.float32, num_warps=4)
    return o, od, lse


def _bwd(do, q, k, v, o, lse):
    B, H, N, D = q.shape
    do, q, k, v, o = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
    delta = (do.float() * o.float()).sum(-1)                     # D_i = rowsum(dO o O), [B, H, N]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    BM, BN = _blocks(D, False)
    kw = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(D), IEEE=q.dtype == torch.float32, num_warps=4)
    scale = 1.0 / math.sqrt(D)
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, BN), B * H)](q, k, v, do, lse, delta, dk, dv, N, D, scale, **kw)
    _attn_bwd_dq_kernel[(triton.cdiv(N, BM), B * H)](q, k, v, do, lse, delta, dq, N, D, scale, **kw)
    return dq, dk, dv


def _lse_ref(q, k):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.logsumexp(torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k)), -1).float()


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pmf_fast::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel(q):
        o, _, lse = _fwd(q, k, v)
        return o, lse
    return attention_ref(q, k, v).contiguous(), _lse_ref(q, k)


@torch.library.custom_op("pmf_fast::attn_jvp_fwd", mutates_args=())
def _attn_jvp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                     k_dot: torch.Tensor, v_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_kernel(q):
        return _fwd(q, k, v, q_dot, k_dot, v_dot)
    o, od = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
    return o.contiguous(), od.contiguous(), _lse_ref(q, k)


@torch.library.custom_op("pmf_fast::attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_kernel(q):
        return _bwd(do, q, k, v, o, lse)
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        return tuple(g.contiguous() for g in torch.autograd.grad(attention_ref(qq, kk, vv), (qq, kk, vv), do))


# Fakes: every output is a fresh contiguous tensor, as the kernels and the fallbacks return.
@_attn_fwd_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_attn_jvp_fwd_op.register_fake
def _(q, k, v, q_dot, k_dot, v_dot):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[0], output[-1])


def _backward(ctx, do, *unused):            # the cotangent of lse is ignored: lse is an aux output
    q, k, v, o, lse = ctx.saved_tensors
    return _attn_bwd_op(do, q, k, v, o, lse)


def _backward_jvp(ctx, do, *unused):        # o_dot's cotangent is ignored: o_dot is stop-gradient
    return _backward(ctx, do) + (None, None, None)


_attn_fwd_op.register_autograd(_backward, setup_context=_setup)
_attn_jvp_fwd_op.register_autograd(_backward_jvp, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def attention(q, k, v):
    """Softmax attention, [B, H, N, D] -> [B, H, N, D], differentiable in q, k, v."""
    _check(q, k, v)
    return _attn_fwd_op(q, k, v)[0]


def attention_jvp(q, k, v, q_dot, k_dot, v_dot):
    """(o, o_dot): attention and its tangent along (q_dot, k_dot, v_dot) in one pass.
    o is differentiable in q, k, v; o_dot is not (detached): it is stop-gradient in pMF's loss."""
    _check(q, k, v, q_dot, k_dot, v_dot)
    o, od, _ = _attn_jvp_fwd_op(q, k, v, q_dot, k_dot, v_dot)
    return o, od.detach()
