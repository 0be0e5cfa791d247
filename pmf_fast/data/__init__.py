"""Data for train.py: batches of images in [-1, 1] (NCHW, on the training device) and integer
labels, sharded by rank, with a position that checkpoints save and resume restores exactly.

    loader, n, num_classes = make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device)
    x, y = next(loader);  state = loader.state_dict();  loader.load_state_dict(state)

`data` is "digits", a prepared dataset (python -m pmf_fast.data prepare SRC DST: the fast path, no
decoding) or an ImageFolder (decoded every epoch by PIL workers or DALI).
"""
import functools
import queue
import threading
import time
import weakref

import numpy as np
import torch

from .dali import HAVE_DALI, DaliLoader
from .digits import load_digits_split
from .folder import FolderDataset, usable_images
from .prepared import is_prepared, open_prepared


class ShardedBatches:
    """Batch `index` of `epoch`: a seeded permutation per epoch, cut into global batches, each
    rank taking every world_size-th index of its batch; the last incomplete batch is dropped.
    micro > 1 (gradient accumulation): the rank's batch is `micro` micro-batches one after another,
    micro-batch i holding what rank rank * micro + i of a world_size * micro-rank run takes."""

    def __init__(self, n, batch_per_rank, rank, world_size, seed, micro=1):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world_size, seed
        self.micro = micro
        self.per_epoch = n // (batch_per_rank * world_size)
        self._perm = (None, None)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_per_rank} per rank x {world_size} ranks); lower train.batch_size")

    def indices(self, epoch, index):
        if self._perm[0] != epoch:           # one permutation per epoch: ImageNet's takes 91 ms to draw (2 cores)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        perm = self._perm[1]
        start = index * self.batch * self.world
        return self.mine(perm[start:start + self.batch * self.world])

    def mine(self, rows):
        """This rank's rows of a global batch's: virtual rank v of world * micro takes rows v, v + world *
        micro, ...; this rank's micro-batches are virtual ranks rank * micro ... rank * micro + micro - 1."""
        return rows.view(-1, self.world, self.micro)[:, self.rank].T.flatten()

    def next_pos(self, epoch, index):
        return (epoch + 1, 0) if index + 1 == self.per_epoch else (epoch, index + 1)

    def stream(self, epoch, index):
        while True:
            yield self.indices(epoch, index).tolist()
            epoch, index = self.next_pos(epoch, index)


def mirror_mask(batches, epoch, index):
    """Which images of this rank's batch at (epoch, index) are flipped left-right (probability 1/2):
    seeded by the data position and drawn for the global batch (each rank takes its rows), so the
    flips are the same after a resume, on any number of ranks, whichever loader reads the data."""
    g = torch.Generator().manual_seed(batches.seed * 7919 + epoch * 100003 + index)
    return batches.mine(torch.rand(batches.batch * batches.world, generator=g) < 0.5)


