"""The pMF DiT (arXiv 2601.22158 section 6): in-context conditioning, a shared trunk, a u-head and an
auxiliary v-head. Mirrors the official `pmfDiT` (Lyy-iiis/pMF, branch torch, models/pmfDiT.py):
same parameter names and shapes minus the `_flax_linear` / `_flax_embedding` wrapper levels, so
official checkpoints load through `load_official_state_dict`.

forward(x, t, h, omega, t_min, t_max, y) -> (u, v): the network sees h = t - r, never t itself;
t only enters through u = (z - x_hat) / max(t, t_eps). Given the tangents x_dot, t_dot, h_dot,
forward also returns the tangent of u along them with every other input held fixed (the MeanFlow
total derivative along (v, 0, 1)).
"""
import re

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import BottleneckPatchEmbedder, FinalLayer, LabelEmbedder, TimestepEmbedder, TransformerBlock, rope_cos_sin


class PMFDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, aux_head: bool = True, t_eps: float = 0.05):
        super().__init__()
        self.cfg, self.t_eps, self.aux_head = cfg, t_eps, aux_head
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.x_embedder = BottleneckPatchEmbedder(cfg.image_size, p, C, cfg.bottleneck, D)
        self.h_embedder = TimestepEmbedder(D)
        self.omega_embedder = TimestepEmbedder(D)
        self.cfg_t_start_embedder = TimestepEmbedder(D)
        self.cfg_t_end_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)

        def tokens(n):                                     # learnable tokens, std 1/sqrt(D)
            return nn.Parameter(torch.randn(1, n, D) / D ** 0.5)
        self.time_tokens = tokens(cfg.num_time_tokens)
        self.class_tokens = tokens(cfg.num_class_tokens)
        self.omega_tokens = tokens(cfg.num_cfg_tokens)
        self.t_min_tokens = tokens(cfg.num_interval_tokens)
        self.t_max_tokens = tokens(cfg.num_interval_tokens)
        self.prefix_tokens = (cfg.num_class_tokens + cfg.num_cfg_tokens + 2 * cfg.num_interval_tokens
                              + cfg.num_time_tokens)
        T = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix_tokens + T, D) * 0.02)
        cos, sin = rope_cos_sin(D // cfg.num_heads, T)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        def blocks(n):
            return nn.ModuleList(TransformerBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.weight_init_constant)
                                 for _ in range(n))
        self.shared_blocks = blocks(cfg.depth - cfg.aux_head_depth)
        self.u_heads = blocks(cfg.aux_head_depth)
        self.u_final_layer = FinalLayer(D, p, C)
        if aux_head:                                       # training only; absent from eval checkpoints
            self.v_heads = blocks(cfg.aux_head_depth)
            self.v_final_layer = FinalLayer(D, p, C)

    # ------------------------------------------------------------------ helpers
    IMPLS = ("fast", "eager", "reference")

    def set_impl(self, impl: str):
        """"fast": the tangent path and the primal-only attention on the Triton kernels (kernels/);
        "eager" and "reference": plain PyTorch (they differ only in how the loss takes the JVP,
        meanflow.py). Parameters and state dict are the same either way."""
        if impl not in self.IMPLS:
            raise ValueError(f"impl {impl!r}: use one of {', '.join(self.IMPLS)}")
        for m in self.modules():
            if hasattr(type(m), "impl"):
                m.impl = "fast" if impl == "fast" else "eager"
        return self

    def blocks(self):
        """Every transformer block: what DDP/FSDP2, checkpointing and compilation wrap one by one."""
        heads = [self.u_heads] + ([self.v_heads] if self.aux_head else [])
        return [b for group in [self.shared_blocks, *heads] for b in group]

    @property
    def rope(self):
        return self.rope_cos, self.rope_sin

    def unpatchify(self, x):                               # [B, T, p*p*C] -> [B, C, H, W]
        p, C = self.cfg.patch_size, self.cfg.in_channels
        g = self.cfg.image_size // p
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def _prefix(self, h_embed, omega, t_min, t_max, y):
        """The conditioning tokens, in the official order: class, omega, t_min, t_max, time."""
        return [self.class_tokens + self.y_embedder(y)[:, None],
                self.omega_tokens + self.omega_embedder(1 - 1 / omega)[:, None],
                self.t_min_tokens + self.cfg_t_start_embedder(t_min)[:, None],
                self.t_max_tokens + self.cfg_t_end_embedder(t_max)[:, None],
                self.time_tokens + h_embed[:, None]]

    def _blocks(self, blocks, seq, seq_dot):
        """Run blocks over seq, and over its tangent too when one is given."""
        for block in blocks:
            if seq_dot is None:
                seq = block(seq, self.rope)
            else:
                seq, seq_dot = block(seq, self.rope, seq_dot)
        return seq, seq_dot

    def _head(self, name, seq, seq_dot, x, x_dot, t, t_dot):
        """One head ("u" or "v") from the trunk's tokens to a velocity (and its tangent)."""
        seq, seq_dot = self._blocks(getattr(self, f"{name}_heads"), seq, seq_dot)
        final, P = getattr(self, f"{name}_final_layer"), self.prefix_tokens
        if seq_dot is None:
            return self._to_velocity(x, self.unpatchify(final(seq[:, P:])), t), None
        x_hat, x_hat_dot = final.jvp(seq[:, P:], seq_dot[:, P:])
        x_hat, x_hat_dot = self.unpatchify(x_hat), self.unpatchify(x_hat_dot)
        u = self._to_velocity(x, x_hat, t)
        with torch.no_grad():
            tc = t.clamp(min=self.t_eps).view(-1, 1, 1, 1)
            tc_dot = (t_dot * (t > self.t_eps)).view(-1, 1, 1, 1)     # the clamp's derivative is 0 below t_eps
            u_dot = (x_dot - x_hat_dot) / tc - u.detach() * tc_dot / tc
        return u, u_dot

    def _to_velocity(self, x, x_hat, t):
        return (x - x_hat) / t.clamp(min=self.t_eps).view(-1, 1, 1, 1)

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, h, omega, t_min, t_max, y, heads="uv", x_dot=None, t_dot=None, h_dot=None):
        """x: [B, C, H, W] noisy image z_t; t, h, omega, t_min, t_max: [B] floats; y: [B] labels.
        Returns (u, v), the average velocity of the u-head and the instantaneous velocity of the
        aux v-head; a head not named in `heads` gives None.

        With the tangents (x_dot, t_dot, h_dot) it returns ((u, v), u_dot): u_dot is the tangent of u
        along them with every other input held fixed (the MeanFlow total derivative along (v, 0, 1)),
        computed without autograd; u is always computed then, and the v-head stays primal (the loss
        needs no tangent of it). The tangent rides through every block's module call, so hooks on
        __call__ see it."""
        if "v" in heads and not self.aux_head:
            raise ValueError("this model was built without the aux v-head (eval checkpoint)")
        tangent = x_dot is not None
        if tangent:
            h_embed, h_embed_dot = self.h_embedder.jvp(h, h_dot)
            x_embed, x_embed_dot = self.x_embedder.jvp(x, x_dot)
        else:
            h_embed, x_embed = self.h_embedder(h), self.x_embedder(x)
        seq = torch.cat(self._prefix(h_embed, omega, t_min, t_max, y) + [x_embed], 1) + self.pos_embed
        seq_dot = None
        if tangent:
            with torch.no_grad():                              # only the time tokens and the patches move
                n0 = self.prefix_tokens - self.cfg.num_time_tokens
                time_dot = h_embed_dot[:, None].expand(-1, self.cfg.num_time_tokens, -1).to(x_embed_dot.dtype)
                seq_dot = torch.cat([x_embed_dot.new_zeros(x.shape[0], n0, x_embed_dot.shape[-1]), time_dot,
                                     x_embed_dot], 1)
        seq, seq_dot = self._blocks(self.shared_blocks, seq, seq_dot)
        u = u_dot = v = None
        if "u" in heads or tangent:
            u, u_dot = self._head("u", seq, seq_dot, x, x_dot, t, t_dot)
        if "v" in heads:
            v, _ = self._head("v", seq, None, x, None, t, None)
        return ((u, v), u_dot) if tangent else (u, v)


