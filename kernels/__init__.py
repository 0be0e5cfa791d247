"""Triton kernels for pmf-fast, one op per file, each beside its eager reference (`*_ref`).

attention.py      attention forward, its forward-mode tangent, and backward
newton_schulz.py  batched Newton-Schulz orthogonalisation for Muon
patch_embed.py    fused patchify + bottleneck projections
"""
