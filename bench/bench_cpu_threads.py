"""Steps/s of the default CPU run's training step (pMF-T/4-digits: data, loss, backward, Muon +
NAdamW, EMAs; eager, fp32), idle and beside a one-core busy loop, for each way of setting the
threads, in one run (pmf_fast/threads.py says why the default collapses under load):

    today           torch's default: one intra-op thread per core
    1 thread        torch.set_num_threads(1)
    tuner           pmf_fast.threads.ThreadTuner (its trials are in the time)
    passive         today's count with OMP_WAIT_POLICY=PASSIVE: waiting threads sleep instead of spinning
    passive+tuner   both

OpenMP reads OMP_WAIT_POLICY when torch loads it, so the cases run in two worker processes (the
default one and a PASSIVE one), each building the step once. A shared machine's load drifts, so the
cases are interleaved: ROUNDS rounds of (idle: every case for SECONDS, then the same beside the busy
loop), and a case's rate is its steps over its seconds summed over the rounds. Each row's baseline is
`today` under the same load. Targets: under load >= half today's idle rate, idle no slower than today.
Runs with --full or when PMF_THREADS_BENCH_S (seconds per case, default 2) is set;
PMF_THREADS_BENCH_ROUNDS (default 1) rounds. bench/README.md says how long the full run takes;
bench/results/2026-12-01_cpu_threads.md holds the recorded runs.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.common import FULL, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(os.environ.get("PMF_THREADS_BENCH_S", "2"))
ROUNDS = int(os.environ.get("PMF_THREADS_BENCH_ROUNDS", "1"))
SETTINGS = {"today": "", "1 thread": "", "tuner": "", "passive": "PASSIVE", "passive+tuner": "PASSIVE"}  # wait policy


def digits_step():
    """One training step of the default CPU run, as train.py runs it, as a closure."""
    from pmf_fast.config import DEFAULT_PRESET, get_config
    from pmf_fast.data import make_loader
    from pmf_fast.ema import EMAs
    from pmf_fast.meanflow import pmf_loss, sample_draws
    from pmf_fast.model import PMFDiT
    from pmf_fast.optimizers import build_optimizers
    cfg = get_config(DEFAULT_PRESET)
    m, o, tc = cfg.model, cfg.objective, cfg.train
    torch.manual_seed(0)
    loader, _, _ = make_loader("digits", image_size=m.image_size, batch_per_rank=tc.batch_size, log=lambda s: None)
    model = PMFDiT(m, t_eps=o.t_eps).set_impl("eager")
    optimizers = build_optimizers(model, cfg.optim)
    emas = EMAs(model, tc.ema_halflives_kimg, tc.batch_size)
    gen = torch.Generator().manual_seed(0)
    count = [0]

    def step():
        x, y = next(loader)
        loss, _ = pmf_loss(model, x, y, sample_draws(x, o, gen), o, m.num_classes, None, "eager")
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        count[0] += 1
        emas.update(model, count[0])
    return step


def worker():
    """Read `SETTING SECONDS` lines, run that many seconds (and at least one step) of the step with
    that setting, answer a JSON line; a tuner lives across the lines (paused between them)."""
    from pmf_fast.threads import ThreadTuner
    step, default, tuner = digits_step(), torch.get_num_threads(), None
    step()                                                     # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        setting, seconds = line.rsplit(" ", 1)
        if setting.endswith("tuner"):
            tuner = tuner or ThreadTuner((1, default))            # not the count the last case left
            tuner.pause()
            torch.set_num_threads(tuner.current)          # the other cases of this worker changed it
            tuner.step()
        else:
            torch.set_num_threads(1 if setting == "1 thread" else default)
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < float(seconds):
            step()
            if setting.endswith("tuner"):
                tuner.step()
            n += 1
        out = dict(steps=n, seconds=time.perf_counter() - t0, threads=torch.get_num_threads())
        if setting.endswith("tuner"):
            out["trials"] = [[c, {k: round(1e3 * v) for k, v in m.items()}, why] for c, m, why in tuner.trials]
        print(json.dumps(out), flush=True)


def start_worker(wait_policy):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OMP_NUM_THREADS", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_cpu_threads"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the digits-step worker (OMP_WAIT_POLICY={wait_policy or 'unset'}) did not start")
    return proc


def measure(loads=("idle", "busy"), seconds=SECONDS, rounds=ROUNDS):
    """{(setting, load): {"steps", "seconds", ...}} summed over interleaved rounds."""
    workers = {p: start_worker(p) for p in sorted(set(SETTINGS.values()))}
    totals = {}
    try:
        for _ in range(rounds):
            for load in loads:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
                try:
                    for setting, policy in SETTINGS.items():
                        w = workers[policy]
                        w.stdin.write(f"{setting} {seconds}\n")
                        w.stdin.flush()
                        r = json.loads(w.stdout.readline())
                        t = totals.setdefault((setting, load), dict(steps=0, seconds=0.0))
                        t["steps"] += r.pop("steps")
                        t["seconds"] += r.pop("seconds")
                        t.update(r)
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait(timeout=60)
    return totals


@pytest.mark.cpu_ok
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is no thread count to choose")
@pytest.mark.skipif(not (FULL or "PMF_THREADS_BENCH_S" in os.environ),
                    reason="today's setting takes 13 s a step on a busy 2-core machine: pytest bench --full, or "
                    "PMF_THREADS_BENCH_S=<seconds per case> pytest bench/bench_cpu_threads.py")
def test_cpu_threads_under_load(benchmark):
    if os.environ.get("OMP_NUM_THREADS"):
        pytest.skip("OMP_NUM_THREADS is set: unset it to compare thread counts")
    loads = ("idle", "busy")
    results = measure(loads)
    rate = {k: r["steps"] / r["seconds"] for k, r in results.items()}
    for load in loads:
        for setting in SETTINGS:
            r = results[setting, load]
            record(benchmark, "cpu threads (digits step)", f"{setting}, {load}", 1e3 / rate[setting, load],
                   unit="ms/step", baseline=(f"today, {load}", 1e3 / rate["today", load]),
                   steps_per_s=round(rate[setting, load], 3),
                   vs_today_idle=round(rate[setting, load] / rate["today", "idle"], 3), seconds_per_case=SECONDS,
                   rounds=ROUNDS, cpus=os.cpu_count(), load_avg=round(os.getloadavg()[0], 2), **r)
    benchmark.pedantic(lambda: None, rounds=1)


if __name__ == "__main__":                          # worker: reads `SETTING SECONDS` lines
    worker()
