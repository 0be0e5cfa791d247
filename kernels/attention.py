"""Softmax attention that also returns its forward-mode JVP, with a backward for the primal.

Layout everywhere: q, k, v and their tangents are [B, H, N, D]; non-causal, no mask, scale 1/sqrt(D).
Any N (pMF: N = 276 = 20 conditioning tokens + 256 patches), head dims up to 128, fp32 / fp16 / bf16
inputs with fp32 softmax and accumulators.

    attention(q, k, v) -> o                                  differentiable in q, k, v
    attention_jvp(q, k, v, q_dot, k_dot, v_dot) -> (o, o_dot)
        o is differentiable in q, k, v; o_dot is NOT differentiable by design: pMF's loss uses the
        tangent under stop-gradient, so the backward is plain flash-attention backward on o, from the
        saved log-sum-exp, and no tangent state is kept for it.
Eager references (the definition of correct): attention_ref, attention_jvp_ref.

Kernels (flash-attention 2 style, one program per [BLOCK_M query rows] of one (batch, head)):
  _attn_fwd_kernel   online softmax; with HAS_TANGENT it also carries (the blockwise JVP of sCM,
                     arXiv 2410.11081, App. F)
                     r = sum_j p_j s_dot_j and G = sum_j p_j s_dot_j v_j + p_j v_dot_j, rescaled by
                     the same alpha as l and O; epilogue O = acc / l, O_dot = G / l - (r / l) O.
                     Tangent math per query row: s_dot_j = tau (q_dot.k_j + q.k_dot_j),
                     o_dot = sum_j p_j s_dot_j v_j - (sum_j p_j s_dot_j) o + sum_j p_j v_dot_j.
  _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel   D_i = rowsum(dO o O), dS = P o (dO V^T - D),
                     dQ = tau dS K, dK = tau dS^T Q, dV = P^T dO.
Head dims that are not a power of two are split, not padded: D = 80 (pMF-H) runs as a 64-wide
"head" tile plus a 16-wide "tail" tile (two tl.dot accumulations for Q K^T, two accumulators for O,
O_dot, dK, dV, dQ), so no tile work is spent on padding; padding 80 to 128 wasted 37% of it (the
forward+tangent then ran 148 TFLOP/s at D = 80 against 286 at D = 64, H200, torch 2.11).

Backward: three variants, all tested against the reference (tests/test_attention.py).
  "torch_flash"     PyTorch's own fused flash-attention backward (FA2, sm80+, fp16/bf16, D % 8 == 0)
                    fed with our O and log-sum-exp: the same math from the same saved state.
  "triton"          two passes, dK/dV then dQ (no atomics: deterministic).
  "triton_onepass"  one pass over K/V blocks that also adds each block's dQ share into an fp32
                    buffer with atomics (5 instead of 7 block matmuls; not bit-deterministic).
BACKWARD picks the default: see its comment.
Registered with torch.library.custom_op + register_fake + register_autograd, so torch.compile
(fullgraph) traces them, on GPU and in Triton's CPU interpreter alike (triton_op + wrap_triton
fails under compile in the interpreter, where the launch runs during fake-tensor tracing).
On CPU without TRITON_INTERPRET=1 the ops fall back to the eager reference.
"""
import math

import torch

from ._triton import interpreting, tl, triton, use_kernel


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