def num_params(model: nn.Module, eval_only: bool = True) -> int:
    """Parameters as the paper counts them: without the aux v-head when eval_only."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not (eval_only and n.startswith(("v_heads.", "v_final_layer."))))


# ---------------------------------------------------------------------- official checkpoints
_WRAPPERS = re.compile(r"\._flax_(linear|embedding)(?=\.)")


def official_to_ours(key: str) -> str | None:
    """Map one official state-dict key to ours; None for entries we do not keep (rope table)."""
    key = key[len("net."):] if key.startswith("net.") else key
    if key == "rope_freqs":
        return None                                       # recomputed (non-persistent buffer here)
    return _WRAPPERS.sub("", key)


def load_official_state_dict(model: PMFDiT, state: dict, source: str = "checkpoint") -> None:
    """Load an official pMF checkpoint (e.g. pMF-B-16.pt) strictly, through the name map.
    Eval checkpoints hold no v-head: build the model with aux_head=False for them."""
    mapped = {}
    for k, v in state.items():
        ours = official_to_ours(k)
        if ours is not None:
            mapped[ours] = v
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        def first(keys):
            return f"{keys[:8]}{'...' if len(keys) > 8 else ''}"
        raise ValueError(f"{source} does not match the model: missing {first(missing)}, "
                         f"unexpected {first(unexpected)}. Check the preset (model size, patch size) matches "
                         "the checkpoint.")


def ours_to_official(state: dict) -> dict:
    """Our state dict in the official layout (inverse of official_to_ours; for tests and export)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(_proj|\.w[123]|\.linear|mlp\.[02])\.(weight|bias)$", r"\1._flax_linear.\2", k)
        k = k.replace("embedding_table.weight", "embedding_table._flax_embedding.weight")
        out["net." + k] = v
    return out
