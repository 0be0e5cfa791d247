"""A scaling model, not a measurement: per-GPU compute time of one step from a measured single-GPU
rate and the analytic FLOPs (pmf_fast/flops.py), beside the bytes each GPU sends per step and their
time at a given bus bandwidth, for DDP and FSDP2 on 8 GPUs. Prints the table in docs/parallelism.md.

    python bench/scaling.py [--tflops 82] [--per-gpu-batch 128] [--gpus 8]

--tflops: the achieved rate of the measured step. Default 82: the explicit-eager pMF-B/16 step at
batch 128 on an H200 (789 ms/step, torch 2.11); the fast step is meant to be several times
faster, which makes communication relatively more expensive (rerun with its measured rate).
Bus bandwidths (NCCL's "busbw"): NVLink within an 8-GPU H100/H200 node about 360 GB/s; across
nodes at 400 Gb/s per GPU about 45 GB/s. Ring collectives on N GPUs move, per GPU:
  all-reduce      2 (N-1)/N x bytes          (DDP: fp32 gradients; overlapped with backward)
  all-gather      (N-1)/N x bytes            (FSDP2: fp32 parameters, 3 times a step: the targets
  reduce-scatter  (N-1)/N x bytes             pass, the JVP pass and the backward; gradients once)
plus distributed Muon's all-gather of the bf16 Newton-Schulz results, (N-1)/N x 2 bytes per Muon
weight, and under FSDP2 the gather of its fp32 updates, (N-1)/N x 4 bytes.
"""
import argparse

import torch

from pmf_fast.config import get_config
from pmf_fast.flops import step_flops
from pmf_fast.model import PMFDiT
from pmf_fast.optimizers import split_params

BUSBW_GBPS = {"NVLink": 360.0, "400 Gb/s": 45.0}


def rows(tflops, batch, n):
    f = (n - 1) / n
    for preset in ("pMF-B/16", "pMF-L/16", "pMF-H/16"):
        cfg = get_config(preset)
        with torch.device("meta"):
            model = PMFDiT(cfg.model)
        muon, _ = split_params(model)
        P, P_muon = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in muon)
        compute_ms = batch * step_flops(cfg.model).total / (tflops * 1e12) * 1e3
        ddp = 2 * f * 4 * P + f * 2 * P_muon
        fsdp = 3 * f * 4 * P + f * 4 * P + f * 2 * P_muon + f * 4 * P_muon
        yield preset, P, compute_ms, ddp, fsdp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=82.0)
    ap.add_argument("--per-gpu-batch", type=int, default=128)
    ap.add_argument("--gpus", type=int, default=8)
    a = ap.parse_args()
    ms = lambda b, link: b / (BUSBW_GBPS[link] * 1e9) * 1e3
    print(f"| model (training params) | compute ms/step ({a.per_gpu_batch} img/GPU at {a.tflops:g} TFLOP/s) | "
          f"DDP GB/GPU | DDP ms: NVLink / 400 Gb/s | FSDP2 GB/GPU | FSDP2 ms: NVLink / 400 Gb/s |")
    print("|---|---|---|---|---|---|")
    for preset, P, c, ddp, fsdp in rows(a.tflops, a.per_gpu_batch, a.gpus):
        print(f"| {preset} ({P / 1e6:.0f}M) | {c:,.0f} | {ddp / 1e9:.2f} | {ms(ddp, 'NVLink'):.0f} / "
              f"{ms(ddp, '400 Gb/s'):.0f} | {fsdp / 1e9:.2f} | {ms(fsdp, 'NVLink'):.0f} / {ms(fsdp, '400 Gb/s'):.0f} |")


if __name__ == "__main__":
    main()