def attention_bwd_ref(do, q, k, v):
    """(dq, dk, dv) of attention_ref by hand, fp32 math: the backward op's fallback on a CPU
    without TRITON_INTERPRET, where autograd is off inside a custom op's implementation."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q32, k32, v32, do32 = upcast(q), upcast(k), upcast(v), upcast(do)
    p = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q32 * scale, k32), dim=-1)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, do32)
    dp = torch.einsum("bhqd,bhkd->bhqk", do32, v32)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq, dk = torch.einsum("bhqk,bhkd->bhqd", ds, k32), torch.einsum("bhqk,bhqd->bhkd", ds, q32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # fp32 inputs: IEEE products (the GPU default would be TF32, ~1e-3 relative error)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _tile(ptr, base, rows, row_ok, dims, D):
        """[len(rows), len(dims)] tile of a contiguous [N, D] matrix at ptr + base; zeros outside."""
        return tl.load(ptr + base + rows[:, None] * D + dims[None, :],
                       mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)

    @triton.jit
    def _store(ptr, base, rows, row_ok, dims, D, x):
        tl.store(ptr + base + rows[:, None] * D + dims[None, :], x.to(ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dims < D)[None, :])

    @triton.jit
    def _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok):
        """The saved log-sum-exp (in log2 units) and delta = rowsum(dO o O) of a block of query rows."""
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        return lse, delta

    @triton.jit
    def _bwd_p_ds(q, k, v, do, q_t, k_t, v_t, do_t, lse, delta, ok, qk_scale,
                  BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
        """P and dS = P o (dO V^T - delta) of one (query block, key block) pair, zero where not ok;
        the tail tiles add their share when BLOCK_T > 0. Both backward kernels run this body."""
        s = _dot(q, tl.trans(k), IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        if BLOCK_T > 0:
            s += _dot(q_t, tl.trans(k_t), IEEE)
            dp += _dot(do_t, tl.trans(v_t), IEEE)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        return p, p * (dp - delta[:, None])

    # Every kernel sees the head dimension as dims [0, BLOCK_D) ("head" tiles) and, when BLOCK_T > 0,
    # dims [BLOCK_D, BLOCK_D + BLOCK_T) ("tail" tiles, names ending in _t); see _dim_blocks.

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, QD, KD, VD, O, OD, LSE, N, D, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_T: tl.constexpr, HAS_TANGENT: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        dims = tl.arange(0, BLOCK_D)
        q = _tile(Q, base, rows, row_ok, dims, D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_T > 0:
            dims_t = BLOCK_D + tl.arange(0, BLOCK_T)
            q_t = _tile(Q, base, rows, row_ok, dims_t, D)
            acc_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if HAS_TANGENT:
            qd = _tile(QD, base, rows, row_ok, dims, D)
            g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)       # sum p s_dot v + p v_dot (one tile for both sums)
            if BLOCK_T > 0:
                qd_t = _tile(QD, base, rows, row_ok, dims_t, D)
                g_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
            r_i = tl.zeros([BLOCK_M], tl.float32)
        qk_scale = scale * 1.4426950408889634                   # log2(e): scores in the exp2 domain
        for start in range(0, N, BLOCK_N):
            kv_rows = start + tl.arange(0, BLOCK_N)
            kv_ok = kv_rows < N
            k = _tile(K, base, kv_rows, kv_ok, dims, D)
            v = _tile(V, base, kv_rows, kv_ok, dims, D)
            s = _dot(q, tl.trans(k), IEEE)
            if BLOCK_T > 0:
                k_t = _tile(K, base, kv_rows, kv_ok, dims_t, D)
                v_t = _tile(V, base, kv_rows, kv_ok, dims_t, D)
                s += _dot(q_t, tl.trans(k_t), IEEE)
            s = tl.where(kv_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            if BLOCK_T > 0:
                acc_t = acc_t * alpha[:, None] + _dot(p.to(v.dtype), v_t, IEEE)
            if HAS_TANGENT:
                kd = _tile(KD, base, kv_rows, kv_ok, dims, D)
                vd = _tile(VD, base, kv_rows, kv_ok, dims, D)
                sd = _dot(qd, tl.trans(k), IEEE) + _dot(q, tl.trans(kd), IEEE)
                if BLOCK_T > 0:
                    kd_t = _tile(KD, base, kv_rows, kv_ok, dims_t, D)
                    vd_t = _tile(VD, base, kv_rows, kv_ok, dims_t, D)
                    sd += _dot(qd_t, tl.trans(k_t), IEEE) + _dot(q_t, tl.trans(kd_t), IEEE)
                psd = p * (sd * scale)                             # masked columns: p = 0
                r_i = r_i * alpha + tl.sum(psd, 1)
                g = g * alpha[:, None] + _dot(psd.to(v.dtype), v, IEEE) + _dot(p.to(vd.dtype), vd, IEEE)
                if BLOCK_T > 0:
                    g_t = g_t * alpha[:, None] + _dot(psd.to(v.dtype), v_t, IEEE) + _dot(p.to(vd.dtype), vd_t, IEEE)
            m_i = m_new
        o = acc / l_i[:, None]
        _store(O, base, rows, row_ok, dims, D, o)
        if BLOCK_T > 0:
            o_t = acc_t / l_i[:, None]
            _store(O, base, rows, row_ok, dims_t, D, o_t)
        # natural-log LSE of the scaled scores, [B, H, N] contiguous: the layout and base that
        # FA2's backward (aten::_scaled_dot_product_flash_attention_backward) reads
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)
        if HAS_TANGENT:
            _store(OD, base, rows, row_ok, dims, D, g / l_i[:, None] - (r_i / l_i)[:, None] * o)
            if BLOCK_T > 0:
                _store(OD, base, rows, row_ok, dims_t, D, g_t / l_i[:, None] - (r_i / l_i)[:, None] * o_t)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, N, D, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_T: tl.constexpr, DQ_ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        """dK, dV of one [BLOCK_N] block of keys, looping over all query blocks. DQ_ATOMIC: also
        add this key block's share tau dS K of dQ into the fp32 buffer DQ_ACC (one-pass backward)."""
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        kv_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = kv_rows < N
        dims = tl.arange(0, BLOCK_D)
        k = _tile(K, base, kv_rows, kv_ok, dims, D)
        v = _tile(V, base, kv_rows, kv_ok, dims, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if BLOCK_T > 0:
            dims_t = BLOCK_D + tl.arange(0, BLOCK_T)
            k_t = _tile(K, base, kv_rows, kv_ok, dims_t, D)
            v_t = _tile(V, base, kv_rows, kv_ok, dims_t, D)
            dk_t = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
            dv_t = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
        else:                                              # placeholders: _bwd_p_ds ignores them
            k_t, v_t = k, v
        qk_scale = scale * 1.4426950408889634
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q = _tile(Q, base, rows, row_ok, dims, D)
            do = _tile(DO, base, rows, row_ok, dims, D)
            if BLOCK_T > 0:
                q_t = _tile(Q, base, rows, row_ok, dims_t, D)
                do_t = _tile(DO, base, rows, row_ok, dims_t, D)
            else:
                q_t, do_t = q, do
            lse, delta = _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok)
            p, ds = _bwd_p_ds(q, k, v, do, q_t, k_t, v_t, do_t, lse, delta, row_ok[:, None] & kv_ok[None, :],
                              qk_scale, BLOCK_T, IEEE)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
            if BLOCK_T > 0:
                dv_t += _dot(tl.trans(p.to(do.dtype)), do_t, IEEE)
                dk_t += _dot(tl.trans(ds.to(q.dtype)), q_t, IEEE)
            if DQ_ATOMIC:
                acc_off = base + rows[:, None] * D
                dq = _dot(ds.to(k.dtype), k, IEEE) * scale
                tl.atomic_add(DQ_ACC + acc_off + dims[None, :], dq, mask=row_ok[:, None] & (dims < D)[None, :])
                if BLOCK_T > 0:
                    dq_t = _dot(ds.to(k.dtype), k_t, IEEE) * scale
                    tl.atomic_add(DQ_ACC + acc_off + dims_t[None, :], dq_t,
                                  mask=row_ok[:, None] & (dims_t < D)[None, :])
        _store(DK, base, kv_rows, kv_ok, dims, D, dk * scale)
        _store(DV, base, kv_rows, kv_ok, dims, D, dv)
        if BLOCK_T > 0:
            _store(DK, base, kv_rows, kv_ok, dims_t, D, dk_t * scale)
            _store(DV, base, kv_rows, kv_ok, dims_t, D, dv_t)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N, D, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        dims = tl.arange(0, BLOCK_D)
        q = _tile(Q, base, rows, row_ok, dims, D)
        do = _tile(DO, base, rows, row_ok, dims, D)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BLOCK_T > 0:
            dims_t = BLOCK_D + tl.arange(0, BLOCK_T)
            q_t = _tile(Q, base, rows, row_ok, dims_t, D)
            do_t = _tile(DO, base, rows, row_ok, dims_t, D)
            dq_t = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        else:                                              # placeholders: _bwd_p_ds ignores them
            q_t, do_t = q, do
        lse, delta = _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok)
        qk_scale = scale * 1.4426950408889634
        for start in range(0, N, BLOCK_N):
            kv_rows = start + tl.arange(0, BLOCK_N)
            kv_ok = kv_rows < N
            k = _tile(K, base, kv_rows, kv_ok, dims, D)
            v = _tile(V, base, kv_rows, kv_ok, dims, D)
            if BLOCK_T > 0:
                k_t = _tile(K, base, kv_rows, kv_ok, dims_t, D)
                v_t = _tile(V, base, kv_rows, kv_ok, dims_t, D)
            else:
                k_t, v_t = k, v
            p, ds = _bwd_p_ds(q, k, v, do, q_t, k_t, v_t, do_t, lse, delta, kv_ok[None, :], qk_scale, BLOCK_T, IEEE)
            dq += _dot(ds.to(k.dtype), k, IEEE)
            if BLOCK_T > 0:
                dq_t += _dot(ds.to(k.dtype), k_t, IEEE)
        _store(DQ, base, rows, row_ok, dims, D, dq * scale)
        if BLOCK_T > 0:
            _store(DQ, base, rows, row_ok, dims_t, D, dq_t * scale)


