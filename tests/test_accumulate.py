"""Gradient accumulation (train.micro_batch): W ranks x k micro-batches take the optimizer steps of
W x k ranks with one (the same images and draws per micro-batch, the same loss weighting), under DDP
and FSDP2 (CPU, gloo); the gradients are reduced once a step; a resume may change the split."""
import contextlib
import functools
import json
import os

import pytest
import torch

import train
from pmf_fast import dist as pdist
from pmf_fast.checkpoint import TrainState
from pmf_fast.config import ConfigError, get_config
from pmf_fast.data import ShardedBatches
from pmf_fast.model import PMFDiT
from tests.helpers import spawn_train, weights

B = 16                                         # global batch: 4 virtual ranks of 4 images


def args(tmp_path, name, parallel, *overrides):
    return ["--preset", "pMF-XS/4-test", "--name", name, f"train.out_dir={tmp_path}", "train.log_every=1",
            f"train.batch_size={B}", f"train.parallel={parallel}", "train.tensorboard=false", *overrides]


def record_reductions(out_dir, rank):
    """Set up in spawned rank `rank` before train.main (helpers.spawn_train): count the gradient
    reductions inside each micro-batch's forward and backward (dist.gradient_sync), DDP's through a
    comm hook, FSDP2's through its reduce-scatter calls. Returns the writer of record_<rank>.json."""
    count, blocks = [0], []
    real_sync, real_parallelize = pdist.gradient_sync, pdist.parallelize

    def counted(fn):
        def wrapper(*a, **kw):
            count[0] += 1
            return fn(*a, **kw)
        return wrapper

    def hook(state, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        count[0] += 1
        return allreduce_hook(state, bucket)

    def parallelize(*a, **kw):
        step_model = real_parallelize(*a, **kw)
        if isinstance(step_model, torch.nn.parallel.DistributedDataParallel):
            step_model.register_comm_hook(None, hook)
        return step_model

    @contextlib.contextmanager
    def gradient_sync(step_model, sync):
        before = count[0]
        with real_sync(step_model, sync):
            yield
        blocks.append([sync, count[0] - before])

    for name in ("reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter"):   # FSDP2's, by version
        if hasattr(torch.distributed, name):
            setattr(torch.distributed, name, counted(getattr(torch.distributed, name)))
    pdist.parallelize, pdist.gradient_sync = parallelize, gradient_sync

    def write():
        with open(os.path.join(out_dir, f"record_{rank}.json"), "w") as f:
            json.dump(blocks, f)
    return write


def losses(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")} for line in open(run_dir / "log.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ranks_times_micro_batches_take_the_same_steps(tmp_path, capsys, parallel):
    """4 ranks x 1, 2 ranks x 2 (resumed as 1 rank x 4 after its second step) and 1 rank x 4 give the same
    parameters and logged losses, to rounding; the 2 x 2 run reduces its gradients once a step."""
    spawn_train(4, args(tmp_path, "4x1", parallel, "train.steps=3"))
    spawn_train(2, args(tmp_path, "2x2", parallel, "train.steps=2", "train.micro_batch=4"),
                setup=functools.partial(record_reductions, str(tmp_path)))
    train.main(args(tmp_path, "1x4", parallel, "train.steps=3", "train.micro_batch=4"))
    capsys.readouterr()
    train.main(args(tmp_path, "2x2", parallel, "train.steps=3", "train.micro_batch=4"))      # the same name resumes
    assert "resuming 2 ranks x 2 micro-batches as 1 x 4: the same virtual ranks" in capsys.readouterr().out

    ref = weights(tmp_path / "4x1", 3)
    start = PMFDiT(get_config("pMF-XS/4-test").model).state_dict()
    for name in ("2x2", "1x4"):
        got = weights(tmp_path / name, 3)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, w=f"{name} {n}": f"{w}: {m}")
        for a, b in zip(losses(tmp_path / name), losses(tmp_path / "4x1")):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])) for k in a), (a, b)
    assert max((ref[n] - start[n]).abs().max().item() for n in ref) > 1e-3       # the steps moved the weights

    for rank in range(2):                          # per step: micro-batch 0 reduces nothing, micro-batch 1 does
        blocks = json.load(open(tmp_path / f"record_{rank}.json"))
        assert [sync for sync, _ in blocks] == [False, True] * 2, blocks
        assert all((n > 0) == sync for sync, n in blocks), blocks


