"""EDM-style EMAs with half-lives in kimg (official utils/ema_util.py):
    beta = 0.5 ** (batch / max(min(H * 1000, step * batch * 0.05), 1e-8))
Several are kept at once and the best is chosen at evaluation. The official code hard-codes the
batch as 1024; here it is the run's global batch, which is the same for the paper presets.
"""
import copy

import torch


def ema_beta(step, halflife_kimg, batch_size, rampup=0.05):
    halflife_img = min(halflife_kimg * 1000, step * batch_size * rampup)
    return 0.5 ** (batch_size / max(halflife_img, 1e-8))


class EMAs:
    """One float32 copy of the parameters per half-life. `name(h)` gives the key used in
    checkpoints and for sampling (e.g. "ema_2000")."""

    def __init__(self, model, halflives_kimg, batch_size):
        self.halflives = [float(h) for h in halflives_kimg]
        self.batch_size = batch_size
        self.params = {self.name(h): [p.detach().float().clone() for p in model.parameters()]
                       for h in self.halflives}

    @staticmethod
    def name(h):
        return f"ema_{h:g}"

    @torch.no_grad()
    def update(self, model, step):
        params = [p.detach().float() for p in model.parameters()]
        for h in self.halflives:
            beta = ema_beta(step, h, self.batch_size)
            torch._foreach_lerp_(self.params[self.name(h)], params, 1 - beta)

    def state_dict(self):
        return {k: [p.clone() for p in v] for k, v in self.params.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.params):
            raise ValueError(f"checkpoint EMAs {sorted(state)} differ from the config's {sorted(self.params)}")
        for k, v in state.items():
            for dst, src in zip(self.params[k], v):
                dst.copy_(src)

    def copy_into(self, model, key):
        """A copy of `model` holding EMA `key`'s weights (key None: the raw weights)."""
        out = copy.deepcopy(model)
        if key is None:
            return out
        with torch.no_grad():
            for p, e in zip(out.parameters(), self.params[key]):
                p.copy_(e)
        return out
