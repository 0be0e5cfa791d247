"""Two CPU processes (gloo): gradient averaging, and train.py under torchrun."""
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmf_fast.dist import average_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape)
    local = [p.grad.clone() for p in params]
    average_grads(params, bucket_numel=10)          # small buckets: several all-reduces
    torch.save({"local": local, "avg": [p.grad for p in params]}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_average_grads(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    for a, b, l0, l1 in zip(r0["avg"], r1["avg"], r0["local"], r1["local"]):
        assert torch.equal(a, b) and torch.allclose(a, (l0 + l1) / 2)


def test_train_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "train.py"), "--preset", "pMF-XS/4-test", "--name", "ddp",
           f"train.out_dir={tmp_path}", "train.steps=3", "train.log_every=1", "train.batch_size=16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 ranks" in res.stdout
    log = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    assert [l["step"] for l in log] == [1, 2, 3]             # one log line per step: rank 0 only
    ckpt = torch.load(tmp_path / "ddp" / "ckpt_00000003.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])   # per-rank draws
