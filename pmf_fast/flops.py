"""Analytic FLOPs of one pMF training step, per image (matmul FLOPs: 2 per multiply-add; the
elementwise work is left out, as torch.utils.flop_counter does). tests/test_flops.py checks it
against torch.utils.flop_counter.

A step (train.py with the explicit JVP) is:
  targets   the aux v-head without gradient on a doubled batch: trunk + v-head, 2 images
  JVP       trunk + u-head with their tangents, and the v-head on the primal
  backward  2x the forward of everything with gradient, except the first layer of each scalar
            embedder and the patch convolution (their inputs need no gradient: 1x)
"""
from dataclasses import dataclass

from .config import ModelConfig
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
