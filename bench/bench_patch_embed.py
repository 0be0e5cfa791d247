"""Patch embedding of the noisy image and its tangent: our fused kernel (one launch for both)
against the model's two nn.Conv2d (cuDNN, channels-last) run on each. bf16.
FLOPs: 2 * 2 images * B * T * (C p^2 r + r D). Target (H100): >= 2x the two-convolution path.
test_patch_embed_image_only times the kernel on the image alone against the nn.Conv2d pair: the row
that decides whether the primal-only patch_embed (a candidate: training never runs it) stays.
"""
import pytest
import torch
import torch.nn.functional as F

from bench.common import SMOKE, device, record, time_ms
from pmf_fast.kernels.patch_embed import patch_embed, patch_embed_jvp

# (B, image, patch, r, D): pMF-B/16 and H/16 at 128 / 256 images, pMF-B/32
CASES = [(2, 12, 4, 16, 40)] if SMOKE else [(128, 256, 16, 128, 768), (256, 256, 16, 128, 768),
                                          (128, 256, 16, 256, 1280), (64, 512, 32, 128, 768)]
DTYPE = torch.float32 if SMOKE else torch.bfloat16


def inputs(case):
    """The image, its tangent and the four weights for (B, image, patch, r, D)."""
    B, S, p, r, D = case
    dev = device()
    fmt = torch.channels_last if not SMOKE else torch.contiguous_format
    x = torch.randn(B, 3, S, S, device=dev, dtype=DTYPE).contiguous(memory_format=fmt)
    w1, b1 = torch.randn(r, 3, p, p, device=dev, dtype=DTYPE) * 0.02, torch.zeros(r, device=dev, dtype=DTYPE)
    w2, b2 = torch.randn(D, r, 1, 1, device=dev, dtype=DTYPE) * 0.02, torch.zeros(D, device=dev, dtype=DTYPE)
    return x, torch.randn_like(x), w1, b1, w2, b2


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_p{}_r{}_D{}".format(*c))
def test_patch_embed_with_tangent(benchmark, case):
    B, S, p, r, D = case
    x, x_dot, w1, b1, w2, b2 = inputs(case)

    def convs():
        y = F.conv2d(F.conv2d(x, w1, b1, stride=p), w2, b2).flatten(2).transpose(1, 2)
        y_dot = F.conv2d(F.conv2d(x_dot, w1, None, stride=p), w2, None).flatten(2).transpose(1, 2)
        return y, y_dot

    T = (S // p) ** 2
    flops = 2 * 2 * B * T * (3 * p * p * r + r * D)
    if not SMOKE:
        torch.backends.cudnn.benchmark = True
    ours, base = time_ms(lambda: patch_embed_jvp(x, x_dot, w1, b1, w2, b2)), time_ms(convs)
    record(benchmark, "patch embed (image + tangent)", f"B{B} {S}px p{p} r{r} D{D}", ours, flops,
           ("2 x nn.Conv2d pair (cuDNN, channels-last)", base))
    benchmark.pedantic(lambda: patch_embed_jvp(x, x_dot, w1, b1, w2, b2), rounds=1 if SMOKE else 5, iterations=1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_p{}_r{}_D{}".format(*c))
def test_patch_embed_image_only(benchmark, case):
    B, S, p, r, D = case
    x, _, w1, b1, w2, b2 = inputs(case)
    flops = 2 * B * (S // p) ** 2 * (3 * p * p * r + r * D)
    if not SMOKE:
        torch.backends.cudnn.benchmark = True
    convs = lambda: F.conv2d(F.conv2d(x, w1, b1, stride=p), w2, b2).flatten(2).transpose(1, 2)
    ours, base = time_ms(lambda: patch_embed(x, w1, b1, w2, b2)), time_ms(convs)
    record(benchmark, "patch embed (image only)", f"B{B} {S}px p{p} r{r} D{D}", ours, flops,
           ("nn.Conv2d pair (cuDNN, channels-last)", base))
    benchmark.pedantic(lambda: patch_embed(x, w1, b1, w2, b2), rounds=1 if SMOKE else 5, iterations=1)
