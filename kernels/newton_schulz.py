"""Newton-Schulz orthogonalisation for Muon, batched over same-shape matrices.

    newton_schulz(G [B, m, n] or [m, n], steps=5, coefficients=(a, b, c), eps=1e-7, dtype=None)
Per matrix, on the wide orientation (transposed when m > n), after Frobenius normalisation:
    5 x { A = X X^T;  B = b A + c A^2;  X <- a X + B X }
with (a, b, c) = (3.4445, -4.7750, 2.0315) (KellerJordan/Muon): the output is roughly U S' V^T
with S' in [0.5, 1.5], not exactly U V^T. Eager reference: newton_schulz_ref.

Kernels (the idea of modded-nanogpt's and microsoft/dion's Triton NS): A = X X^T and
B = b A + c A A^T are symmetric, so both compute only the tiles on and below the diagonal and store
each tile and its mirror image (about a third fewer FLOPs at m = n); the batch of same-shape
matrices is a grid axis, so all of pMF-B's 768 x 768 matrices are one launch instead of dozens of
small GEMMs. X <- a X + B X is a batched cuBLAS GEMM (torch.baddbmm). On GPU the operands are
bf16 with fp32 accumulation (dtype=None means bf16 on CUDA); on CPU without TRITON_INTERPRET=1
the reference runs instead.

The kernel is a candidate: training never runs it (Muon runs newton_schulz_ref under
torch.compile, pmf_fast/optimizers.py). It is kept until a GPU run of
bench/bench_newton_schulz.py::test_pmf_b_step decides: its row "ours vs compiled eager reference"
must reach 1.3x for Muon to switch. Measured over the 178 Muon matrices of pMF-B/16 (H200, torch
2.11, triton 3.6): kernel 8.73 ms, compiled reference 8.73 ms (1.00x), torch.optim.Muon's
per-matrix loop 5.5x slower than either. The gain over Muon's loop comes from batching same-shape
matrices, which the compiled reference does as well; computing only the lower-triangle tiles gave
nothing measurable on top.
"""

import torch

from ._triton import interpreting, tl, triton, use_kernel

# (a, b, c) of the quintic iteration (KellerJordan/Muon). The one home of these numbers: Muon, the
# benchmarks and the tests import them from here.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_ref(G, steps=5, coefficients=NS_COEFFICIENTS, eps=1e-7, dtype=None):
    """G: [..., m, n]; every matrix in the batch is normalised and iterated on its own.
    dtype: compute dtype (default: G's dtype). Returns G's dtype."""
    a, b, c = coefficients
    X = G.to(dtype or G.dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    X = X.reshape(-1, *X.shape[-2:])                       # [B, m, n], m <= n
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)        # b A + c A^2, one rounding in low precision
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)      # a X + B X
    X = X.reshape(G.mT.shape if transposed else G.shape)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


if triton is not None:
    from ._triton import dot

    @triton.jit
    def _sym_gram_kernel(X, A, OUT, M, K, alpha, beta,
                         BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ADD_A: tl.constexpr, IEEE: tl.constexpr):
        """OUT[b] = alpha * X[b] X[b]^T (+ beta * A[b] when ADD_A), lower-triangle tiles + mirror.
        X: [B, M, K] contiguous; A, OUT: [B, M, M] contiguous."""
        pid, pid_b = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(M, BLOCK)                          # tiles per side
        pid_m, pid_n = pid // tiles, pid % tiles
        if pid_n > pid_m:                                  # upper triangle: the mirror store covers it
            return
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_n * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        xb = X + pid_b.to(tl.int64) * M * K
        acc = tl.zeros([BLOCK, BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            x_rows = tl.load(xb + rows[:, None] * K + kk[None, :], mask=(rows < M)[:, None] & (kk < K)[None, :],
                             other=0.0)
            x_cols = tl.load(xb + cols[:, None] * K + kk[None, :], mask=(cols < M)[:, None] & (kk < K)[None, :],
                             other=0.0)
            acc += dot(x_rows, tl.trans(x_cols), IEEE)
        acc = acc * alpha
        ob = pid_b.to(tl.int64) * M * M
        mask = (rows < M)[:, None] & (cols < M)[None, :]
        if ADD_A:
            acc += beta * tl.load(A + ob + rows[:, None] * M + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = acc.to(OUT.dtype.element_ty)
        tl.store(OUT + ob + rows[:, None] * M + cols[None, :], out, mask=mask)
        if pid_m != pid_n:
            tl.store(OUT + ob + cols[:, None] * M + rows[None, :], tl.trans(out), mask=tl.trans(mask))


def _sym_gram(X, A=None, alpha=1.0, beta=0.0):
    """alpha X X^T (+ beta A), X [B, M, K] -> [B, M, M], symmetric tiles computed once."""
    Bn, M, K = X.shape
    out = torch.empty(Bn, M, M, device=X.device, dtype=X.dtype)
    # 64 x 64 tiles are untimed: bench/bench_newton_schulz.py::test_pmf_b_step times them with the kernel
    block, block_k = (16, 16) if interpreting() else (64, 64)
    tiles = triton.cdiv(M, block)
    _sym_gram_kernel[(tiles * tiles, Bn)](X, A if A is not None else X, out, M, K, alpha, beta,
                                          BLOCK=block, BLOCK_K=block_k, ADD_A=A is not None,
                                          IEEE=X.dtype == torch.float32, num_warps=4)
    return out


def newton_schulz(G, steps=5, coefficients=NS_COEFFICIENTS, eps=1e-7, dtype=None):
    """Batched Newton-Schulz with the symmetric Triton kernels. G: [B, m, n] or [m, n]."""
    if not use_kernel(G):
        return newton_schulz_ref(G, steps, coefficients, eps, dtype)
    a, b, c = coefficients
    dtype = dtype or (torch.bfloat16 if G.is_cuda else G.dtype)
    X = G.to(dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).reshape(-1, *X.shape[-2:]).contiguous()
    for _ in range(steps):
        A = _sym_gram(X)                                   # X X^T
        B = _sym_gram(A, A, alpha=c, beta=b)               # c A A^T + b A  (A symmetric: A A^T = A^2)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)      # a X + B X
    X = X.reshape(G.mT.shape if transposed else G.shape)
    return (X.mT if transposed else X).to(G.dtype)
