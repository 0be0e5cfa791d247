"""Newton-Schulz over all of pMF-B/16's Muon matrices per optimizer step, three ways in one run:
our batched symmetric kernels (one call per shape), torch.optim.Muon's orthogonalisation (one call
per matrix), and the eager reference batched under torch.compile (what Muon uses). bf16, 5 steps.
FLOPs per step on m x n (m <= n), counted as plain GEMMs: 2 m^2 n (X X^T) + 2 m^3 (A^2) + 2 m^2 n (B X).
Rows: the kernel and the compiled reference each against torch.optim.Muon, and the kernel against
the compiled reference: the row that decides whether the kernel, a candidate that training never
runs, replaces the compiled reference in Muon (at >= 1.3x; the last measurement is in
kernels/newton_schulz.py).
"""
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from bench.common import SMOKE, device, record, time_ms
from pmf_fast.kernels.newton_schulz import NS_COEFFICIENTS, newton_schulz, newton_schulz_ref
from pmf_fast.selftest import muon_batches


def ns_flops(m, n, steps=5):
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m ** 3)


def test_pmf_b_step(benchmark):
    shapes = {(24, 40): 3, (40, 24): 2} if SMOKE else {(m, n): c for c, m, n in muon_batches()}
    dtype = torch.float32 if SMOKE else torch.bfloat16
    banks = {s: torch.randn(c, *s, device=device()) for s, c in shapes.items()}
    flops = sum(c * ns_flops(*s) for s, c in shapes.items())

    def ours():
        return [newton_schulz(G, dtype=dtype) for G in banks.values()]

    def torch_muon():
        return [_zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7) for G in banks.values() for g in G]

    compiled = torch.compile(lambda G: newton_schulz_ref(G, dtype=dtype)) if not SMOKE else None

    def ref_compiled():
        return [compiled(G) for G in banks.values()]

    t_ours, t_torch = time_ms(ours), time_ms(torch_muon)
    info = {"matrices": sum(shapes.values()), "shapes": {f"{m}x{n}": c for (m, n), c in shapes.items()}}
    record(benchmark, "newton-schulz pMF-B step", "ours (batched, symmetric)", t_ours, flops,
           ("torch.optim.Muon per matrix", t_torch), **info)
    if compiled is not None:
        ref_compiled()                                          # compile outside the timing
        t_compiled = time_ms(ref_compiled)
        record(benchmark, "newton-schulz pMF-B step", "compiled eager reference (Muon's choice)", t_compiled, flops,
               ("torch.optim.Muon per matrix", t_torch), **info)
        record(benchmark, "newton-schulz pMF-B step", "ours vs compiled eager reference (use ours at >= 1.3x)",
               t_ours, flops, ("newton_schulz_ref under torch.compile", t_compiled), **info)
    benchmark.pedantic(ours, rounds=1 if SMOKE else 5, iterations=1)
