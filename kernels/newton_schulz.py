"""Newton-Schulz orthogonalisation for Muon, batched over same-shape matrices.

Eager reference: newton_schulz_ref(G [.., m, n]) -> X, the quintic iteration
    X <- X / (||X||_F + eps);  5 x { A = X X^T;  B = b A + c A^2;  X <- a X + B X }
on the wide orientation (transposed when m > n), with (a, b, c) = (3.4445, -4.7750, 2.0315)
(KellerJordan/Muon). The output is roughly U S' V^T with S' in [0.5, 1.5], not exactly U V^T.
"""
import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_ref(G, steps=5, coefficients=NS_COEFFICIENTS, eps=1e-7, dtype=None):
    """G: [..., m, n]; every matrix in the batch is normalised and iterated on its own.
    dtype: compute dtype (bf16 on GPU as in Muon; default: G's dtype). Returns G's dtype."""
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
