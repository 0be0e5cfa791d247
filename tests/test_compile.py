"""Regional compilation (pmf_fast/dist.py compile_blocks): every transformer block runs one shared
compiled graph per mode, so the number of graphs, hence the compile time, does not grow with depth;
later steps compile nothing; and the compiled step computes what the eager step computes.

Graphs are counted by a backend that wraps aot_eager: Dynamo calls it once per graph it compiles,
and the function it returns once per block call that runs compiled (a block that fell back to eager,
e.g. past the recompile limit, is not counted). aot_eager instead of inductor: the same Dynamo
capture and AOT autograd split, without inductor's C++ compile (106 s for one tiny step on 2 cores).
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.debugging import aot_eager

from pmf_fast.config import get_config
from pmf_fast.dist import compile_blocks
from pmf_fast.meanflow import pmf_loss, sample_draws
from pmf_fast.model import PMFDiT
from tests.helpers import wake_up

pytestmark = pytest.mark.slow                  # process launches or compiles: not the fast lane

AUX = 1                    # aux_head_depth of the tiny preset
MODES = 3                  # primal under no_grad (2B), primal with grad (v-head), tangent (trunk + u-head)


class CountingBackend:
    def __init__(self):
        self.graphs, self.calls = 0, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)
        return run


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def setup(depth, impl, batch):
    cfg = get_config("pMF-XS/4-test", [f"model.depth={depth}", f"model.aux_head_depth={AUX}"])
    m = cfg.model
    model = wake_up(PMFDiT(m).set_impl(impl))      # live gates: every block changes the output
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,))
    return cfg, model, x, y


def train_step(model, x, y, d, cfg, impl):
    """(loss, logged terms, gradients) of one step; the gradients are taken off the model."""
    loss, logs = pmf_loss(model, x, y, d, cfg.objective, cfg.model.num_classes, None, impl)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logs, grads


def run_steps(depth, impl, batch, steps=3):
    """Three steps (different draws) of a regionally compiled model and of an eager copy.
    Returns the backend's counts after each step and both runs' results."""
    cfg, model, x, y = setup(depth, impl, batch)
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    gen_c, gen_e = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    counts, compiled_out, eager_out = [], [], []
    for _ in range(steps):
        compiled_out.append(train_step(model, x, y, sample_draws(x, cfg.objective, gen_c), cfg, impl))
        counts.append((backend.graphs, backend.calls))
        eager_out.append(train_step(eager, x, y, sample_draws(x, cfg.objective, gen_e), cfg, impl))
    return counts, compiled_out, eager_out


def block_calls(depth):
    """Block calls of one step: CFG targets (trunk + v-head, no grad), tangent pass (trunk + u-head),
    the v-head's primal with grad."""
    return 2 * depth + AUX


def assert_same(compiled_out, eager_out, rtol=1e-5, atol=1e-6):
    for step, ((lc, logs_c, gc), (le, logs_e, ge)) in enumerate(zip(compiled_out, eager_out)):
        assert torch.allclose(lc, le, rtol=rtol, atol=atol), f"step {step}: loss {lc} vs eager {le}"
        for k in logs_e:
            assert torch.allclose(logs_c[k], logs_e[k], rtol=rtol, atol=atol), f"step {step}: {k}"
        assert gc.keys() == ge.keys()
        for n in ge:
            assert torch.allclose(gc[n], ge[n], rtol=1e-4, atol=atol), \
                f"step {step}: grad {n} off by {(gc[n] - ge[n]).abs().max().item():.3e}"
        assert any(g.abs().max() > 0 for n, g in gc.items() if n.startswith("shared_blocks.0."))


def test_graphs_flat_in_depth_no_recompile_and_same_as_eager():
    graphs = {}
    for depth in (4, 12):
        counts, compiled_out, eager_out = run_steps(depth, "eager", batch=4)
        print(f"depth {depth}: (graphs, compiled block calls) after each step {counts}")
        g1 = counts[0][0]
        # (b) steps 2 and 3 compile nothing ...
        assert [g for g, _ in counts] == [g1] * 3, f"depth {depth}: recompiled in a later step: {counts}"
        # ... and every block call of every step ran a compiled graph (none fell back to eager)
        assert [c for _, c in counts] == [block_calls(depth) * s for s in (1, 2, 3)], counts
        # (c) compiled losses and gradients equal eager ones, step by step
        assert_same(compiled_out, eager_out)
        graphs[depth] = g1
        torch._dynamo.reset()
    # (a) one graph per mode, at any depth
    assert graphs == {4: MODES, 12: MODES}, graphs


def test_fast_impl_compiles_one_graph_per_mode_and_matches_eager():
    """impl "fast": the Triton kernels enter the graph as torch.library custom ops (here in
    Triton's interpreter), LinearJVP as an autograd.Function."""
    depth = 2
    counts, compiled_out, eager_out = run_steps(depth, "fast", batch=2)
    print(f"fast, depth {depth}: (graphs, compiled block calls) after each step {counts}")
    assert counts == [(MODES, block_calls(depth) * s) for s in (1, 2, 3)], counts
    assert_same(compiled_out, eager_out)


@pytest.mark.parametrize("impl", ["eager", "fast"])
def test_compiled_block_tangent_is_stop_gradient(impl):
    """A compiled block returns its output differentiable and its tangent not, as the eager block
    does (torch 2.11 compiled the fast block's tangent as requiring grad until the block detached it)."""
    cfg, model, x, y = setup(2, impl, batch=2)
    block = model.blocks()[0]
    T, D = model.rope_cos.shape[0], block.attn_scale.shape[0]
    h = torch.randn(2, T, D, requires_grad=True)
    h_dot = torch.randn(2, T, D)
    want_y, want_dot = block(h, model.rope, h_dot)
    block.compile(backend=aot_eager, fullgraph=True, dynamic=False)
    got_y, got_dot = block(h, model.rope, h_dot)
    assert got_y.requires_grad and not got_dot.requires_grad
    torch.testing.assert_close(got_y, want_y)
    torch.testing.assert_close(got_dot, want_dot)


def test_new_batch_size_adds_one_graph_per_mode_only():
    """dynamic=False: a second batch size compiles its own static graphs, once, for all blocks."""
    cfg, model, x, y = setup(4, "eager", batch=4)
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for b in (4, 2, 4, 2):
        train_step(model, x[:b], y[:b], sample_draws(x[:b], cfg.objective, gen), cfg, "eager")
        seen.append(backend.graphs)
    assert seen == [MODES, 2 * MODES, 2 * MODES, 2 * MODES], seen
