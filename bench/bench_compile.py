"""Compile time of the first training step: torch.compile of the whole pmf_loss against regional
compilation (pmf_fast/dist.py compile_blocks: one graph per block mode, shared by every block), at
two depths, so the rows show how each grows with depth.

One step: pmf_loss with explicit tangents (x_dot through every block's module call) plus backward,
pMF-B/16 shapes at batch 2 with model.depth overridden (aux_head_depth kept <= depth).
On the CPU: impl "eager", fp32, backend "aot_eager" (Dynamo capture + AOT autograd, no codegen);
on a GPU: impl "fast", bf16 autocast, backend "inductor". Compile time = first call minus second
call, both wall clock with the device synchronised; each row also carries
dynamo_compile_s, the compile time Dynamo accounts for itself (frame compiles plus the lazy
backward compiles), which the step time's noise on a shared CPU does not touch. Each case runs in its
own Python process (a cold Dynamo, inductor's on-disk caches off via TORCHINDUCTOR_FORCE_DISABLE_CACHES), under a time
limit (PMF_COMPILE_BENCH_TIMEOUT seconds, default 900): a case past it is recorded as not finished.
Regional cases run first, so their rows exist even when the whole-loss baseline is cut off.
The whole-loss rows are the baseline of the regional rows at the same depth (speedup = baseline /
value). Measured on the device the bench runs on; a device-independent benchmark (cpu_ok).
Small run (PMF_BENCH_SMOKE=1, or a CPU without --full): the tiny preset at depths 2 and 3, in the pytest
process; --full on a CPU: B/16 at depths 10 and 16, whose whole-loss compile alone takes minutes.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.common import SMALL, SMOKE, device, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET, DEPTHS, BATCH = ("pMF-XS/4-test", (2, 3), 2) if SMALL else ("pMF-B/16", (10, 16), 2)
APPROACHES = ("regional", "whole-loss")          # regional first: its rows survive a cut-off baseline
TIMEOUT_S = float(os.environ.get("PMF_COMPILE_BENCH_TIMEOUT", "900"))


def measure(preset, approach, depth, batch):
    """One case in this process: {first_s, second_s, compile_s, graphs, blocks, ...}."""
    from torch._dynamo.utils import counters

    from pmf_fast.config import get_config
    from pmf_fast.dist import compile_blocks
    from pmf_fast.meanflow import pmf_loss, sample_draws
    from pmf_fast.model import PMFDiT

    dev = device()
    cuda = dev == "cuda"
    impl, backend = ("fast", "inductor") if cuda else ("eager", "aot_eager")
    aux = min(get_config(preset).model.aux_head_depth, depth)
    cfg = get_config(preset, [f"model.depth={depth}", f"model.aux_head_depth={aux}",
                              "objective.lpips_weight=0", "objective.convnext_weight=0"])
    m = cfg.model
    torch.manual_seed(0)
    model = PMFDiT(m).to(dev).set_impl(impl)
    torch._dynamo.reset()
    counters.clear()
    if approach == "regional":
        compile_blocks(model, backend=backend)
        loss_fn = pmf_loss
    else:
        loss_fn = torch.compile(pmf_loss, backend=backend)
    x = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=dev) * 2 - 1
    y = torch.randint(0, m.num_classes, (batch,), device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)

    def step():
        d = sample_draws(x, cfg.objective, gen, cpu_gen)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, _ = loss_fn(model, x, y, d, cfg.objective, m.num_classes, None, impl)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first = step()
    graphs_first = counters["stats"]["unique_graphs"]
    second = step()
    from torch._dynamo.utils import calculate_time_spent
    return dict(first_s=round(first, 2), second_s=round(second, 2), compile_s=round(first - second, 2),
                # Dynamo's own account (frame compiles + lazy backward compiles): free of step-time noise
                dynamo_compile_s=round(calculate_time_spent().get("total_wall_time", float("nan")), 2),
                graphs=graphs_first, graphs_after_second=counters["stats"]["unique_graphs"],
                blocks=len(model.blocks()), aux_head_depth=aux, backend=backend, impl=impl,
                dtype="bf16 autocast" if cuda else "fp32", batch=batch)


def run_case(approach, depth):
    """measure() in a fresh process, under TIMEOUT_S; {"error": ...} when it fails or runs out.
    Small run: in this process (after torch._dynamo.reset()), to spare CI the interpreter starts."""
    if SMALL:
        return measure(PRESET, approach, depth, BATCH)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    cmd = [sys.executable, "-m", "bench.bench_compile", PRESET, approach, str(depth), str(BATCH)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {TIMEOUT_S:.0f} s"}
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines:
        return {"error": f"exit {res.returncode}: {(res.stderr or res.stdout)[-300:]}"}
    out = json.loads(lines[-1])
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


@pytest.mark.cpu_ok
@pytest.mark.skipif(SMALL and not SMOKE, reason="compiling takes minutes on a CPU (95 s at the tiny preset on 2 "
                    "busy cores): pytest bench --full")
def test_first_step_compile_time(benchmark):
    group = "first-step compile (first minus second call)"
    results = {}
    for approach in APPROACHES:
        for depth in DEPTHS:
            r = results[approach, depth] = run_case(approach, depth)
            name = f"{PRESET} depth {depth} {approach}"
            if "error" in r:
                record(benchmark, group, f"{name}: failed", float("nan"), unit="s", depth=depth, error=r["error"])
                continue
            info = {k: v for k, v in r.items() if k != "compile_s"}
            prev = results.get((approach, DEPTHS[0]))
            if depth != DEPTHS[0] and prev and "error" not in prev:
                # growth with depth: compile seconds per block added
                added = r["blocks"] - prev["blocks"]
                info["s_per_added_block"] = round((r["compile_s"] - prev["compile_s"]) / added, 3)
            record(benchmark, group, f"{name} ({r['backend']})", r["compile_s"], None, unit="s", depth=depth, **info)
    # regional rows against the whole-loss baseline at the same depth, once both are known
    for depth in DEPTHS:
        reg, whole = results["regional", depth], results["whole-loss", depth]
        if "error" not in reg and "error" not in whole:
            record(benchmark, group, f"{PRESET} depth {depth} regional vs whole-loss ({reg['backend']})",
                   reg["compile_s"], None, ("whole-loss", whole["compile_s"]), unit="s", depth=depth)
    benchmark.pedantic(lambda: None, rounds=1)
    assert "error" not in results["regional", DEPTHS[0]] and "error" not in results["regional", DEPTHS[-1]], results


if __name__ == "__main__":                        # worker: python -m bench.bench_compile PRESET APPROACH DEPTH BATCH
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    preset, approach, depth, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(measure(preset, approach, depth, batch)), flush=True)