def mirror(x, batches, epoch, index):
    flip = mirror_mask(batches, epoch, index).to(x.device)
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

    A background thread gathers each batch's images from the memory-mapped shards (flipping the
    chosen ones as it copies them) into one of `depth` uint8 NHWC buffers, pinned when CUDA is
    available. On a GPU the consumer copies the buffer over asynchronously (uint8: a quarter of the
    bytes of float) and converts it there; a CUDA event per buffer keeps the thread from refilling it
    before its copy is done. On the CPU the thread converts too, so the consumer only takes the
    batch. The floats are FolderDataset's bit for bit: the same crop, the same arithmetic.
    `threads` > 1 splits each batch over that many threads (page faults of a cold page cache and the
    CPU conversion overlap; numpy and torch release the GIL)."""

    def __init__(self, data, batches: ShardedBatches, device, threads=1, flip=False, depth=3):
        self.data, self.batches, self.device, self.flip = data, batches, torch.device(device), flip
        self.threads, self.depth = max(1, threads), depth
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.cuda = self.device.type == "cuda"
        s = data.image_size
        self.bufs = [torch.empty(batches.batch, s, s, 3, dtype=torch.uint8, pin_memory=self.cuda)
                     for _ in range(depth)]
        self.events = [torch.cuda.Event() for _ in range(depth)] if self.cuda else None
        # on the GPU the floats come from a table made by FolderDataset's arithmetic on the CPU: CUDA
        # divides by a scalar as a multiply by its reciprocal, which can be an ulp off
        self.lut = (torch.arange(256, dtype=torch.float32) / 127.5 - 1.0).to(self.device) if self.cuda else None
        self.epoch, self.index = 0, 0
        self._thread = None

    def _start(self):
        ready, free, stop = queue.Queue(), queue.Queue(), threading.Event()
        for slot in range(self.depth):
            free.put(slot)
        # the thread holds no reference to the loader: a dropped loader is collected, and the
        # finalizer (also run at exit) stops its thread
        args = (self.data, self.batches, self.bufs, self.events, self.flip, self.threads, self.epoch, self.index,
                ready, free, stop, self.device)
        thread = threading.Thread(target=_produce, args=args, daemon=True, name="prepared-loader")
        thread.start()
        self._thread, self._ready, self._free = thread, ready, free
        self._finalizer = weakref.finalize(self, _stop, thread, stop, free)

    def close(self):
        if self._thread is not None:
            self._finalizer()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        slot, x, idx = self._ready.get()
        if slot is None:
            self.close()
            raise x
        if self.cuda:
            x = self.bufs[slot].to(self.device, non_blocking=True)
            self.events[slot].record()
            x = self.lut.take(x.permute(0, 3, 1, 2).contiguous().long())
        self._free.put(slot)                              # at most `depth` batches are ever prepared ahead
        y = self.labels[idx].to(self.device, non_blocking=True)
        self.epoch, self.index = self.batches.next_pos(self.epoch, self.index)
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s):
        self.close()
        self.epoch, self.index = s["epoch"], s["index"]


def _fill(data, buf, idx, flip, x, rows):
    """Rows `rows` of a batch: gather the images idx (flipped where asked) into the uint8 buffer;
    with x (CPU), also convert them into x."""
    sl = slice(rows.start, rows.stop)
    data.gather([idx[i] for i in rows], buf.numpy()[sl])
    for i in rows:
        if flip[i]:
            buf[i] = buf[i].flip(1)                            # W of HWC
    if x is not None:                 # FolderDataset's arithmetic, in place, image by image (in cache: -30%)
        for i in rows:
            x[i].copy_(buf[i].permute(2, 0, 1)).div_(127.5).sub_(1.0)


def _produce(data, batches, bufs, events, flip, threads, epoch, index, ready, free, stop, device):
    """The gather thread of PreparedLoader: batches from (epoch, index) on, into free buffers."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    b, s = batches.batch, data.image_size
    parts = [range(b * t // threads, b * (t + 1) // threads) for t in range(threads)]
    if events is not None:
        torch.cuda.set_device(device)                  # a new thread starts on GPU 0: no context there on rank r
    try:
        while True:
            idx = batches.indices(epoch, index).tolist()
            mask = mirror_mask(batches, epoch, index).tolist() if flip else [False] * b
            slot = free.get()
            if stop.is_set():
                return
            if events is not None:
                events[slot].synchronize()                     # the previous copy out of this buffer is done
            x = None if events is not None else torch.empty(b, 3, s, s)
            if pool is None:
                _fill(data, bufs[slot], idx, mask, x, parts[0])
            else:
                list(pool.map(functools.partial(_fill, data, bufs[slot], idx, mask, x), parts))
            ready.put((slot, x, idx))
            epoch, index = batches.next_pos(epoch, index)
    except Exception as e:                                     # raised again in the consumer
        ready.put((None, e, None))
    finally:
        if pool is not None:
            pool.shutdown()


def _stop(thread, stop, free):
    stop.set()
    free.put(0)                                                # wake it if it waits for a buffer
    thread.join()


def make_loader(data, image_size, batch_per_rank, rank, world_size, seed, device, num_workers=0, loader="auto",
                log=print, flip=False, micro=1):
    """data: "digits", a prepared dataset, or an ImageFolder directory. loader (folders only): "dali",
    "pil", or "auto" (DALI when installed). A prepared dataset is memory-mapped (num_workers: gather
    threads); a folder's unusable images are left out (a cached scan, shared out over the ranks).
    micro: micro-batches per rank (ShardedBatches; DALI's readers shard by rank, so there micro-batches
    are slices of the rank's batch, not a world_size * micro-rank run's images).
    Returns (loader, dataset size, num_classes)."""
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