# Tiles and warps per kernel: dict(BLOCK_M, BLOCK_N, num_warps); BLOCK_M is always the query tile
# and BLOCK_N the key tile. Registers and spills below are Triton's sm_90 compile of each launch
# (bench/kernel_resources.py, triton 3.8; bf16, N = 276); which tiles are fastest is for the GPU
# to say: bench/bench_attention.py::test_forward_tangent_tiles times the spill-free candidates.
#   forward+tangent at D = 64: 64 x 64, 4 warps: 225 registers (128 x 64 with 4 warps spills 1 KiB);
#     at D = 80 the tail tiles need more: 64 x 32 (218 registers; 64 x 64 sits at 254).
#   one-pass backward at D = 80: 4 warps spill 64 B, 8 warps fit (244 registers).
#   fp32 (IEEE products: no tensor cores; only the tests run it): 32 x 32, 8 warps, 2 stages. At
#     64 x 64 with 4 warps every fp32 launch spilled, 0.9-15 KiB per thread; now only forward+tangent
#     does (3.2-6.0 KiB), every launch fits an A100's shared memory too, and the 15 fp32 launches of
#     bench/kernel_resources.py compile in 27 s instead of 46 s (32 x 32 with 4 warps, 3 stages) on
#     this project's 2-core CPU: compile time the GPU tests pay.
# In the interpreter 32 x 32 (its cost is per tile op: N = 276, D = 80 runs forward + tangent and
# both Triton backwards in 19 s instead of 80 s with 16 x 16, on this project's 2-core CPU; N = 36
# still spans two ragged blocks).
def _tiles(kind, D, dtype):
    """kind: "forward", "tangent" (forward+tangent), "backward" (both two-pass kernels) or "onepass"."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    if kind == "tangent" and D > 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if kind == "onepass" and D > 64 else 4)


def _dim_blocks(D):
    """(BLOCK_D, BLOCK_T): the head dimension as a power-of-two head tile (>= 16, tl.dot's minimum)
    plus, when D is not a power of two, a power-of-two tail tile (0: none). 64 -> (64, 0),
    80 -> (64, 16), 96 -> (64, 32), 48 -> (32, 16), 8 -> (16, 0) masked."""
    if D > 128:
        raise ValueError(f"head dim {D} > 128 is not supported by the attention kernel")
    head = max(16, 1 << (D.bit_length() - 1))
    rest = D - head
    return head, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _check(*ts):
    q = ts[0]
    if q.ndim != 4:
        raise ValueError(f"attention expects [B, H, N, D] tensors, got shape {tuple(q.shape)}")
    for t in ts[1:]:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError("q, k, v (and tangents) must share shape, dtype and device: "
                             f"{tuple(q.shape)} {q.dtype} vs {tuple(t.shape)} {t.dtype}")


def _fwd(q, k, v, qd=None, kd=None, vd=None, tiles=None):
    """(o, o_dot, lse); o_dot is o when no tangent is given. tiles: _tiles' dict, to override."""
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
    tiles = tiles or _tiles("tangent" if tangent else "forward", D, q.dtype)
    BD, BT = _dim_blocks(D)
    grid = (triton.cdiv(N, tiles["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, qd, kd, vd, o, od, lse, N, D, 1.0 / math.sqrt(D), BLOCK_D=BD, BLOCK_T=BT,
                           HAS_TANGENT=tangent, IEEE=q.dtype == torch.float32, **tiles)
    return o, od, lse


# ----------------------------------------------------------------------------- backward variants
BACKWARDS = ("torch_flash", "triton", "triton_onepass")

# The default backward. "torch_flash" is taken where FA2 supports the input (CUDA sm80+, fp16/bf16,
# D % 8 == 0: pMF trains in bf16 at D = 64 and 80), "triton" everywhere else (fp32, the interpreter).
# Why: the two-pass Triton backward measured 0.54x SDPA's backward at N = 276, D = 64 and 0.40x at
# D = 80 (H200, torch 2.11), and FA2's backward is what SDPA's backward runs. This choice has
# not been measured on a GPU yet: bench/bench_attention.py (test_backward) times every variant
# against SDPA's backward in one run, and the fastest there must be the one named here.
BACKWARD = "torch_flash"


def _torch_flash_supports(q):
    """FA2's backward applies: CUDA sm80+ with flash built in, fp16/bf16, D % 8 == 0, D <= 256."""
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def default_backward(q):
    """The backward variant that attention's autograd runs for inputs like q."""
    return "torch_flash" if BACKWARD == "torch_flash" and _torch_flash_supports(q) else "triton"


def _bwd_torch_flash(do, q, k, v, o, lse):
    """PyTorch's fused flash-attention backward on our saved O and LSE. Exact: FA2 recomputes
    P = exp(tau q.k - LSE) with LSE the natural-log log-sum-exp of the scaled scores, [B, H, N]
    contiguous fp32, unpadded (its dense path rounds only its own scratch to 128 rows), which is
    what _attn_fwd_kernel stores; it computes D_i = rowsum(dO o O) itself."""
    N, D = q.shape[-2:]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.is_cuda:
        # Schema (torch 2.11 and 2.14.1): (grad_out, query, key, value, out, logsumexp, cum_seq_q,
        # cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale).
        # [B, H, N, D] in and out; it transposes to FA2's [B, N, H, D] and copies dO and O there
        # unless their last two dims are swapped-contiguous (dO from o.transpose(1, 2).flatten(2)
        # is; our O is not: one copy of O). cum_seq None: the dense path; the philox tensors are read
        # only when dropout_p > 0. Under torch.use_deterministic_algorithms FA2 runs its
        # deterministic dQ accumulation.
        unused = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, None, None, N, N, 0.0, False, unused, unused, scale=1.0 / math.sqrt(D))
    else:
        # The CPU flash backward reads the same natural-log [B, H, N] LSE: on CPU (tests) this
        # variant checks our O and LSE against torch's fused backward without a GPU.
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, False, scale=1.0 / math.sqrt(D))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _bwd_triton(do, q, k, v, o, lse, onepass=False):
    B, H, N, D = q.shape
    do, q, k, v, o = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
    delta = (do.float() * o.float()).sum(-1)                     # D_i = rowsum(dO o O), [B, H, N]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if onepass else dk
    tiles = _tiles("onepass" if onepass else "backward", D, q.dtype)
    BD, BT = _dim_blocks(D)
    kw = dict(BLOCK_D=BD, BLOCK_T=BT, IEEE=q.dtype == torch.float32, **tiles)
    scale = 1.0 / math.sqrt(D)
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, tiles["BLOCK_N"]), B * H)](q, k, v, do, lse, delta, dk, dv, dq_acc,
                                                                     N, D, scale, DQ_ATOMIC=onepass, **kw)
    if onepass:
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty_like(q)
    _attn_bwd_dq_kernel[(triton.cdiv(N, tiles["BLOCK_M"]), B * H)](q, k, v, do, lse, delta, dq, N, D, scale, **kw)
    return dq, dk, dv


