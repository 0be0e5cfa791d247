"""Data for train.py: batches of images in [-1, 1] (NCHW, on the training device) and integer
labels, sharded by rank, with a position that checkpoints save and resume restores exactly.

    loader, n, num_classes = make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device)
    x, y = next(loader);  state = loader.state_dict();  loader.load_state_dict(state)
"""
import time

import torch

from .dali import HAVE_DALI, DaliLoader
from .digits import load_digits_split
from .folder import FolderDataset, usable_images


class ShardedBatches:
    """Batch `index` of `epoch`: a seeded permutation per epoch, cut into global batches, each
    rank taking every world_size-th index of its batch; the last incomplete batch is dropped."""

    def __init__(self, n, batch_per_rank, rank, world_size, seed):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world_size, seed
        self.per_epoch = n // (batch_per_rank * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_per_rank} per rank x {world_size} ranks); lower train.batch_size")

    def indices(self, epoch, index):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        start = index * self.batch * self.world
        return perm[start:start + self.batch * self.world][self.rank::self.world]

    def next_pos(self, epoch, index):
        return (epoch + 1, 0) if index + 1 == self.per_epoch else (epoch, index + 1)

    def stream(self, epoch, index):
        while True:
            yield self.indices(epoch, index).tolist()
            epoch, index = self.next_pos(epoch, index)


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
        if self.flip:                  # seeded by the data position: the same flips after a resume
            g = torch.Generator().manual_seed(self.batches.seed * 7919 + self.epoch * 100003 + self.index)
            mirror = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
        self.epoch, self.index = self.batches.next_pos(self.epoch, self.index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        self.epoch, self.index, self._it = s["epoch"], s["index"], None


def make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device, num_workers=0, loader="auto",
                log=print, flip=False):
    """data: "digits" or an ImageFolder directory. loader: "dali", "pil", or "auto" (DALI when
    installed). Unusable images are left out (cached scan) and counted in the log.
    Returns (loader, dataset size, num_classes)."""
    if data == "digits":
        (x, y), _ = load_digits_split(image_size)
        batches = ShardedBatches(len(y), batch_per_rank, rank, world_size, seed)
        return Loader((x, y), batches, torch.device(device), flip=flip), len(y), 10
    scanned_at = time.time()                      # files modified after this are suspects if DALI fails
    files, labels, classes, report = usable_images(data)
    log(f"data {data}: {report}")
    if loader == "dali" or (loader == "auto" and HAVE_DALI):
        if len(files) < batch_per_rank * world_size:
            raise ValueError(f"dataset of {len(files)} images is smaller than one global batch; lower train.batch_size")
        return DaliLoader(files, labels, image_size, batch_per_rank, rank, world_size, seed, device,
                          num_threads=max(1, num_workers), flip=flip, scanned_at=scanned_at), len(files), len(classes)
    batches = ShardedBatches(len(files), batch_per_rank, rank, world_size, seed)
    return Loader(FolderDataset(files, labels, image_size), batches, torch.device(device), num_workers, flip), \
        len(files), len(classes)
