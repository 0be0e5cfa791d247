"""Muon for 2-D weight matrices, AdamW for everything else (the official recipe).

Muon (optax.contrib.muon as the official JAX code uses it): Nesterov momentum 0.95 with bias
correction, 5 Newton-Schulz steps after Frobenius normalisation, update scaled by
sqrt(max(1, fan_out / fan_in)). Every 2-D parameter goes to Muon: attention and MLP weights,
the embedder MLPs and the final linear layers. The 4-D patch-embedding convolutions, biases, norm
scales, gates, tokens, the position embedding and the label table go to AdamW (0.9, 0.95).
(The official code's AdamW also uses Nesterov; torch's AdamW does not; the difference is small.)
Same-shape matrices are orthogonalised together in one batched call.
"""
import torch

from kernels.newton_schulz import newton_schulz_ref


def split_params(model):
    """(muon, adamw) parameter lists. The label table is 2-D but is an embedding: AdamW."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and "embedding_table" not in name
        (muon if is_matrix else adamw).append(p)
    return muon, adamw


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. ns_fn(G [B, m, n]) orthogonalises a batch of same-shape matrices."""

    def __init__(self, params, lr=1e-3, momentum=0.95, ns_steps=5, ns_coefficients=(3.4445, -4.7750, 2.0315),
                 weight_decay=0.0, eps=1e-8, ns_fn=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps,
                                      ns_coefficients=tuple(ns_coefficients), weight_decay=weight_decay, eps=eps))
        self.ns_fn = ns_fn or self._default_ns

    @staticmethod
    def _default_ns(G, steps, coefficients, eps):
        # bf16 on GPU as in Keller's Muon; fp32 on CPU, as the official optax code (param dtype)
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
        return newton_schulz_ref(G, steps, coefficients, eps, dtype=dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta = group["momentum"]
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mu"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                k, g = state["step"], p.grad.float()
                state["mu"].lerp_(g, 1 - beta)               # mu = beta mu + (1 - beta) g
                # Nesterov with bias correction (optax): beta mu_hat + (1 - beta) g_hat
                upd = beta * state["mu"] / (1 - beta ** (k + 1)) + (1 - beta) * g / (1 - beta ** k)
                by_shape.setdefault(tuple(p.shape), []).append((p, upd))
            for (rows, cols), items in by_shape.items():
                O = self.ns_fn(torch.stack([u for _, u in items]), group["ns_steps"], group["ns_coefficients"], group["eps"])
                scale = max(1.0, rows / cols) ** 0.5          # sqrt(fan_out / fan_in), weights are (out, in)
                for (p, _), o in zip(items, O):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)


def kernel_ns(G, steps, coefficients, eps):
    """The batched, symmetric Triton Newton-Schulz (bf16 on GPU)."""
    from kernels.newton_schulz import newton_schulz
    return newton_schulz(G, steps, coefficients, eps)


def build_optimizers(model, cfg, fast=False):
    """[Muon, AdamW] for the model, from an OptimConfig; fast: Newton-Schulz on the Triton kernel."""
    muon_params, adam_params = split_params(model)
    muon = Muon(muon_params, lr=cfg.lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                ns_coefficients=cfg.ns_coefficients, weight_decay=cfg.weight_decay,
                ns_fn=kernel_ns if fast else None)
    fused = all(p.is_cuda for p in adam_params)
    adamw = torch.optim.AdamW(adam_params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay, fused=fused or None)
    return [muon, adamw]
