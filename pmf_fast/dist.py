"""torchrun setup and parallelism from PyTorch's own machinery, applied block by block from outside
the model (as torchtitan's parallelize does): activation checkpointing, torch.compile per block,
then DDP or FSDP2. NCCL on GPU, gloo on CPU.

Every block takes the tangent through its module call (pmf_fast/layers.py), so the hooks these
wrappers hang on `__call__` see every use of every parameter, on the JVP pass as on the primal one.
"""
import contextlib
import datetime
import os
import shutil
import socket
import sys

import torch
import torch.distributed as dist

# The agreed set-up steps and the small gathers of Python objects (all_gather_objects: stops, saves,
# resumes) run on a CPU (gloo) group of their own, with a timeout long enough for a step one rank
# takes while the others wait: rank 0 computing the FID reference of ImageNet's 1.28 M images, an
# ImageFolder scan. On the default NCCL group they would end at its 10-minute collective timeout.
# Across nodes gloo needs a routable interface, as NCCL does (GLOO_SOCKET_IFNAME, docs/multinode.md).
OBJECTS_TIMEOUT = datetime.timedelta(hours=2)
_objects_group = None                       # made by setup(); None: the default group (a test's own gloo group)


def setup():
    """(rank, world_size, local_rank, device). Single process when not under torchrun."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 1, 0, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    # torchrun keeps one store across restarts (--max-restarts): without a prefix per attempt, a
    # restarted rank can read the address a killed rank of the previous attempt left there (seen
    # on CPU with gloo: "connectFullMesh failed ... Connection refused" after a kill -9)
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    global _objects_group
    _objects_group = dist.new_group(backend="gloo", timeout=OBJECTS_TIMEOUT)
    return rank, world, local, device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_dist() else 1


# ----------------------------------------------------------------------------- parallelism
def apply_checkpointing(model):
    """Recompute each transformer block in backward instead of keeping its activations. The
    composable form (hooks, no wrapper module) keeps every parameter name, so checkpoints and
    state dicts are the same with and without it."""
    from torch.distributed._composable import checkpoint
    for block in model.blocks():
        checkpoint(block)


def compile_blocks(model, backend="inductor"):
    """Regional compilation: torch.compile each transformer block in place (`block.compile`, so
    parameter names and state dicts are unchanged and hooks on `__call__` stay outside the
    compiled region). Compile time is then that of one block, not of the whole depth.

    Why every block shares one graph per mode. Dynamo traces `TransformerBlock.forward` and keeps
    its compiled graphs in a cache on that function's code object, which all blocks share; nn
    modules are inlined (inline_inbuilt_nn_modules, always on since torch 2.5), so a block's
    parameters are graph inputs and its guards check the module's type and attributes, not its
    identity. A second block of the same class therefore passes the first one's guards and runs its
    graph. The modes of one training step are three graphs: primal under no_grad (the CFG targets'
    v-head at batch 2B), primal with grad (the v-head at batch B) and tangent (x_dot given: the
    shared trunk and u-head). tests/test_compile.py counts them at two depths.

    dynamic=False: every graph is specialised to its shapes. With Dynamo's default (automatic
    dynamic shapes) the grad primal graph, seen after the no_grad one at another batch size, came
    out with a symbolic batch while the other two were static; static graphs give inductor fixed
    sizes and make the count exact (3 per batch size). The cost is 3 more graphs for each new batch
    size, against the per-code-object recompile limit (torch._dynamo.config.recompile_limit,
    default 8): a fixed training batch uses 3.
    fullgraph=True: a graph break inside a block is an error, not a silent split."""
    for block in model.blocks():
        block.compile(backend=backend, fullgraph=True, dynamic=False)


def step_settings(tc, device, log=print):
    """(impl, bf16, compiled) of train.impl / precision / compile on this device, the one place they are
    decided: fast, bf16 autocast and per-block compile on CUDA; eager and fp32 on a CPU. Blocks run
    eager on a CPU without a C++ compiler (said in one line). TF32 matmuls on CUDA (bf16 autocast
    leaves fp32 matmuls, e.g. the optimizers', to it)."""
    impl = tc.impl if tc.impl != "auto" else ("fast" if device.type == "cuda" else "eager")
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    compiled = tc.compile == "blocks" or (tc.compile == "auto" and impl == "fast")
    if compiled and device.type == "cpu" and not cxx_compiler():
        log("train.compile: no C++ compiler for torch.compile on the CPU (g++, or set $CXX); blocks run eager")
        compiled = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return impl, bf16, compiled


def cxx_compiler():
    """The C++ compiler inductor builds CPU kernels with ($CXX, else g++; clang++ on macOS), or None."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


def apply_fsdp(model, device, shard_size=0):
    """FSDP2: fully_shard each block, then the root (embedders, tokens, final layers). shard_size 0
    shards over all ranks; a divisor of the world size gives HSDP on a 2-D mesh (replicate across
    groups of shard_size ranks, shard within them), as the official code's HSDP branch.
    Parameters stay fp32 (compute is bf16 under autocast either way) and gradients are reduced in
    fp32, so Muon sees the same fp32 gradient as on one rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    world = dist.get_world_size()
    if shard_size in (0, world):
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    else:
        if world % shard_size:
            raise ValueError(f"train.shard_size={shard_size} does not divide the {world} ranks")
        mesh = init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def parallelize(model, *, compile, parallel="ddp", checkpointing="none", shard_size=0, device=None):
    """The module the training step calls: `model` itself (one rank, or FSDP2 in place) or its DDP
    wrapper. Order as torchtitan: checkpointing, then compile (step_settings decides it), then data
    parallelism."""
    if checkpointing == "blocks":
        apply_checkpointing(model)
    if compile:
        compile_blocks(model)
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        return apply_fsdp(model, device, shard_size)
    # DDP broadcasts rank 0's parameters at construction; the RoPE tables are constants, so no
    # buffer broadcast on every forward
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(step_model, sync):
    """The backward passes inside reduce their gradients over the ranks (sync) or only add them up on
    each rank: gradient accumulation runs every micro-batch but the last with sync=False, so a step
    reduces once, as without accumulation (DDP's no_sync; FSDP2's set_requires_gradient_sync, whose
    unsharded gradients then stay on each rank until the last micro-batch)."""
    if sync or not hasattr(step_model, "no_sync") and not hasattr(step_model, "set_requires_gradient_sync"):
        yield                                # one process (also under torchrun): nothing is reduced
    elif isinstance(step_model, torch.nn.parallel.DistributedDataParallel):
        with step_model.no_sync():
            yield
    else:
        step_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------- agreement
def is_dtensor(t):
    """A DTensor (a parameter or state sharded by FSDP2), told by type name: no import of
    torch.distributed.tensor on processes that never shard."""
    return type(t).__name__ == "DTensor"


def full_tensor(t):
    """A whole tensor from a DTensor shard (a collective: every rank must call it), else t."""
    return t.full_tensor() if is_dtensor(t) else t


def agree_max(values, device):
    """The maximum over ranks of each value (floats or 0-d tensors on `device`), in one
    all-reduce: every decision to stop, skip or save is taken from these, never from one rank's
    clock or state. A host sync: call it every few steps, not every step."""
    t = torch.stack([v.float().reshape(()) if torch.is_tensor(v) else torch.tensor(float(v), device=device)
                     for v in values]).to(device)
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(t):
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] on one process)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_objects_group)
    return out


