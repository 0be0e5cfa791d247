"""Every kernel and the fast step against the eager reference: what to run on a new GPU before
training on it.

    python -m pmf_fast.selftest [--json PATH] [--quick]

On a CUDA GPU, at the presets' real shapes, bf16 and fp32: attention forward, tangent and
gradients at N = 276 and head dims 64 (pMF-B/16, L/16) and 80 (pMF-H/16); the patch embedding's
values, tangent and weight gradients at the B/16, L/16 and H/16 shapes; the Newton-Schulz kernel on
pMF-B/16's Muon batch; then the fast training step (model.jvp on the kernels) against the reference
(torch.func.jvp, math attention) on one small batch: the loss terms and every gradient. Without a
GPU the same checks run at small shapes in Triton's CPU interpreter, fp32 and fp16 (the
interpreter's bf16 tl.dot is wrong). --quick: the kernels only, head dim 64 and the B/16 patch
embedding, bf16 on a GPU.

A line per check with its error and bound; --json writes them all; exit status 1 on any mismatch.
The bound is flash-attention's rule, the one every test uses (tests/helpers.py imports it from
here): error against an fp64 reference <= factor x the error of the same eager computation in the
same dtype + an atol per dtype (times max|ref| for gradients, which are far from unit scale).
train.py runs check_run (the kernels at the run's own shapes and dtype) before the first fast step
on CUDA (train.selftest), so a kernel that is wrong on a card never trains silently.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

# atol added to the error bound, per dtype (flash-attention's rule)
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The attention tangent in fp16/bf16 may err up to 3x the eager error: the kernel rounds P o S_dot to
# the input dtype for its tensor-core dot and O_dot = G / l - (r / l) O then cancels, while the eager
# reference does both in fp32 (measured in fp16 at (1, 1, 37, 80), seeds 0-3: 3.1x, 2.2x, 1.5x, 2.1x).
TANGENT_FACTOR = {torch.float32: 2.0, torch.float16: 3.0, torch.bfloat16: 3.0}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def error_bound(out, ref64, eager_same_dtype, factor=2.0, relative_atol=False):
    """(error, eager error, bound) of `out` against the fp64 reference by the rule above."""
    err, base = max_err(out, ref64), max_err(eager_same_dtype, ref64)
    bound = factor * base + ATOL[out.dtype] * (ref64.abs().max().item() if relative_atol else 1.0)
    return err, base, bound


@torch.no_grad()
def wake_up(model, std=0.3):
    """Randomise the zero-initialised residual gates and final layers, so that every block and
    head affects the output (at init the network is the identity on its tokens and outputs 0)."""
    for n, p in model.named_parameters():
        if "scale" in n or "final_layer.linear" in n:
            p.normal_(0, std)
    return model


def interpreter_problem():
    """Why Triton's CPU interpreter cannot run here, or None: triton < 3.8 with numpy >= 2.4 fails
    in every interpreted kernel (interpreter.py: "only 0-dimensional arrays can be converted to
    Python scalars"); triton 3.8 fixed it. A GPU does not use the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__}: "
                f"pip install 'numpy<2.4' (or triton>=3.8)")
    return None


class SelftestFailed(RuntimeError):
    """A kernel or the fast step disagrees with the eager reference on this machine."""


# ----------------------------------------------------------------------------- the checks
class Checks:
    """Collects one result per compared tensor and prints a line for each as it is measured."""

    def __init__(self, echo=print):
        self.results, self.echo = [], echo

    def compare(self, name, out, ref64, eager, factor=2.0, relative_atol=False):
        err, base, bound = error_bound(out, ref64, eager, factor, relative_atol)
        ok = err <= bound and math.isfinite(err)
        self.results.append({"check": name, "ok": ok, "err": err, "eager_err": base, "bound": bound,
                             "dtype": str(out.dtype).replace("torch.", "")})
        self.echo(f"{'ok  ' if ok else 'FAIL'} {name}: err {err:.3e} {'<=' if ok else '>'} bound {bound:.3e} "
                  f"({factor:g} x eager err {base:.3e} + atol)")

    def failed(self):
        return [r["check"] for r in self.results if not r["ok"]]


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _grads(fn, xs, dy):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, xs, dy.to(out.dtype))


