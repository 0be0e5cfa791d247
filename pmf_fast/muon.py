"""Muon for 2-D weight matrices, AdamW for everything else (the official recipe).

Muon (optax.contrib.muon as the official JAX code uses it): Nesterov momentum 0.95 with bias
correction, 5 Newton-Schulz steps after Frobenius normalisation, update scaled by
sqrt(max(1, fan_out / fan_in)). Every 2-D parameter goes to Muon: attention and MLP weights,
the embedder MLPs and the final linear layers. The 4-D patch-embedding convolutions, biases, norm
scales, gates, tokens, the position embedding and the label table go to AdamW (0.9, 0.95).
(The official code's AdamW also uses Nesterov; torch's AdamW does not; the difference is small.)

Distributed: on several ranks each rank orthogonalises its share of the matrices (assigned by
Newton-Schulz cost, largest first to the least-loaded rank), same-shape matrices batched in one
call, and one all-gather shares the results, so the Newton-Schulz work per rank falls as 1 / world.
Parameters sharded by FSDP2 (DTensors) are gathered whole for Newton-Schulz (the momentum and the
Nesterov update are elementwise, so they stay sharded) and each rank keeps its own shard of the
result: the update is the same as on one rank.
"""
import torch
import torch.distributed as dist

from kernels.newton_schulz import NS_COEFFICIENTS, newton_schulz_ref

# torch 2.14 deprecates all_gather_into_tensor (a warning) for all_gather_single, which 2.11 lacks
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def split_params(model):
    """(muon, adamw) parameter lists. The label table is 2-D but is an embedding: AdamW."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and "embedding_table" not in name
        (muon if is_matrix else adamw).append(p)
    return muon, adamw


def ns_cost(shape):
    """Newton-Schulz FLOPs per step on an m x n matrix (m <= n): X X^T, A^2, B X."""
    m, n = sorted(shape)
    return 4 * m * m * n + 2 * m ** 3


def assign_owners(shapes, world):
    """Rank that orthogonalises each matrix: largest cost first, to the least-loaded rank
    (deterministic, so every rank computes the same assignment)."""
    load, owner = [0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + ns_cost(shapes[i])
    return owner


def _is_dtensor(t):
    return type(t).__name__ == "DTensor"


def default_ns(G, steps, coefficients, eps):
    """The batched eager reference; bf16 on GPU as in Keller's Muon, fp32 on CPU as the official
    optax code (param dtype). On GPU it runs under torch.compile: measured on an H200 (2026-11,
    torch 2.11, the 178 Muon matrices of pMF-B/16) the compiled reference took 8.73 ms, exactly
    the symmetric Triton kernel's 8.73 ms, so the simpler one is used and the kernel
    (kernels/newton_schulz.py) stays a benchmarked alternative (bench/bench_newton_schulz.py)."""
    if G.is_cuda:
        return _compiled_ns()(G, steps, coefficients, eps, dtype=torch.bfloat16)
    return newton_schulz_ref(G, steps, coefficients, eps, dtype=torch.float32)


_COMPILED = {}


def _compiled_ns():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(newton_schulz_ref, dynamic=False)
    return _COMPILED["fn"]


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. ns_fn(G [B, m, n], steps, coefficients, eps) orthogonalises a batch
    of same-shape matrices. With a process group of several ranks, Newton-Schulz is shared out."""

    def __init__(self, params, lr=1e-3, momentum=0.95, ns_steps=5, ns_coefficients=NS_COEFFICIENTS,
                 weight_decay=0.0, eps=1e-8, ns_fn=None, distributed=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps,
                                      ns_coefficients=tuple(ns_coefficients), weight_decay=weight_decay, eps=eps))
        self.ns_fn = ns_fn or default_ns
        # None: share Newton-Schulz out whenever a process group of several ranks is up
        self.distributed = distributed

    def _world(self):
        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return (dist.get_rank(), dist.get_world_size()) if on and self.distributed is not False else (0, 1)

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = self._world()
        for group in self.param_groups:
            beta = group["momentum"]
            params, updates = [], []
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
                params.append(p)
                updates.append(upd.full_tensor() if _is_dtensor(upd) else upd)   # FSDP2: gather whole
            ortho = self._orthogonalise(updates, group, rank, world)
            for p, o in zip(params, ortho):
                rows, cols = p.shape
                if _is_dtensor(p):                           # keep this rank's shard (local slice, no traffic)
                    from torch.distributed.tensor import distribute_tensor
                    o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o.to(p.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)   # sqrt(fan_out / fan_in)

    def _orthogonalise(self, updates, group, rank, world):
        """Newton-Schulz of every update; this rank computes its share, one all-gather shares them."""
        owner = assign_owners([tuple(u.shape) for u in updates], world)
        mine = {}
        by_shape = {}
        for i, u in enumerate(updates):
            if owner[i] == rank:
                by_shape.setdefault(tuple(u.shape), []).append(i)
        for idx in by_shape.values():
            O = self.ns_fn(torch.stack([updates[i] for i in idx]), group["ns_steps"], group["ns_coefficients"],
                           group["eps"])
            mine.update(zip(idx, O))
        if world == 1:
            return [mine[i] for i in range(len(updates))]
        # every rank packs its results in index order into one flat buffer of the common length
        dtype = next(iter(mine.values())).dtype if mine else updates[0].dtype
        sizes = [sum(updates[i].numel() for i in range(len(updates)) if owner[i] == r) for r in range(world)]
        flat = torch.zeros(max(sizes), dtype=dtype, device=updates[0].device)
        if mine:
            local = torch.cat([mine[i].reshape(-1).to(dtype) for i in sorted(mine)])
            flat[:local.numel()] = local
        gathered = torch.empty(world * max(sizes), dtype=dtype, device=flat.device)   # flat: gloo needs it
        _all_gather_single(gathered, flat)
        gathered = gathered.view(world, max(sizes))
        out, offset = [None] * len(updates), [0] * world
        for i, u in enumerate(updates):
            r = owner[i]
            out[i] = gathered[r, offset[r]:offset[r] + u.numel()].view(u.shape)
            offset[r] += u.numel()
        return out


def build_optimizers(model, cfg):
    """[Muon, AdamW] for the model, from an OptimConfig. The same for every train.impl: Newton-Schulz
    runs the batched reference (compiled on GPU, see default_ns)."""
    muon_params, adam_params = split_params(model)
    muon = Muon(muon_params, lr=cfg.lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                ns_coefficients=cfg.ns_coefficients, weight_decay=cfg.weight_decay)
    fused = all(p.is_cuda for p in adam_params)
    adamw = torch.optim.AdamW(adam_params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay, fused=fused or None)
    return [muon, adamw]
