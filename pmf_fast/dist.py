"""Distributed helpers for torchrun (env://): NCCL on GPU, gloo on CPU.

The model is not wrapped in DDP: the training step calls model.jvp (or torch.func.jvp), which
DDP's forward hooks do not see. Instead parameters are broadcast once from rank 0 and gradients
are averaged with bucketed all-reduces after backward, which works with every JVP path.
"""
import os

import torch
import torch.distributed as dist


def setup():
    """(rank, world_size, local_rank, device). Single process when not under torchrun."""
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 1, 0, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, local, device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def broadcast_params(model):
    if is_dist():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


@torch.no_grad()
def average_grads(params, bucket_numel=1 << 25):
    """All-reduce gradients in flat buckets of up to bucket_numel elements, then divide by world."""
    if not is_dist():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None and (not bucket or (size + g.numel() <= bucket_numel and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            for b, f in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(f.view_as(b))
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def all_reduce_mean(t):
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def barrier():
    if is_dist():
        dist.barrier()


def cleanup():
    if is_dist():
        dist.destroy_process_group()