def check_attention(c, shape, dtype, dev):
    """attention_jvp's o and o_dot, attention's o, and the gradients autograd runs in training."""
    import pmf_fast.kernels.attention as A
    q, k, v, q_dot, k_dot, v_dot = (torch.randn(shape, device=dev, dtype=torch.float64).to(dtype) for _ in range(6))
    name = f"attention {tuple(shape)} {_dt(dtype)}"
    o, o_dot = A.attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    o64, o_dot64 = torch.func.jvp(A.attention_ref, (q.double(), k.double(), v.double()),
                                  (q_dot.double(), k_dot.double(), v_dot.double()))
    eo, e_o_dot = A.attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot)
    c.compare(f"{name} o", o, o64, eo)
    c.compare(f"{name} o_dot", o_dot, o_dot64, e_o_dot, factor=TANGENT_FACTOR[dtype])
    c.compare(f"{name} o (plain forward)", A.attention(q, k, v), o64, eo)
    do = torch.randn_like(q)
    g64, ge = _grads(A.attention_ref, (q.double(), k.double(), v.double()), do), _grads(A.attention_ref, (q, k, v), do)
    g = _grads(lambda a, b, d: A.attention_jvp(a, b, d, q_dot, k_dot, v_dot), (q, k, v), do)
    for gi, ri, ei, n in zip(g, g64, ge, "qkv"):
        c.compare(f"{name} d{n} ({A.default_backward(q)} backward)", gi, ri, ei)