def test_micro_batches_are_the_virtual_ranks_batches():
    """Micro-batch i of rank r is what rank r * k + i of a W * k-rank run reads, flips included."""
    from pmf_fast.data import mirror_mask
    for world, micro in [(1, 4), (2, 2), (1, 1), (2, 3)]:
        virtual = [ShardedBatches(96, 24 // (world * micro), v, world * micro, seed=3) for v in range(world * micro)]
        for r in range(world):
            mine = ShardedBatches(96, 24 // world, r, world, seed=3, micro=micro)
            for index in (0, 2):
                parts = mine.indices(1, index).chunk(micro)
                flips = mirror_mask(mine, 1, index).chunk(micro)
                for i in range(micro):
                    v = virtual[r * micro + i]
                    assert torch.equal(parts[i], v.indices(1, index)), (world, micro, r, i)
                    assert torch.equal(flips[i], mirror_mask(v, 1, index))


def test_micro_batch_that_does_not_divide_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch=3 must be 0 .* or divide train.batch_size=16"):
        get_config("pMF-XS/4-test", ["train.batch_size=16", "train.micro_batch=3"])
    with pytest.raises(ConfigError, match="does not divide the 4 images per rank"):
        train.check_fits(get_config().model, get_config("pMF-T/4-digits", ["train.batch_size=16",
                                                                            "train.micro_batch=8"]).train, 4)
    assert train.check_fits(get_config().model, get_config("pMF-T/4-digits", ["train.micro_batch=16"]).train, 1) == 4


class Position:
    """The loader's part of TrainState: a position only."""

    def __init__(self):
        self.pos = {"epoch": 0, "index": 0}

    def state_dict(self):
        return dict(self.pos)

    def load_state_dict(self, s):
        self.pos = dict(s)


def test_train_state_holds_every_virtual_ranks_streams():
    """Rank r of W x k starts with (and resumes into) the streams of virtual ranks r*k .. r*k+k-1; a
    checkpoint from before accumulation (one stream per rank) still resumes exactly."""
    one = TrainState(Position(), torch.device("cpu"), 42, 0, 1, micro=4)
    for g in one.gens + one.cpu_gens:
        torch.rand(3, generator=g)                                      # move every stream on
    saved = one.state_dict()
    logged = []
    half = TrainState(Position(), torch.device("cpu"), 42, 1, 2, micro=2)       # rank 1 of 2 x 2
    fresh = [torch.rand(3, generator=g) for g in half.gens]
    assert all(torch.equal(f, torch.rand(3, generator=torch.Generator().manual_seed(42 + v)))
               for f, v in zip(fresh, (2, 3)))                             # virtual ranks 2 and 3 from the start
    half.load_state_dict(saved, logged.append)
    assert logged == ["resuming 1 ranks x 4 micro-batches as 2 x 2: the same virtual ranks, the same steps"]
    for mine, theirs in zip(half.gens + half.cpu_gens, one.gens[2:] + one.cpu_gens[2:]):
        assert torch.equal(torch.rand(5, generator=mine), torch.rand(5, generator=theirs))
    old = {"step": 3, "ranks": [{"rng": one.gens[0].get_state(), "cpu_rng": one.cpu_gens[0].get_state(),
                                 "data": {"epoch": 1, "index": 2}}]}       # the format before accumulation
    again = TrainState(Position(), torch.device("cpu"), 42, 0, 1)
    again.load_state_dict(old, logged.append)
    assert torch.equal(torch.rand(5, generator=again.gens[0]), torch.rand(5, generator=one.gens[0]))
    assert again.loader.pos == {"epoch": 1, "index": 2} and len(logged) == 1
