"""The official optimizer, optax.contrib.muon(lr, adam_b2=0.95): Muon for 2-D weight matrices,
Adam with Nesterov momentum (optax's nadamw) for everything else.

Muon: Nesterov momentum 0.95 with bias correction, 5 Newton-Schulz steps after Frobenius
normalisation, update scaled by sqrt(max(1, fan_out / fan_in)). Every 2-D parameter goes to Muon:
attention and MLP weights, the embedder MLPs and the final linear layers. The 4-D patch-embedding
convolutions, biases, norm scales, gates, tokens, the position embedding and the label table go to
the Adam group (0.9, 0.95), whose update is optax's scale_by_adam(nesterov=True) (Dozat's NAdam
without the extra b2), which optax.contrib.muon passes by default:
    mu_hat = b1 mu_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t),   nu_hat = nu_t / (1 - b2^t)
    p <- p - lr (mu_hat / (sqrt(nu_hat) + eps) + wd p)       (wd: decoupled, added before the lr scaling)
torch.optim.AdamW has no Nesterov term: its step 1 is 1 / 1.47 of this one, so it is not used.

Distributed: on several ranks each rank orthogonalises its share of the matrices (assigned by
Newton-Schulz cost, largest first to the least-loaded rank), same-shape matrices batched in one
call, and one all-gather shares the results, so the Newton-Schulz work per rank falls as 1 / world.
Parameters sharded by FSDP2 (DTensors) are gathered whole for Newton-Schulz (the momentum and the
Nesterov update are elementwise, so they stay sharded) and each rank keeps its own shard of the
result: the update is the same as on one rank. The Adam group is elementwise: it runs on the shards.
"""
import math

import torch
import torch.distributed as dist

from .dist import is_dtensor
from .kernels.newton_schulz import NS_COEFFICIENTS, newton_schulz_ref

# torch 2.14 deprecates all_gather_into_tensor (a warning) for all_gather_single, which 2.11 lacks
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def split_params(model):
    """(muon, adamw) parameter lists. The label table is 2-D but is an embedding: the NAdamW group."""
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


def default_ns(G, steps, coefficients, eps):
    """The batched eager reference; bf16 on GPU as in Keller's Muon, fp32 on CPU as the official
    optax code (param dtype). On GPU it runs under torch.compile: measured on an H200 (torch 2.11,
    the 178 Muon matrices of pMF-B/16) the compiled reference took 8.73 ms, exactly the symmetric
    Triton kernel's 8.73 ms, so the simpler one is used and the kernel (kernels/newton_schulz.py)
    stays a benchmarked alternative (bench/bench_newton_schulz.py)."""
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
                updates.append(upd.full_tensor() if is_dtensor(upd) else upd)   # FSDP2: gather whole
            ortho = self._orthogonalise(updates, group, rank, world)
            for p, o in zip(params, ortho):
                rows, cols = p.shape
                if is_dtensor(p):                           # keep this rank's shard (local slice, no traffic)
                    from torch.distributed.tensor import distribute_tensor
                    o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o.to(p.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)   # sqrt(fan_out / fan_in)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for s in self.state.values():                 # torch casts it to the param's dtype; the momentum is fp32
            s["mu"] = s["mu"].float()

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