def check_patch_embed(c, case, dtype, dev):
    """patch_embed_jvp's y and y_dot and the weight gradients, against the two convolutions."""
    import pmf_fast.kernels.patch_embed as P
    from pmf_fast.layers import BottleneckPatchEmbedder
    B, C, S, p, r, D = case
    emb = BottleneckPatchEmbedder(S, p, C, r, D).to(dev)
    w32 = [emb.proj1.weight, emb.proj1.bias, emb.proj2.weight, emb.proj2.bias]
    with torch.no_grad():
        for b in (w32[1], w32[3]):
            b.normal_()
    w = [t.detach().to(dtype) for t in w32]
    x = torch.randn(B, C, S, S, device=dev, dtype=dtype)
    xd = torch.randn_like(x)
    # eager in the same dtype; a CPU has no fp16 convolution, so there it runs in fp32 and rounds
    lo = dtype if dev != "cpu" or dtype == torch.float32 else torch.float32
    eager = lambda *a: P.patch_embed_ref(*[t if t is None else t.to(lo) for t in a]).to(dtype)
    name = f"patch embed {B}x{C}x{S}x{S} p{p} r{r} D{D} {_dt(dtype)}"
    w64 = [t.double() for t in w]
    y, yd = P.patch_embed_jvp(x, xd, *w)
    c.compare(f"{name} y", y, P.patch_embed_ref(x.double(), *w64), eager(x, *w))
    c.compare(f"{name} y_dot", yd, P.patch_embed_ref(xd.double(), w64[0], None, w64[2], None),
              eager(xd, w[0], None, w[2], None))
    dy = torch.randn(B, (S // p) ** 2, D, device=dev, dtype=dtype)
    grads = lambda fn, ws: torch.autograd.grad(fn(*ws), ws, dy.to(ws[0].dtype))
    req = lambda ws: [t.detach().clone().requires_grad_() for t in ws]
    g = grads(lambda *ws: P.patch_embed_jvp(x, xd, *ws)[0], req(w))
    g64 = grads(lambda *ws: P.patch_embed_ref(x.double(), *ws), req(w64))
    ge = grads(lambda *ws: eager(x, *ws), req(w))
    for gi, ri, ei, n in zip(g, g64, ge, ("w1", "b1", "w2", "b2")):
        c.compare(f"{name} d{n}", gi, ri, ei, relative_atol=True)


def check_newton_schulz(c, shape, dtype, dev):
    import pmf_fast.kernels.newton_schulz as NS
    G = torch.randn(*shape, device=dev)
    out = NS.newton_schulz(G, dtype=dtype).to(dtype)
    c.compare(f"newton-schulz {tuple(shape)} {_dt(dtype)}", out, NS.newton_schulz_ref(G.double()),
              NS.newton_schulz_ref(G, dtype=dtype).to(dtype))


def check_fast_step(c, dev, preset="pMF-XS/4-test", batch=4):
    """One pmf_loss step, fast (model.jvp on the kernels) against the reference (torch.func.jvp over
    model.forward, math attention) in fp64 and fp32: every logged loss term and every gradient."""
    from pmf_fast.config import get_config
    from pmf_fast.meanflow import pmf_loss, sample_draws
    from pmf_fast.model import PMFDiT
    cfg = get_config(preset)
    m = cfg.model
    torch.manual_seed(0)
    model = wake_up(PMFDiT(m).to(dev))
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=dev) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=dev)
    d = sample_draws(x, cfg.objective, torch.Generator(dev).manual_seed(1), torch.Generator().manual_seed(1))
    d64 = copy.copy(d)
    for k in ("t", "r", "e", "omega", "t_min", "t_max"):
        setattr(d64, k, getattr(d, k).double())

    def step(net, x, d, impl):
        net.zero_grad()
        loss, logs = pmf_loss(net, x, y, d, cfg.objective, m.num_classes, None, impl)
        loss.backward()
        return logs, {n: p.grad.clone() for n, p in net.named_parameters()}

    logs64, g64 = step(copy.deepcopy(model).double(), x.double(), d64, "reference")
    logs32, g32 = step(model, x, d, "reference")
    logsf, gf = step(copy.deepcopy(model).set_impl("fast"), x, d, "fast")
    for k in logs64:
        c.compare(f"fast step {preset} fp32 {k}", logsf[k], logs64[k], logs32[k])
    for n in g64:
        c.compare(f"fast step {preset} fp32 grad {n}", gf[n], g64[n], g32[n], relative_atol=True)


# (B, H, N, D), (B, C, image, patch, r, D) and [B, m, n] per device. GPU: the presets' own shapes.
# CPU: the interpreter's, small (ragged N = 37, the split head dim 80 = 64 + 16, odd patch widths).
GPU_ATTENTION = [(4, 12, 276, 64), (2, 16, 276, 80)]
GPU_PATCH = [(8, 3, 256, 16, 128, 768), (8, 3, 256, 16, 128, 1024), (8, 3, 256, 16, 256, 1280)]
CPU_ATTENTION = [(1, 2, 37, 64), (1, 1, 37, 80)]
CPU_PATCH = [(2, 3, 8, 2, 8, 24), (1, 3, 12, 4, 16, 40)]
CPU_NS = [(3, 24, 40), (2, 40, 24)]


def muon_batches(preset="pMF-B/16"):
    """[count, m, n] of each same-shape group of the preset's Muon matrices (one NS launch each)."""
    from pmf_fast.config import get_config
    from pmf_fast.model import PMFDiT
    from pmf_fast.optimizers import split_params
    with torch.device("meta"):
        model = PMFDiT(get_config(preset).model)
    counts = {}
    for p in split_params(model)[0]:
        counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
    return [(n, *s) for s, n in counts.items()]