class RankFailed(RuntimeError):
    """Another rank failed a step that every rank takes; the message is that rank's line."""


@contextlib.contextmanager
def agreed(what):
    """`with agreed("the data set-up"): ...` on every rank: when the block fails on any rank, every rank
    stops (its own error where it failed, RankFailed with the first failing rank's line elsewhere), so
    none is left waiting in a later collective (until NCCL's timeout aborts it) for a rank that has gone.
    A collective inside the block must only follow code that cannot fail on one rank alone, or nested
    `agreed` blocks around it (the data scan's gathers do this): a rank that failed before it would meet
    the others' collective with its own. One all-gather of a small object on the objects group."""
    try:
        yield
    except Exception as e:
        agree_on_failure(e, what)
        raise
    agree_on_failure(None, what)


def agree_on_failure(error, what):
    """Every rank passes its error of `what` (None when it went well): on a rank that did not fail,
    raises RankFailed with the first failing rank's line; a failing rank raises its own after this."""
    views = all_gather_objects(None if error is None else (socket.gethostname(), str(error) or type(error).__name__))
    failed = [(rank, view) for rank, view in enumerate(views) if view is not None]
    if failed and error is None:
        rank, (host, msg) = failed[0]
        raise RankFailed(f"rank {rank} on {host} failed in {what}: {msg}")


def barrier():
    if is_dist():
        dist.barrier()


def cleanup(wait=True):
    """End of a run on every rank: wait for all, then tear down. Without the barrier a rank that is done
    first closes its connections while another still works (rank 0 sampling, saving), and gloo can
    abort a peer that is still finishing (SIGABRT, "terminate called without an active exception").
    wait=False (a rank leaving on an error): nothing. The barrier may never be reached by the others,
    and NCCL's destroy_process_group is itself collective (it flushes pending collectives first,
    pytorch#141510): the process's exit tears the group down, and torchrun stops the other ranks."""
    global _objects_group
    if is_dist() and wait:
        dist.barrier()
        dist.destroy_process_group()                # every group, the objects group too
        _objects_group = None
