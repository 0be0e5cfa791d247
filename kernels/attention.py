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
O_dot, dK, dV, dQ), so no tile work is spent on padding. Padded to 128, 37% of the tile work at
D = 80 is zeros: the padded forward+tangent ran 148 TFLOP/s at D = 80 against 286 at D = 64
(H200, torch 2.11).

Backward: three variants, all tested against the reference (tests/test_attention.py).
  "torch_flash"     PyTorch's own fused flash-attention backward (FA2, sm80+, fp16/bf16, D % 8 == 0)
                    fed with our O and log-sum-exp: the same math from the same saved state.
  "triton"          two passes, dK/dV then dQ (no atomics: deterministic).
  "triton_onepass"  one pass over K/V blocks that also adds each block's dQ share into an fp32
                    buffer with atomics (5 instead of 7 block matmuls; not bit-deterministic).
                    A candidate: training never runs it (BACKWARD is "torch_flash", "triton"
                    where FA2 does not apply); kept until bench/bench_attention.py::test_backward's
                    "triton_onepass" row against SDPA's backward decides.
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
        p_s_dot = p * s_dot
        o_dot = (torch.einsum("bhqk,bhkd->bhqd", p_s_dot, v) - p_s_dot.sum(-1, keepdim=True) * o32
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
# Names: x_dot is the forward-mode tangent of x (q_dot, s_dot, o_dot), dx a gradient (dq, dS, dO).
# Every kernel sees the head dimension as a "head" part, dims [0, BLOCK_D), and, when BLOCK_TAIL > 0,
# a "tail" part, dims [BLOCK_D, BLOCK_D + BLOCK_TAIL) (see _dim_blocks), so an operand with D columns
# is a pair of tiles (x, x_tail) that the *_pair helpers below load, multiply and store together.
# With BLOCK_TAIL == 0 the tail is a placeholder (the head tile itself) that no helper reads or
# updates: the compiled kernel has no tail work at all.
if triton is not None:
    from ._triton import LN2, LOG2E, dot

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
    def _load_pair(ptr, base, rows, row_ok, D, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr):
        """(head, tail) tiles of rows of a contiguous [N, D] matrix at ptr + base; zeros outside."""
        head = _tile(ptr, base, rows, row_ok, tl.arange(0, BLOCK_D), D)
        if BLOCK_TAIL > 0:
            return head, _tile(ptr, base, rows, row_ok, BLOCK_D + tl.arange(0, BLOCK_TAIL), D)
        else:
            return head, head

    @triton.jit
    def _load_two_pairs(ptr_a, ptr_b, base, rows, row_ok, D, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr):
        """_load_pair of the same rows of two matrices: (a, a_tail, b, b_tail). Both head tiles load
        first: loading one pair after the other compiles (sm_90, D = 80) to up to 6 more registers
        per thread."""
        dims = tl.arange(0, BLOCK_D)
        a = _tile(ptr_a, base, rows, row_ok, dims, D)
        b = _tile(ptr_b, base, rows, row_ok, dims, D)
        if BLOCK_TAIL > 0:
            dims_tail = BLOCK_D + tl.arange(0, BLOCK_TAIL)
            return a, _tile(ptr_a, base, rows, row_ok, dims_tail, D), b, _tile(ptr_b, base, rows, row_ok, dims_tail, D)
        else:
            return a, a, b, b

    @triton.jit
    def _store_pair(ptr, base, rows, row_ok, D, x, x_tail, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr):
        _store(ptr, base, rows, row_ok, tl.arange(0, BLOCK_D), D, x)
        if BLOCK_TAIL > 0:
            _store(ptr, base, rows, row_ok, BLOCK_D + tl.arange(0, BLOCK_TAIL), D, x_tail)

    @triton.jit
    def _zeros_pair(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr):
        """An fp32 accumulator pair for ROWS rows."""
        head = tl.zeros([ROWS, BLOCK_D], tl.float32)
        if BLOCK_TAIL > 0:
            return head, tl.zeros([ROWS, BLOCK_TAIL], tl.float32)
        else:
            return head, head

    @triton.jit
    def _dot_nt(a, a_tail, b, b_tail, BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """a b^T of two pairs, contracting over both parts of D: [rows of a, rows of b]."""
        c = dot(a, tl.trans(b), IEEE)
        if BLOCK_TAIL > 0:
            c += dot(a_tail, tl.trans(b_tail), IEEE)
        return c

    @triton.jit
    def _add_dot_pair(acc, acc_tail, a, b, b_tail, BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """(acc, acc_tail) + a [b | b_tail], a cast to b's dtype (the tensor cores' input type)."""
        acc += dot(a.to(b.dtype), b, IEEE)
        if BLOCK_TAIL > 0:
            acc_tail += dot(a.to(b.dtype), b_tail, IEEE)
        return acc, acc_tail

    @triton.jit
    def _rescale_add_dot_pair(acc, acc_tail, alpha, a, b, b_tail, BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """(acc, acc_tail) with row i times alpha[i] (the online softmax's rescaling), + a [b | b_tail]
        with a cast to b's dtype."""
        acc = acc * alpha[:, None] + dot(a.to(b.dtype), b, IEEE)
        if BLOCK_TAIL > 0:
            acc_tail = acc_tail * alpha[:, None] + dot(a.to(b.dtype), b_tail, IEEE)
        return acc, acc_tail

    @triton.jit
    def _add_dv_dk_pair(dv, dv_tail, dk, dk_tail, p, ds, do, do_tail, q, q_tail,
                        BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """dV += P^T dO and dK += dS^T Q (tau applied at the store) of one query block, both pairs."""
        dv += dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        if BLOCK_TAIL > 0:
            dv_tail += dot(tl.trans(p.to(do.dtype)), do_tail, IEEE)
            dk_tail += dot(tl.trans(ds.to(q.dtype)), q_tail, IEEE)
        return dv, dv_tail, dk, dk_tail

    @triton.jit
    def _add_dq_share(DQ_ACC, base, rows, row_ok, D, ds, k, k_tail, scale,
                      BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """Adds one key block's share tau dS K of dQ into the fp32 [N, D] buffer at DQ_ACC + base
        (atomics: every key block adds into the same rows)."""
        dims, row_off = tl.arange(0, BLOCK_D), base + rows[:, None] * D
        dq = dot(ds.to(k.dtype), k, IEEE) * scale
        tl.atomic_add(DQ_ACC + row_off + dims[None, :], dq, mask=row_ok[:, None] & (dims < D)[None, :])
        if BLOCK_TAIL > 0:
            dims_tail = BLOCK_D + tl.arange(0, BLOCK_TAIL)
            dq_tail = dot(ds.to(k.dtype), k_tail, IEEE) * scale
            tl.atomic_add(DQ_ACC + row_off + dims_tail[None, :], dq_tail,
                          mask=row_ok[:, None] & (dims_tail < D)[None, :])

    @triton.jit
    def _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok):
        """The saved log-sum-exp (in log2 units) and delta = rowsum(dO o O) of a block of query rows."""
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        return lse, delta

    @triton.jit
    def _bwd_p_ds(q, q_tail, k, k_tail, v, v_tail, do, do_tail, lse, delta, ok, qk_scale,
                  BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        """P and dS = P o (dO V^T - delta) of one (query block, key block) pair, zero where not ok.
        Both backward kernels run this body. Both head products come first (not _dot_nt for S,
        then for dP): the order whose sm_90 compile bench/kernel_resources.py reports; the other
        changes the dQ kernel's registers at D = 80 (162 -> 158)."""
        s = dot(q, tl.trans(k), IEEE)
        dp = dot(do, tl.trans(v), IEEE)
        if BLOCK_TAIL > 0:
            s += dot(q_tail, tl.trans(k_tail), IEEE)
            dp += dot(do_tail, tl.trans(v_tail), IEEE)
        p = tl.where(ok, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, Q_DOT, K_DOT, V_DOT, O, O_DOT, LSE, N, D, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_TAIL: tl.constexpr, HAS_TANGENT: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q, q_tail = _load_pair(Q, base, rows, row_ok, D, BLOCK_D, BLOCK_TAIL)
        acc, acc_tail = _zeros_pair(BLOCK_M, BLOCK_D, BLOCK_TAIL)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if HAS_TANGENT:
            q_dot, q_dot_tail = _load_pair(Q_DOT, base, rows, row_ok, D, BLOCK_D, BLOCK_TAIL)
            g, g_tail = _zeros_pair(BLOCK_M, BLOCK_D, BLOCK_TAIL)     # sum p s_dot v + p v_dot (one pair for both)
            r_i = tl.zeros([BLOCK_M], tl.float32)
        qk_scale = scale * LOG2E                                      # scores in the exp2 domain
        for start in range(0, N, BLOCK_N):
            kv_rows = start + tl.arange(0, BLOCK_N)
            kv_ok = kv_rows < N
            k, k_tail, v, v_tail = _load_two_pairs(K, V, base, kv_rows, kv_ok, D, BLOCK_D, BLOCK_TAIL)
            s = _dot_nt(q, q_tail, k, k_tail, BLOCK_TAIL, IEEE)
            s = tl.where(kv_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc, acc_tail = _rescale_add_dot_pair(acc, acc_tail, alpha, p, v, v_tail, BLOCK_TAIL, IEEE)
            if HAS_TANGENT:
                k_dot, k_dot_tail, v_dot, v_dot_tail = _load_two_pairs(K_DOT, V_DOT, base, kv_rows, kv_ok, D, BLOCK_D,
                                                                      BLOCK_TAIL)
                s_dot = dot(q_dot, tl.trans(k), IEEE) + dot(q, tl.trans(k_dot), IEEE)    # summed head, then tail
                if BLOCK_TAIL > 0:
                    s_dot += dot(q_dot_tail, tl.trans(k_tail), IEEE) + dot(q_tail, tl.trans(k_dot_tail), IEEE)
                p_s_dot = p * (s_dot * scale)                         # masked columns: p = 0
                r_i = r_i * alpha + tl.sum(p_s_dot, 1)
                g, g_tail = _rescale_add_dot_pair(g, g_tail, alpha, p_s_dot, v, v_tail, BLOCK_TAIL, IEEE)
                g, g_tail = _add_dot_pair(g, g_tail, p, v_dot, v_dot_tail, BLOCK_TAIL, IEEE)
            m_i = m_new
        o, o_tail = acc / l_i[:, None], acc_tail / l_i[:, None]
        _store_pair(O, base, rows, row_ok, D, o, o_tail, BLOCK_D, BLOCK_TAIL)
        # natural-log LSE of the scaled scores, [B, H, N] contiguous: the layout and base that
        # FA2's backward (aten::_scaled_dot_product_flash_attention_backward) reads
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
        if HAS_TANGENT:
            _store_pair(O_DOT, base, rows, row_ok, D, g / l_i[:, None] - (r_i / l_i)[:, None] * o,
                        g_tail / l_i[:, None] - (r_i / l_i)[:, None] * o_tail, BLOCK_D, BLOCK_TAIL)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, N, D, scale,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_TAIL: tl.constexpr, DQ_ATOMIC: tl.constexpr, IEEE: tl.constexpr):
        """dK, dV of one [BLOCK_N] block of keys, looping over all query blocks. DQ_ATOMIC: also
        add this key block's share tau dS K of dQ into the fp32 buffer DQ_ACC (one-pass backward)."""
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        kv_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = kv_rows < N
        k, k_tail, v, v_tail = _load_two_pairs(K, V, base, kv_rows, kv_ok, D, BLOCK_D, BLOCK_TAIL)
        dk, dk_tail = _zeros_pair(BLOCK_N, BLOCK_D, BLOCK_TAIL)
        dv, dv_tail = _zeros_pair(BLOCK_N, BLOCK_D, BLOCK_TAIL)
        qk_scale = scale * LOG2E
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q, q_tail, do, do_tail = _load_two_pairs(Q, DO, base, rows, row_ok, D, BLOCK_D, BLOCK_TAIL)
            lse, delta = _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok)
            p, ds = _bwd_p_ds(q, q_tail, k, k_tail, v, v_tail, do, do_tail, lse, delta,
                              row_ok[:, None] & kv_ok[None, :], qk_scale, BLOCK_TAIL, IEEE)
            dv, dv_tail, dk, dk_tail = _add_dv_dk_pair(dv, dv_tail, dk, dk_tail, p, ds, do, do_tail, q, q_tail,
                                                       BLOCK_TAIL, IEEE)
            if DQ_ATOMIC:
                _add_dq_share(DQ_ACC, base, rows, row_ok, D, ds, k, k_tail, scale, BLOCK_D, BLOCK_TAIL, IEEE)
        _store_pair(DK, base, kv_rows, kv_ok, D, dk * scale, dk_tail * scale, BLOCK_D, BLOCK_TAIL)
        _store_pair(DV, base, kv_rows, kv_ok, D, dv, dv_tail, BLOCK_D, BLOCK_TAIL)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N, D, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_TAIL: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        base = pid_bh.to(tl.int64) * N * D
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q, q_tail, do, do_tail = _load_two_pairs(Q, DO, base, rows, row_ok, D, BLOCK_D, BLOCK_TAIL)
        dq, dq_tail = _zeros_pair(BLOCK_M, BLOCK_D, BLOCK_TAIL)
        lse, delta = _bwd_rows(LSE, DELTA, pid_bh, N, rows, row_ok)
        qk_scale = scale * LOG2E
        for start in range(0, N, BLOCK_N):
            kv_rows = start + tl.arange(0, BLOCK_N)
            kv_ok = kv_rows < N
            k, k_tail, v, v_tail = _load_two_pairs(K, V, base, kv_rows, kv_ok, D, BLOCK_D, BLOCK_TAIL)
            p, ds = _bwd_p_ds(q, q_tail, k, k_tail, v, v_tail, do, do_tail, lse, delta, kv_ok[None, :], qk_scale,
                              BLOCK_TAIL, IEEE)
            dq, dq_tail = _add_dot_pair(dq, dq_tail, ds, k, k_tail, BLOCK_TAIL, IEEE)
        _store_pair(DQ, base, rows, row_ok, D, dq * scale, dq_tail * scale, BLOCK_D, BLOCK_TAIL)


# Tiles and warps per kernel: dict(BLOCK_M, BLOCK_N, num_warps); BLOCK_M is always the query tile
# and BLOCK_N the key tile. Registers and spills below are Triton's sm_90 compile of each launch
# (bench/kernel_resources.py, triton 3.8; bf16, N = 276); which tiles are fastest is for the GPU
# to say: bench/bench_attention.py::test_forward_tangent_tiles times the spill-free candidates.
#   forward+tangent at D = 64: 64 x 64, 4 warps: 225 registers (128 x 64 with 4 warps spills 1 KiB);
#     at D = 80 the tail tiles need more: 64 x 32 (218 registers; 64 x 64 sits at 254).
#   one-pass backward at D = 80: 4 warps spill 64 B, 8 warps fit (244 registers).
#   fp32 (IEEE products: no tensor cores; only the tests run it): 32 x 32, 8 warps, 2 stages. Only
#     forward+tangent spills there (3.2-6.0 KiB per thread; at 64 x 64 with 4 warps every fp32 launch
#     spills, 0.9-15 KiB), every launch fits an A100's shared memory, and the 15 fp32 launches of
#     bench/kernel_resources.py compile in 27 s against 46 s with 32 x 32, 4 warps, 3 stages (2 CPU
#     cores): compile time the GPU tests pay.
# In the interpreter 32 x 32: its cost is per tile op, and N = 276, D = 80 runs forward + tangent and
# both Triton backwards in 19 s against 80 s with 16 x 16 (2 CPU cores); N = 36 still spans two
# ragged blocks.
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
    """(BLOCK_D, BLOCK_TAIL): the head dimension as a power-of-two head tile (>= 16, tl.dot's minimum)
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


def _fwd(q, k, v, q_dot=None, k_dot=None, v_dot=None, tiles=None):
    """(o, o_dot, lse); o_dot is o when no tangent is given. tiles: _tiles' dict, to override."""
    B, H, N, D = q.shape
    tangent = q_dot is not None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    o_dot = torch.empty_like(q) if tangent else o
    if tangent:
        q_dot, k_dot, v_dot = q_dot.contiguous(), k_dot.contiguous(), v_dot.contiguous()
    else:
        q_dot = k_dot = v_dot = q
    tiles = tiles or _tiles("tangent" if tangent else "forward", D, q.dtype)
    block_d, block_tail = _dim_blocks(D)
    grid = (triton.cdiv(N, tiles["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, q_dot, k_dot, v_dot, o, o_dot, lse, N, D, 1.0 / math.sqrt(D), BLOCK_D=block_d,
                           BLOCK_TAIL=block_tail, HAS_TANGENT=tangent, IEEE=q.dtype == torch.float32, **tiles)
    return o, o_dot, lse


# ----------------------------------------------------------------------------- backward variants
BACKWARDS = ("torch_flash", "triton", "triton_onepass")     # "triton_onepass": a candidate (module docstring)

# The default backward. "torch_flash" is taken where FA2 supports the input (CUDA sm80+, fp16/bf16,
# D % 8 == 0: pMF trains in bf16 at D = 64 and 80), "triton" everywhere else (fp32, the interpreter).
# Why: the two-pass Triton backward measured 0.54x SDPA's backward at N = 276, D = 64 and 0.40x at
# D = 80 (H200, torch 2.11), and FA2's backward is what SDPA's backward runs. torch_flash itself
# is unmeasured: bench/bench_attention.py::test_backward times every variant against SDPA's
# backward in one run, and the fastest there must be the one named here.
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
    block_d, block_tail = _dim_blocks(D)
    kw = dict(BLOCK_D=block_d, BLOCK_TAIL=block_tail, IEEE=q.dtype == torch.float32, **tiles)
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
    o, o_dot = attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
    return o.contiguous(), o_dot.contiguous(), _lse_ref(q, k)


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
    o, o_dot, _ = _attn_jvp_fwd_op(q, k, v, q_dot, k_dot, v_dot)
    return o, o_dot.detach()
