"""EDM-style EMAs with half-lives in kimg (official utils/ema_util.py):
    beta = 0.5 ** (batch / max(min(H * 1000, step * batch * 0.05), 1e-8))
Several are kept at once and the best is chosen at evaluation. The official code hard-codes the
batch as 1024; here it is the run's global batch, which is the same for the paper presets.
Under FSDP2 the EMA copies are sharded like the parameters (DTensors) and saved by
torch.distributed.checkpoint with them; `full_state` gathers one whole for sampling.
"""
import copy

import torch

from .dist import full_tensor


def ema_beta(step, halflife_kimg, batch_size, rampup=0.05):
    halflife_img = min(halflife_kimg * 1000, step * batch_size * rampup)
    return 0.5 ** (batch_size / max(halflife_img, 1e-8))


class EMAs:
    """One float32 copy of the parameters per half-life, by parameter name. `name(h)` gives the
    key used in checkpoints and for sampling (e.g. "ema_2000")."""

    def __init__(self, model, halflives_kimg, batch_size):
        self.halflives = [float(h) for h in halflives_kimg]
        self.batch_size = batch_size
        self.params = {self.name(h): {n: p.detach().float().clone() for n, p in model.named_parameters()}
                       for h in self.halflives}

    @staticmethod
    def name(h):
        return f"ema_{h:g}"

    @torch.no_grad()
    def update(self, model, step):
        params = [p.detach().float() for p in model.parameters()]
        for h in self.halflives:
            beta = ema_beta(step, h, self.batch_size)
            torch._foreach_lerp_(list(self.params[self.name(h)].values()), params, 1 - beta)

    def state_dict(self):
        """{ema key: {parameter name: tensor}}: the tensors themselves (save or clone them)."""
        return self.params

    def load_state_dict(self, state):
        if set(state) != set(self.params):
            raise ValueError(f"checkpoint EMAs {sorted(state)} differ from the config's {sorted(self.params)}")
        with torch.no_grad():
            for k, v in state.items():
                for n, dst in self.params[k].items():
                    dst.copy_(v[n])

    def full_state(self, key):
        """{parameter name: whole tensor} of EMA `key` (collective under FSDP2)."""
        return {n: full_tensor(p) for n, p in self.params[key].items()}

    def copy_into(self, model, key):
        """A copy of an unsharded `model` holding EMA `key`'s weights (key None: the raw weights)."""
        out = copy.deepcopy(model)
        if key is None:
            return out
        with torch.no_grad():
            for n, p in out.named_parameters():
                p.copy_(self.params[key][n])
        return out
