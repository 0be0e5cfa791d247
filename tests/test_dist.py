"""Data parallelism on PyTorch's engines (CPU, gloo, 2 and 3 processes): DDP and FSDP2 take the
same optimizer steps as one process over the same global batch, Muon's Newton-Schulz shared out
over ranks gives the single-rank update, and train.py runs and resumes under torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmf_fast.dist import parallelize
from pmf_fast.meanflow import pmf_loss
from pmf_fast.optimizers import Muon, build_optimizers
from tests.helpers import ROOT, assert_close_by_rule, gloo_group, part, problem, rank_slice, train_steps, whole_params

pytestmark = pytest.mark.slow                  # process launches or compiles: not the fast lane


def _worker(rank, world, init_file, out_dir, parallel, shard_size):
    with gloo_group(rank, world, init_file):
        torch.set_num_threads(1)
        params, losses = train_steps(rank, world, parallel, shard_size=shard_size)
        dist.all_reduce(losses)
        if rank == 0:
            torch.save({"params": params, "losses": losses / world}, os.path.join(out_dir, "out.pt"))


@pytest.mark.parametrize("parallel, world, shard_size", [("ddp", 2, 0), ("fsdp", 2, 0), ("fsdp", 3, 0), ("fsdp", 4, 2)],
                         ids=["ddp-2", "fsdp-2", "fsdp-3", "hsdp-2x2"])
def test_data_parallel_equals_one_process(tmp_path, one_process_steps, parallel, world, shard_size):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), parallel, shard_size), nprocs=world)
    got = torch.load(tmp_path / "out.pt")
    (p64, l64), (p32, l32) = one_process_steps
    assert_close_by_rule(got["losses"], l64, l32, "losses")
    for n in p64:
        assert_close_by_rule(got["params"][n], p64[n], p32[n], f"{parallel} x{world} {n}", relative_atol=True)
    moved = max((p64[n] - problem(torch.float64)[1].state_dict()[n]).abs().max().item() for n in p64)
    assert moved > 1e-3                                     # the steps did change the weights


def test_activation_checkpointing_equals_none(one_process_steps):
    (p64, l64), (p32, l32) = one_process_steps
    params, losses = train_steps(0, 1, "ddp", checkpointing="blocks")
    assert_close_by_rule(losses, l64, l32, "losses")
    for n in p64:
        assert_close_by_rule(params[n], p64[n], p32[n], f"checkpointed {n}", relative_atol=True)


# ----------------------------------------------------------------------------- distributed Muon
def _muon_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        out = muon_steps()
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "muon.pt"))


def muon_steps(distributed=None, dtype=torch.float32):
    torch.manual_seed(0)
    shapes = [(24, 40)] * 3 + [(40, 24)] * 2 + [(16, 16)] * 4 + [(8, 56)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = Muon(params, lr=0.05, distributed=distributed)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_muon_equals_single_rank(tmp_path, world):
    mp.spawn(_muon_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    got = torch.load(tmp_path / "muon.pt")
    ref64, ref32 = muon_steps(dtype=torch.float64), muon_steps()
    for i, (g, r64, r32) in enumerate(zip(got, ref64, ref32)):
        assert_close_by_rule(g, r64, r32, f"matrix {i}")


# ----------------------------------------------------------------------------- train.py under torchrun
def torchrun(tmp_path, name, *overrides, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "train.py"), "--preset", "pMF-XS/4-test", "--name", name,
           f"train.out_dir={tmp_path}", "train.log_every=1", "train.batch_size=16", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def log_of(tmp_path, name):
    return [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_and_resume_under_torchrun(tmp_path, parallel):
    res = torchrun(tmp_path, "full", "train.steps=4", f"train.parallel={parallel}")
    assert "2 ranks" in res.stdout
    full = log_of(tmp_path, "full")
    assert [l["step"] for l in full] == [1, 2, 3, 4]           # one log line per step: rank 0 only
    torchrun(tmp_path, "split", "train.steps=2", f"train.parallel={parallel}")
    torchrun(tmp_path, "split", "train.steps=4", f"train.parallel={parallel}")   # the same command resumes
    split = log_of(tmp_path, "split")
    keys = [k for k in full[0] if k.startswith("loss")]
    assert [{k: l[k] for k in keys} for l in split] == [{k: l[k] for k in keys} for l in full]   # exact
    suffix = "dcp" if parallel == "fsdp" else "pt"
    assert sorted(os.listdir(tmp_path / "split")).count(f"ckpt_00000004.{suffix}") == 1


def _skip_worker(rank, world, init_file, out_dir, parallel):
    """train.nonfinite=skip on several ranks: a step whose loss is NaN still runs the backward that
    DDP / FSDP2 set up in the forward (its gradients NaN), then drops its gradients; the next step works."""
    with gloo_group(rank, world, init_file):
        cfg, model, x, y, draws = problem()
        step_model = parallelize(model, compile=False, parallel=parallel, device=torch.device("cpu"))
        opts = build_optimizers(model, cfg.optim)
        sl = rank_slice(rank, world)
        before = whole_params(model)
        loss, _ = pmf_loss(step_model, x[sl], y[sl], part(draws[0], sl), cfg.objective, cfg.model.num_classes)
        (loss * float("nan")).backward()                              # what train.py does on a skipped step
        assert any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opts.zero_grad()
        loss, _ = pmf_loss(step_model, x[sl], y[sl], part(draws[1], sl), cfg.objective, cfg.model.num_classes)
        loss.backward()
        opts.step()
        after = whole_params(model)
        if rank == 0:
            torch.save({"before": before, "after": after}, os.path.join(out_dir, "skip.pt"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_skipped_step_leaves_ddp_and_fsdp_working(tmp_path, parallel):
    mp.spawn(_skip_worker, args=(2, str(tmp_path / "init"), str(tmp_path), parallel), nprocs=2)
    got = torch.load(tmp_path / "skip.pt")
    assert all(torch.isfinite(v).all() for v in got["after"].values())
    assert any(not torch.equal(got["before"][n], got["after"][n]) for n in got["before"])


def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path, capsys):
    """FSDP2 on 2 ranks writes a torch.distributed.checkpoint; one process continues it (DCP reshards)."""
    import train
    torchrun(tmp_path, "dcp", "train.steps=2", "train.parallel=fsdp")
    train.main(["--preset", "pMF-XS/4-test", "--name", "dcp", f"train.out_dir={tmp_path}", "train.log_every=1",
                "train.batch_size=16", "train.parallel=fsdp", "train.steps=3"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "from a 2-rank run: fresh random streams" in out
    assert [l["step"] for l in log_of(tmp_path, "dcp")] == [1, 2, 3]
    assert os.path.isdir(tmp_path / "dcp" / "ckpt_00000003.dcp")


# ----------------------------------------------------------------------------- a long agreed step
def _slow_agreed_step(rank, world, port, out_dir, objects_group):
    """Rank `rank` of a torchrun-like process set (dist.setup from the environment) whose default group
    times out after 3 s; rank 0 takes 6 s inside an agreed step while rank 1 waits in its gather."""
    import datetime
    import time

    from pmf_fast import dist as D
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    real_init = dist.init_process_group
    dist.init_process_group = lambda *a, **kw: real_init(*a, **kw, timeout=datetime.timedelta(seconds=3))
    D.OBJECTS_TIMEOUT = datetime.timedelta(seconds=60)
    if not objects_group:                                      # the control: gathers on the default group
        dist.new_group = lambda *a, **kw: None
    D.setup()
    try:
        with D.agreed("a slow set-up step"):
            if rank == 0:
                time.sleep(6)
        outcome = "ok"
    except Exception as e:
        outcome = type(e).__name__
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


@pytest.mark.parametrize("objects_group", [True, False])
def test_agreed_steps_outlast_the_default_groups_timeout(tmp_path, objects_group):
    """A set-up step one rank takes while the others wait (rank 0's FID reference) outlasts NCCL's
    10-minute timeout on a real run: the agreed gathers run on dist's gloo group with OBJECTS_TIMEOUT.
    Here the default group times out at 3 s and rank 0 takes 6 s; without that group, it fails."""
    from tests.helpers import free_port
    mp.start_processes(_slow_agreed_step, args=(2, free_port(), str(tmp_path), objects_group), nprocs=2,
                       start_method="fork")
    outcomes = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    if objects_group:
        assert outcomes == ["ok", "ok"]
    else:
        assert outcomes[1] != "ok", outcomes                   # rank 1's gather timed out