def attention_bwd(do, q, k, v, o, lse, variant=None):
    """(dq, dk, dv) from the saved forward state (o, lse), by one of BACKWARDS (None: the default
    for these inputs). Tests and bench/bench_attention.py call each variant through here."""
    variant = variant or default_backward(q)
    if variant == "torch_flash":
        if q.is_cuda and not _torch_flash_supports(q):
            raise ValueError(f"torch_flash backward does not support {q.dtype}, D = {q.shape[-1]} on this device")
        return _bwd_torch_flash(do, q, k, v, o, lse)
    if variant in ("triton", "triton_onepass"):
        return _bwd_triton(do, q, k, v, o, lse, onepass=variant == "triton_onepass")
    raise ValueError(f"unknown attention backward {variant!r}: expected one of {BACKWARDS}")


def _lse_ref(q, k):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.logsumexp(torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k)), -1).float()


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("pmf_fast::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        o, _, lse = _fwd(q, k, v)
        return o, lse
    return attention_ref(q, k, v).contiguous(), _lse_ref(q, k)


@torch.library.custom_op("pmf_fast::attn_jvp_fwd", mutates_args=())
def _attn_jvp_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                     k_dot: torch.Tensor, v_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        return _fwd(q, k, v, q_dot, k_dot, v_dot)
    o, od = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
    return o.contiguous(), od.contiguous(), _lse_ref(q, k)


@torch.library.custom_op("pmf_fast::attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        return attention_bwd(do, q, k, v, o, lse)
    return tuple(g.contiguous() for g in attention_bwd_ref(do, q, k, v))


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
