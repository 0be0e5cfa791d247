"""Data for train.py: batches of images in [-1, 1] (NCHW, on the training device) and integer
labels, sharded by rank, with a position that checkpoints save and resume restores exactly.

    loader, n, num_classes = make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device)
    x, y = next(loader);  state = loader.state_dict();  loader.load_state_dict(state)

`data` is "digits", a prepared dataset (python -m pmf_fast.data prepare SRC DST: the fast path, no
decoding) or an ImageFolder (decoded every epoch by PIL workers or DALI).
"""
import queue
import threading
import time

import numpy as np
import torch

from .dali import HAVE_DALI, DaliLoader
from .digits import load_digits_split
from .folder import FolderDataset, usable_images
from .prepared import is_prepared, open_prepared


class ShardedBatches:
    """Batch `index` of `epoch`: a seeded permutation per epoch, cut into global batches, each
    rank taking every world_size-th index of its batch; the last incomplete batch is dropped."""

    def __init__(self, n, batch_per_rank, rank, world_size, seed):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world_size, seed
        self.per_epoch = n // (batch_per_rank * world_size)
        self._perm = (None, None)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_per_rank} per rank x {world_size} ranks); lower train.batch_size")

    def indices(self, epoch, index):
        if self._perm[0] != epoch:           # one permutation per epoch (ImageNet: ~20 ms to draw)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        perm = self._perm[1]
        start = index * self.batch * self.world
        return perm[start:start + self.batch * self.world][self.rank::self.world]

    def next_pos(self, epoch, index):
        return (epoch + 1, 0) if index + 1 == self.per_epoch else (epoch, index + 1)

    def stream(self, epoch, index):
        while True:
            yield self.indices(epoch, index).tolist()
            epoch, index = self.next_pos(epoch, index)


def mirror(x, batches, epoch, index):
    """Flip images of the batch at (epoch, index) left-right with probability 1/2, seeded by the data
    position and drawn for the global batch (each rank takes its rows): the same flips after a resume,
    on any number of ranks, whichever loader reads the data."""
    g = torch.Generator().manual_seed(batches.seed * 7919 + epoch * 100003 + index)
    flip = (torch.rand(x.shape[0] * batches.world, generator=g) < 0.5)[batches.rank::batches.world].to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


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


class PreparedLoader:
    """Endless batches from a prepared dataset (pmf_fast/data/prepared.py) with the Loader interface.

    A background thread gathers each batch's images from the memory-mapped shards into one of `depth`
    uint8 NHWC buffers (pinned when CUDA is available, so the copy to the GPU is asynchronous); the
    consumer copies it to the device, where the conversion to float NCHW in [-1, 1] and the flip run.
    The images are those of the PIL loader bit for bit: the same crop, and FolderDataset's arithmetic.
    A buffer is refilled only after its copy to the device has completed (a CUDA event per buffer).
    `threads` > 1 gathers a batch with that many threads (page faults of a cold page cache overlap)."""

    def __init__(self, data, batches: ShardedBatches, device, threads=1, flip=False, depth=3):
        self.data, self.batches, self.device, self.flip = data, batches, torch.device(device), flip
        self.threads, self.depth = max(1, threads), depth
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        cuda = self.device.type == "cuda"
        s = data.image_size
        self.bufs = [torch.empty(batches.batch, s, s, 3, dtype=torch.uint8, pin_memory=cuda) for _ in range(depth)]
        self.events = [torch.cuda.Event() for _ in range(depth)] if cuda else None
        self.epoch, self.index = 0, 0
        self._thread = None

    def _produce(self, epoch, index, ready, free, stop):
        pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(self.threads)
        try:
            for idx in self.batches.stream(epoch, index):
                slot = free.get()
                if stop.is_set():
                    return
                if self.events is not None:
                    self.events[slot].synchronize()          # the previous copy out of this buffer is done
                out = self.bufs[slot].numpy()
                if pool is None:
                    self.data.gather(idx, out)
                else:
                    parts = np.array_split(np.arange(len(idx)), self.threads)
                    list(pool.map(lambda p: self.data.gather([idx[i] for i in p], out[p[0]:p[-1] + 1]),
                                  [p for p in parts if len(p)]))
                ready.put((slot, idx))
        except Exception as e:                               # raised again in the consumer
            ready.put((None, e))
        finally:
            if pool is not None:
                pool.shutdown()

    def _start(self):
        self._ready, self._free, self._stop = queue.Queue(), queue.Queue(), threading.Event()
        for slot in range(self.depth):
            self._free.put(slot)
        self._thread = threading.Thread(target=self._produce, daemon=True, name="prepared-loader",
                                        args=(self.epoch, self.index, self._ready, self._free, self._stop))
        self._thread.start()

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._free.put(0)                                # wake it if it waits for a buffer
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        slot, idx = self._ready.get()
        if slot is None:
            self._thread = None
            raise idx
        x = self.bufs[slot].to(self.device, non_blocking=True)
        if self.events is not None:
            self.events[slot].record()
        # the arithmetic of FolderDataset, on the device: the same floats bit for bit
        x = x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0       # on the CPU: a copy, buffer free
        self._free.put(slot)
        y = self.labels[idx].to(self.device, non_blocking=True)
        if self.flip:
            x = mirror(x, self.batches, self.epoch, self.index)
        self.epoch, self.index = self.batches.next_pos(self.epoch, self.index)
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        self.close()
        self.epoch, self.index = s["epoch"], s["index"]

    def __del__(self):
        self.close()


def make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device, num_workers=0, loader="auto",
                log=print, flip=False):
    """data: "digits", a prepared dataset, or an ImageFolder directory. loader (folders only): "dali",
    "pil", or "auto" (DALI when installed). A prepared dataset is memory-mapped (num_workers: gather
    threads); a folder's unusable images are left out (a cached scan, shared out over the ranks).
    Returns (loader, dataset size, num_classes)."""
    if data == "digits":
        (x, y), _ = load_digits_split(image_size)
        batches = ShardedBatches(len(y), batch_per_rank, rank, world_size, seed)
        return Loader((x, y), batches, torch.device(device), flip=flip), len(y), 10
    if is_prepared(data):
        ds = open_prepared(data, image_size)
        m = ds.manifest
        log(f"data {data}: prepared, {len(ds)} images in {len(ds.classes)} classes at {ds.image_size} px from "
            f"{m['source']} ({len(m['unusable'])} unusable files left out when prepared); memory-mapped, no decoding")
        batches = ShardedBatches(len(ds), batch_per_rank, rank, world_size, seed)
        return PreparedLoader(ds, batches, device, max(1, num_workers), flip), len(ds), len(ds.classes)
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