class NAdamW(torch.optim.Optimizer):
    """Adam with Nesterov momentum and decoupled weight decay, exactly optax.nadamw (scale_by_adam with
    nesterov=True, add_decayed_weights, scale_by_learning_rate); the formula is in the module docstring.
    Not torch.optim.NAdam, whose momentum follows a decay schedule (Dozat's mu_t).

    Its state is torch's AdamW's (step as a CPU float tensor, exp_avg, exp_avg_sq; the group keys a
    subset of AdamW's), so an AdamW checkpoint loads, also through torch.distributed.checkpoint, which
    asks for this optimizer's keys. Foreach ops are the one path, on every device and on FSDP2's
    DTensors: the group is 167 small tensors, 1.3 M elements (0.7% of pMF-B/16), and no benchmark
    row shows a fused kernel faster. `foreach: True` in each group also marks this optimizer's
    state: torch's AdamW saved None (build_optimizers never set it), which is how a resumed AdamW
    state is recognised, with a one-line notice."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            batches, steps = {}, []                   # foreach lists share device, dtype and step count
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # on the CPU as torch's AdamW: reading it never syncs
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                steps.append(state["step"])
                key = (p.device, p.dtype, is_dtensor(p), state["step"].item() + 1)
                batch = batches.setdefault(key, ([], [], [], []))
                for lst, t in zip(batch, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(t)
            if steps:
                torch._foreach_add_(steps, 1)
            for (_, _, _, t), (params, grads, mu, nu) in batches.items():
                self._update(params, grads, mu, nu, t, b1, b2, group["lr"], group["eps"], group["weight_decay"])
        return loss

    @staticmethod
    def _update(params, grads, mu, nu, t, b1, b2, lr, eps, wd):
        torch._foreach_mul_(mu, b1)
        torch._foreach_add_(mu, grads, alpha=1 - b1)                     # mu = b1 mu + (1 - b1) g
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, grads, grads, value=1 - b2)          # nu = b2 nu + (1 - b2) g^2
        # Nesterov: mu_hat = b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
        upd = torch._foreach_mul(mu, b1 / (1 - b1 ** (t + 1)))
        torch._foreach_add_(upd, grads, alpha=(1 - b1) / (1 - b1 ** t))
        denom = torch._foreach_div(nu, 1 - b2 ** t)                      # nu_hat
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(upd, denom)
        if wd:                                                           # optax: decay added before the lr
            torch._foreach_add_(upd, params, alpha=wd)
        torch._foreach_add_(params, upd, alpha=-lr)

    def load_state_dict(self, state_dict):
        """Also takes torch.optim.AdamW's state: its moments and step carry over, the rule changes."""
        for s in state_dict["state"].values():
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(s):
                raise ValueError(f"the Adam group's optimizer state has keys {sorted(s)}, not step, exp_avg and "
                                 "exp_avg_sq: the checkpoint's optimizers do not match this model's grouping")
        from_adamw = any(g.get("foreach") is not True for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        for s in self.state.values():                 # a fused or capturable AdamW kept step on the GPU
            s["step"] = torch.tensor(float(s["step"]))
        if from_adamw:
            for g in self.param_groups:              # drop AdamW's other keys (amsgrad, fused, ...)
                kept = {k: g[k] for k in ("params", "lr", "betas", "eps", "weight_decay")}
                g.clear()
                g.update(kept, betas=tuple(kept["betas"]), foreach=True)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print("optimizer: the Adam group resumes from a torch.optim.AdamW state: its moments carry over, "
                      "its update is now Adam with Nesterov momentum (optax.contrib.muon's)", flush=True)


class Optimizers:
    """The model's optimizers as one (torchtitan's OptimizersContainer): step, zero_grad, the learning
    rate and the state of all of them in one call. Iterating gives the torch optimizers, which is what
    torch.distributed.checkpoint's get_state_dict / set_state_dict take."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self):
        return len(self.optimizers)

    def __getitem__(self, i):
        return self.optimizers[i]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr(self, lr):
        """One learning rate for every group (the official recipe shares it between Muon and Adam)."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def state_dict(self):
        """A list, one state per optimizer: the layout checkpoints have always had."""
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states):
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} optimizer states, this run has "
                             f"{len(self.optimizers)} optimizers ({', '.join(type(o).__name__ for o in self)})")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def build_optimizers(model, cfg):
    """Optimizers([Muon, NAdamW]) for the model, from an OptimConfig: optax.contrib.muon's two groups.
    The same for every train.impl: Newton-Schulz runs the batched reference (compiled on GPU, see
    default_ns). One weight_decay for both groups (optax's muon decays the Adam group by its own
    adam_weight_decay, 0 by default; both are 0 in the official recipe)."""
    muon_params, adam_params = split_params(model)
    muon = Muon(muon_params, lr=cfg.lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                ns_coefficients=cfg.ns_coefficients, weight_decay=cfg.weight_decay)
    adam = NAdamW(adam_params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return Optimizers([muon, adam])


# ----------------------------------------------------------------------------- learning rate
def lr_factor(optim, step, progress):
    """Multiplier of optim.lr: linear warm-up over optim.warmup_steps, then constant ("none") or a
    cosine to optim.min_lr_ratio at progress 1 (progress: the larger of step / steps and
    elapsed / time budget)."""
    warm = min(1.0, step / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.decay == "cosine":
        p = min(max(progress, 0.0), 1.0)
        return warm * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
    return warm