class _exact_fp32:
    """fp32 products in full precision (train.py turns TF32 on for matmuls; cuDNN uses TF32 by
    default): the reference of every check is fp32 arithmetic, not TF32's 10-bit mantissa."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def run_checks(quick=False, echo=print):
    """Every check for this machine; returns the Checks."""
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    c = Checks(echo)
    dtypes = ([torch.bfloat16] if quick else [torch.bfloat16, torch.float32]) if gpu else [torch.float32,
                                                                                          torch.float16]
    attention, patch = (GPU_ATTENTION, GPU_PATCH) if gpu else (CPU_ATTENTION, CPU_PATCH)
    ns = muon_batches() if gpu else CPU_NS
    if quick:
        attention, patch = attention[:1], patch[:1]
    with _exact_fp32():
        for dtype in dtypes:
            for shape in attention:
                torch.manual_seed(0)
                check_attention(c, shape, dtype, dev)
            for case in patch:
                torch.manual_seed(0)
                check_patch_embed(c, case, dtype, dev)
        if not quick:
            for shape in ns:
                for dtype in dtypes if gpu else [torch.float32]:
                    torch.manual_seed(0)
                    check_newton_schulz(c, shape, dtype, dev)
            check_fast_step(c, dev)
    return c


def check_run(model_cfg, dtype, device, echo=print):
    """The kernels a run of this model uses, at its own attention and patch-embedding shapes and
    dtype, before its first step; raises SelftestFailed naming the first check that disagrees."""
    m = model_cfg
    tokens = (m.image_size // m.patch_size) ** 2 + (m.num_class_tokens + m.num_cfg_tokens
                                                    + 2 * m.num_interval_tokens + m.num_time_tokens)
    c = Checks(echo)
    with _exact_fp32():
        torch.manual_seed(0)
        check_attention(c, (2, m.num_heads, tokens, m.hidden_size // m.num_heads), dtype, device.type)
        torch.manual_seed(0)
        check_patch_embed(c, (2, m.in_channels, m.image_size, m.patch_size, m.bottleneck, m.hidden_size), dtype,
                          device.type)
    bad = c.failed()
    if bad:
        raise SelftestFailed(f"kernel self-test failed on {torch.cuda.get_device_name(device)}: {bad[0]} "
                             f"({len(bad)} of {len(c.results)} checks off the eager reference); "
                             "train with --impl eager, or train.selftest=off to train anyway")
    return c


def before_training(tc, model_cfg, impl, bf16, device, log=print):
    """train.selftest "quick": check_run before the first step of a fast run on CUDA (the interpreter
    on a CPU is slow and is what CI checks); raises SelftestFailed on a mismatch."""
    if tc.selftest == "off" or impl != "fast" or device.type != "cuda":
        return
    t0 = time.perf_counter()
    c = check_run(model_cfg, torch.bfloat16 if bf16 else torch.float32, device, echo=lambda s: None)
    log(f"kernel self-test: {len(c.results)} checks within bound in {time.perf_counter() - t0:.1f} s "
        "(train.selftest=off skips it)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pmf_fast.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write every check's result there")
    ap.add_argument("--quick", action="store_true", help="the kernels only, at pMF-B/16's shapes")
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported (kernels/)
    problem = interpreter_problem()
    if problem:
        print(f"selftest: {problem}", file=sys.stderr)
        return 2
    import triton
    where = torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter, small shapes)"
    print(f"selftest on {where}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    t0 = time.perf_counter()
    c = run_checks(a.quick, echo=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - t0
    bad = c.failed()
    print(f"selftest: {len(c.results) - len(bad)} of {len(c.results)} checks within bound in {seconds:.1f} s"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    if a.json:
        from pmf_fast.atomic import atomic_write
        report = {"device": where, "torch": torch.__version__, "triton": triton.__version__, "quick": a.quick,
                  "seconds": round(seconds, 2), "ok": not bad, "failed": bad, "checks": c.results}
        atomic_write(a.json, lambda f: f.write(json.dumps(report, indent=2) + "\n"), mode="w")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
