"""Softmax attention and its forward-mode JVP.

Layout everywhere: q, k, v and their tangents are [B, H, N, D]; non-causal, no mask, scale 1/sqrt(D).

Eager references (the definition of correct, used by the model's reference path and by the tests):
    attention_ref(q, k, v) -> o
    attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot) -> (o, o_dot)
Softmax runs in fp32 whatever the input dtype, as the official pMF model does.

Tangent math for one query row (kernels.md section 1.1): s = tau q.k_j, p = softmax(s),
    s_dot_j = tau (q_dot.k_j + q.k_dot_j)
    o_dot   = sum_j p_j s_dot_j v_j - (sum_j p_j s_dot_j) o + sum_j p_j v_dot_j
"""
import math

import torch


def upcast(x):
    """fp32 for half types, fp64 stays fp64 (so fp64 tests stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


def attention_ref(q, k, v):
    """Eager math attention, fp32 scores and softmax. q, k, v: [B, H, N, D] -> o [B, H, N, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, upcast(v)).to(q.dtype)


def attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot):
    """Eager attention and its tangent. The primal keeps autograd; the tangent is computed
    without autograd (pMF's loss takes it under stop-gradient), from the primal's softmax."""
    dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bhqd,bhkd->bhqk", upcast(q) * scale, upcast(k))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhqk,bhkd->bhqd", p, upcast(v))
    with torch.no_grad():
        p, o32, q, k, v = p.detach(), o.detach(), upcast(q.detach()), upcast(k.detach()), upcast(v.detach())
        s_dot = (torch.einsum("bhqd,bhkd->bhqk", upcast(q_dot), k)
                 + torch.einsum("bhqd,bhkd->bhqk", q, upcast(k_dot))) * scale
        ps = p * s_dot
        o_dot = (torch.einsum("bhqk,bhkd->bhqd", ps, v) - ps.sum(-1, keepdim=True) * o32
                 + torch.einsum("bhqk,bhkd->bhqd", p, upcast(v_dot)))
    return o.to(dtype), o_dot.to(dtype)
