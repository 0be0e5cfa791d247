"""Analytic FLOPs of one pMF training step, per image (matmul FLOPs: 2 per multiply-add; the
elementwise work is left out, as torch.utils.flop_counter does). tests/test_flops.py checks it
against torch.utils.flop_counter.

A step (train.py with the explicit JVP) is:
  targets   the aux v-head without gradient on a doubled batch: trunk + v-head, 2 images
  JVP       trunk + u-head with their tangents, and the v-head on the primal
  backward  2x the forward of everything with gradient, except the first layer of each scalar
            embedder and the patch convolution (their inputs need no gradient: 1x)

The perceptual losses (perceptual_flops) add, per kept sample (t < perceptual_max_t: pmf_loss runs
them on those only), the paired crop's resampling matmuls and the frozen networks at 224 px:
forward on both images, and a backward for the input gradient only on the prediction (1x its
forward: no weight gradients). At pMF-B/16 with both terms that is ~185 GFLOP per kept sample,
~126 per image at the expected kept fraction 0.68 (kept_fraction), beside the model's ~504
(bench_train_step reports MFU with and without them).
"""
import math
from dataclasses import dataclass

from .config import ModelConfig, ObjectiveConfig
from .layers import mlp_hidden


@dataclass
class StepFlops:
    targets: float
    jvp: float
    backward: float

    @property
    def total(self):
        return self.targets + self.jvp + self.backward


def step_flops(m: ModelConfig) -> StepFlops:
    D, p, C, r = m.hidden_size, m.patch_size, m.in_channels, m.bottleneck
    T = (m.image_size // p) ** 2
    N = T + m.num_class_tokens + m.num_cfg_tokens + 2 * m.num_interval_tokens + m.num_time_tokens
    F = mlp_hidden(D, m.mlp_ratio)
    shared, head = m.depth - m.aux_head_depth, m.aux_head_depth

    block_linear = 2 * N * (4 * D * D + 3 * D * F)       # q, k, v, o and the three SwiGLU matrices
    block_attn = 4 * N * N * D                            # Q K^T and P V
    block = block_linear + block_attn
    block_tangent = block_linear + 2 * block_attn         # Q_dot K^T, Q K_dot^T, (P o S_dot) V, P V_dot
    patch1, patch2 = 2 * T * C * p * p * r, 2 * T * r * D
    final = 2 * T * D * p * p * C
    emb1, emb2 = 2 * 256 * D, 2 * D * D                   # one scalar embedder: 256-d sinusoid -> D -> D
    embed = patch1 + patch2 + 4 * (emb1 + emb2)

    path_v = embed + (shared + head) * block + final      # one forward of the trunk and one head
    targets = 2 * path_v
    jvp = (embed + (shared + 2 * head) * block + 2 * final                 # primal: trunk, u- and v-head
           + patch1 + patch2 + emb1 + emb2 + (shared + head) * block_tangent + final)   # tangent: u path
    with_grad_forward = embed + (shared + 2 * head) * block + 2 * final
    backward = 2 * with_grad_forward - patch1 - 4 * emb1
    return StepFlops(targets, jvp, backward)


# ----------------------------------------------------------------------------- perceptual networks
def conv_flops(out_hw, c_in, c_out, k, groups=1):
    """A k x k convolution producing out_hw x out_hw pixels (or a linear layer per pixel: k=1)."""
    return 2 * out_hw * out_hw * c_out * (c_in // groups) * k * k


VGG16_TRUNK = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # LPIPS: up to relu5_3


def lpips_vgg_flops(size=224):
    """(trunk, heads): the VGG16 trunk's forward on one image (13 3x3 convolutions, a 2x2 max-pool
    between stages) and LPIPS's 1x1 heads on the squared feature difference of a pair."""
    trunk, heads, c, hw = 0, 0, 3, size
    for stage, widths in enumerate(VGG16_TRUNK):
        hw = hw if stage == 0 else hw // 2
        for w in widths:
            trunk, c = trunk + conv_flops(hw, c, w, 3), w
        heads += conv_flops(hw, c, 1, 1)
    return trunk, heads


CONVNEXT_V2 = {"convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),    # timm's depths, widths
               "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320))}


def convnext_v2_flops(size=224, name="convnextv2_base"):
    """The ConvNeXt-V2 forward on one image: 4x4 stem, per block a 7x7 depthwise convolution and the
    4x MLP, 2x2 downsampling between stages; pooled features, no classifier."""
    depths, dims = CONVNEXT_V2[name]
    hw = size // 4
    total = conv_flops(hw, 3, dims[0], 4)
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        if stage:
            hw //= 2
            total += conv_flops(hw, dims[stage - 1], dim, 2)
        total += depth * (conv_flops(hw, dim, dim, 7, groups=dim) + 2 * conv_flops(hw, dim, 4 * dim, 1))
    return total


def crop_flops(image_size, channels, size=224):
    """pmf_fast.perceptual.crop_resize on one image: x @ Rx^T, then Ry @ (that)."""
    return 2 * channels * size * image_size * (image_size + size)


def kept_fraction(o: ObjectiveConfig):
    """The expected fraction of samples with t < perceptual_max_t under pmf_fast.meanflow.sample_t_r:
    with F the logit-normal CDF at the threshold x and p = tr_uniform (t and r redrawn from U[0, 1]
    together), an r = t sample (data_proportion of the batch) keeps with (1 - p) F + p x, an r < t
    sample, t = max of two draws, with (1 - p) F^2 + p x^2. At the official sampler (logit-normal
    (0.8, 0.8), threshold 0.8, half the batch at r = t): 0.5 x 0.768 + 0.5 x 0.590 = 0.679."""
    x = o.perceptual_max_t
    if x <= 0 or x >= 1:
        return float(x >= 1)
    F = 0.5 * (1 + math.erf((math.log(x / (1 - x)) - o.P_mean) / (o.P_std * math.sqrt(2))))
    p, d = o.tr_uniform, o.data_proportion
    return d * ((1 - p) * F + p * x) + (1 - d) * ((1 - p) * F * F + p * x * x)


def perceptual_flops(image_size, channels, lpips=True, convnext="convnextv2_base", size=224, kept=1.0):
    """FLOPs per sample of the perceptual losses as pmf_loss computes them, on the kept fraction
    `kept` of the samples (kept_fraction; the padding rows up to a bucket, on average 1/16 of the
    batch, are not counted): the crop and each network forward on both images, backward for the
    prediction's input gradient (frozen networks: 1x forward). convnext: a CONVNEXT_V2 name, or None
    (term off)."""
    per_image = crop_flops(image_size, channels, size)
    pair_extra = 0
    if lpips:
        trunk, heads = lpips_vgg_flops(size)
        per_image += trunk
        pair_extra += 2 * heads                        # on the difference: forward and input gradient
    if convnext:
        per_image += convnext_v2_flops(size, convnext)
    return kept * (3 * per_image + pair_extra)


def whole_step_flops(m: ModelConfig, lpips=False, convnext=None, o: ObjectiveConfig = None):
    """FLOPs per image of one training step with the perceptual terms that are on, at the kept
    fraction of the time sampler `o` (default: the official one, ObjectiveConfig())."""
    if not (lpips or convnext):
        return step_flops(m).total
    kept = kept_fraction(o or ObjectiveConfig())
    return step_flops(m).total + perceptual_flops(m.image_size, m.in_channels, lpips, convnext, kept=kept)
