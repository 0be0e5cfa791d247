"""Data for train.py: batches of images in [-1, 1] (NCHW, on the training device) and integer
labels, sharded by rank, with a position that checkpoints save and resume restores exactly.

    loader, n, num_classes = make_loader(data, image_size=256, batch_per_rank=32, rank=r, world_size=W, seed=0)
    x, y = next(loader);  state = loader.state_dict();  loader.load_state_dict(state)

`data` is "digits", a prepared dataset (python -m pmf_fast.data prepare SRC DST: the fast path, no
decoding) or an ImageFolder (decoded every epoch by PIL workers or DALI).
"""
import time

import torch

from ..dist import all_gather_objects
from .batches import ShardedBatches, mirror, mirror_mask  # noqa: F401 (mirror_mask: the data's public names)
from .dali import HAVE_DALI, DaliLoader
from .digits import load_digits_split
from .folder import FolderDataset, usable_images
from .shards import PreparedLoader, is_prepared, open_prepared


class Loader:
    """Endless batches from an in-memory (x, y) pair or a FolderDataset (read by DataLoader
    workers, which prefetch: the saved position counts batches handed out, not prefetched)."""

    def __init__(self, dataset, batches: ShardedBatches, device, num_workers=0, flip=False):
        self.dataset, self.batches, self.device, self.num_workers = dataset, batches, device, num_workers
        self.flip = flip
        self.epoch, self.index = 0, 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if isinstance(self.dataset, tuple):
            idx = self.batches.indices(self.epoch, self.index)
            x, y = self.dataset[0][idx], self.dataset[1][idx]
        else:
            if self._it is None:
                self._it = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.batches.stream(self.epoch, self.index),
                    num_workers=self.num_workers, pin_memory=self.device.type == "cuda"))
            x, y = next(self._it)
        if self.flip:
            x = mirror(x, self.batches, self.epoch, self.index)
        self.epoch, self.index = self.batches.next_pos(self.epoch, self.index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        self.epoch, self.index, self._it = s["epoch"], s["index"], None


def make_loader(data, *, image_size, batch_per_rank, rank=0, world_size=1, seed=0, device="cpu", num_workers=0,
                loader="auto", log=print, flip=False, micro=1):
    """data: "digits", a prepared dataset, or an ImageFolder directory. loader (folders only): "dali",
    "pil", or "auto" (DALI when installed). A prepared dataset is memory-mapped (num_workers: gather
    threads); a folder's unusable images are left out (a cached scan, shared out over the ranks).
    micro: micro-batches per rank (ShardedBatches; DALI's readers shard by rank, so there micro-batches
    are slices of the rank's batch, not a world_size * micro-rank run's images).
    Returns (loader, dataset size, num_classes)."""
    # the ranks must take the same branch: each has its own gathers (a folder's scan), or none
    kind = "digits" if data == "digits" else "a prepared dataset" if is_prepared(data) else "an image folder"
    kinds = all_gather_objects(kind)
    if len(set(kinds)) > 1:
        seen = "; ".join(f"ranks {[r for r, k in enumerate(kinds) if k == x]} see {x}" for x in sorted(set(kinds)))
        raise ValueError(f"train.data={data} differs between the ranks ({seen}): put it on storage every node sees, "
                         "the same on all of them")
    if data == "digits":
        (x, y), _ = load_digits_split(image_size)
        batches = ShardedBatches(len(y), batch_per_rank, rank, world_size, seed, micro)
        return Loader((x, y), batches, torch.device(device), flip=flip), len(y), 10
    if is_prepared(data):
        ds = open_prepared(data, image_size)
        m = ds.manifest
        log(f"data {data}: prepared, {len(ds)} images in {len(ds.classes)} classes at {ds.image_size} px from "
            f"{m['source']} ({len(m['unusable'])} unusable files left out when prepared); memory-mapped, no decoding")
        batches = ShardedBatches(len(ds), batch_per_rank, rank, world_size, seed, micro)
        return PreparedLoader(ds, batches, device, max(1, num_workers), flip), len(ds), len(ds.classes)
    scanned_at = time.time()                      # files modified after this are suspects if DALI fails
    files, labels, classes, report = usable_images(data)
    log(f"data {data}: {report}")
    if loader == "dali" or (loader == "auto" and HAVE_DALI):
        if len(files) < batch_per_rank * world_size:
            raise ValueError(f"dataset of {len(files)} images is smaller than one global batch; lower train.batch_size")
        return DaliLoader(files, labels, image_size, batch_per_rank, rank, world_size, seed, device,
                          num_threads=max(1, num_workers), flip=flip, scanned_at=scanned_at), len(files), len(classes)
    batches = ShardedBatches(len(files), batch_per_rank, rank, world_size, seed, micro)
    return Loader(FolderDataset(files, labels, image_size), batches, torch.device(device), num_workers, flip), \
        len(files), len(classes)
