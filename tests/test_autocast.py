"""Under bf16 autocast the fast step hands bf16 to every kernel and matmul: primal, tangent and
backward. An fp32 activation there runs the fp32 kernels (no tensor cores, spills, the Triton
backward instead of PyTorch's flash backward: pmf_fast/layers.py RMSNorm says why).

The dtypes are recorded below autocast by a TorchDispatchMode, so each op is seen with the dtypes
it really computes in, and the kernel ops (pmf_fast::*) as the model hands them over. On the CPU the
kernel ops run their eager fallbacks (TRITON_INTERPRET=0): the dtypes are the point here, and the
interpreter's bf16 tl.dot is wrong."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pmf_fast import layers
from pmf_fast.config import get_config
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from tests.helpers import wake_up

# how many leading inputs of each kernel op are activations; the rest are weights (cast to the
# activations' dtype inside the op) and the fp32 log-sum-exp
KERNEL_ACTIVATIONS = {"attn_fwd": 3, "attn_jvp_fwd": 6, "attn_bwd": 5, "patch_embed": 1, "patch_embed_jvp": 2}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}


class DtypeRecorder(TorchDispatchMode):
    """op name -> the set of dtype tuples of its floating inputs, for the kernel ops and matmuls."""

    def __init__(self):
        super().__init__()
        self.calls = collections.defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if func.namespace == "pmf_fast" or op in MATMULS:
            inputs = args[:KERNEL_ACTIVATIONS[op]] if func.namespace == "pmf_fast" else args
            self.calls[op].add(tuple(a.dtype for a in inputs if torch.is_tensor(a) and a.is_floating_point()))
        return func(*args, **(kwargs or {}))


def bf16_step_dtypes(monkeypatch, B=3):
    """The dtypes of one fast training step (CFG targets, tangent pass, loss, backward) under
    torch.autocast("cpu", torch.bfloat16), fp32 parameters, as train.py runs it on a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = get_config("pMF-XS/4-test")
    m = cfg.model
    model = wake_up(PMFDiT(m)).set_impl("fast")
    x = torch.rand(B, m.in_channels, m.image_size, m.image_size) * 2 - 1
    y = torch.randint(0, m.num_classes, (B,))
    d = sample_draws(x, cfg.objective, torch.Generator().manual_seed(1))
    rec = DtypeRecorder()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = pmf_loss(model, x, y, d, cfg.objective, m.num_classes, None, "fast")
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    return rec.calls


def not_bf16(calls):
    return {op: sorted(map(str, dts)) for op, dts in calls.items()
            if any(dt != torch.bfloat16 for t in dts for dt in t)}


def test_bf16_reaches_every_kernel_and_matmul(monkeypatch):
    calls = bf16_step_dtypes(monkeypatch)
    assert {"attn_fwd", "attn_jvp_fwd", "attn_bwd", "patch_embed_jvp", "mm", "addmm"} <= calls.keys(), calls.keys()
    assert not not_bf16(calls), f"fp32 reaches kernels or matmuls under bf16 autocast: {not_bf16(calls)}"
    # the cotangent dO is the first input of the attention backward: bf16 picks PyTorch's flash backward
    assert {dts[0] for dts in calls["attn_bwd"]} == {torch.bfloat16}


def old_rmsnorm_forward(self, x):                  # the promotion: bf16 statistics times an fp32 weight
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def fp32_rope(x, cos, sin, rope=layers.apply_rope):   # a rotation that returns its fp32 working copy
    return rope(x.float(), cos, sin)


@pytest.mark.parametrize("leak", ["rmsnorm", "rope"])
def test_a_planted_fp32_leak_is_caught(monkeypatch, leak):
    if leak == "rmsnorm":
        monkeypatch.setattr(layers.RMSNorm, "forward", old_rmsnorm_forward)
    else:
        monkeypatch.setattr(layers, "apply_rope", fp32_rope)
    wrong = not_bf16(bf16_step_dtypes(monkeypatch))
    assert {"attn_fwd", "attn_jvp_fwd", "attn_bwd"} <= wrong.keys(), wrong
