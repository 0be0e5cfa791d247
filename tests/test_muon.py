import torch

from kernels.newton_schulz import newton_schulz_ref
from pmf_fast.config import get_config
from pmf_fast.model import PMFDiT
from pmf_fast.muon import Muon, build_optimizers, split_params


def test_param_split_follows_the_official_recipe():
    model = PMFDiT(get_config("pMF-XS/4-test").model)
    muon, adamw = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, adam_names = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert "shared_blocks.0.attn.q_proj.weight" in muon_names and "u_final_layer.linear.weight" in muon_names
    assert "h_embedder.mlp.0.weight" in muon_names
    assert {"x_embedder.proj1.weight", "y_embedder.embedding_table.weight", "pos_embed",
            "shared_blocks.0.attn_scale", "u_final_layer.linear.bias"} <= adam_names
    assert all(p.ndim == 2 for p in muon) and len(muon) + len(adamw) == len(list(model.parameters()))


def test_muon_step_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    q = torch.nn.Parameter(torch.randn(6, 4))
    opt = Muon([p, q], lr=0.1, momentum=0.9)
    p0, mu, beta = p.detach().clone(), torch.zeros(6, 4), 0.9
    for k in (1, 2):
        g = torch.randn(6, 4)
        p.grad, q.grad = g.clone(), torch.randn(6, 4)
        opt.step()
        mu = beta * mu + (1 - beta) * g
        upd = beta * mu / (1 - beta ** (k + 1)) + (1 - beta) * g / (1 - beta ** k)
        p0 = p0 - 0.1 * (6 / 4) ** 0.5 * newton_schulz_ref(upd)
        assert torch.allclose(p.detach(), p0, atol=1e-5)


def test_optimizers_cover_every_parameter_once():
    model = PMFDiT(get_config("pMF-XS/4-test").model)
    opts = build_optimizers(model, get_config("pMF-XS/4-test").optim)
    ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    adamw = opts[1]
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["eps"] == 1e-8
