"""Prepared datasets: an ImageFolder decoded and ADM-cropped once, stored as uint8 shards that every
rank memory-maps, so training reads pixels at memory speed and decodes nothing.

    python -m pmf_fast.data prepare SRC DST --image-size 256   write DST (pmf_fast/data/prepare.py)
    train.py ... train.data=DST                                 make_loader opens DST: no scan, no decoding
    python -m pmf_fast.data verify DST                          full checksums of every shard

DST holds
  manifest.json     written last (its presence means complete): source, image size, crop rule, Pillow
                    version, classes, counts, the unusable files with reasons, and each shard's entry
  shard-00000.npy   uint8 [n, S, S, 3] (RGB, HWC): a plain .npy with a 128-byte header
  shard-00000.json  the shard's record: what a resumed prepare trusts
  labels.npy        int64 [N], the class of each image in shard order
  files.txt         the source file of each image (relative to the source root), in shard order
  plan.json         what was asked (source, size, shard size, the listing's digest)

Checks. A shard's checksum is the SHA-256 of its images' BLAKE2b-128 digests in order (the workers
that crop hash each image, in parallel). Opening checks each shard's size and header and the digests
of its first, middle and last image: three small reads per shard (ImageNet at 256 px: 235 shards,
about 140 MB, a second or two) rather than 252 GB. That finds truncated, swapped and partly written
shards; a changed byte elsewhere is found by `verify`, which reads everything.
"""
import functools
import hashlib
import json
import os
import queue
import struct
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from ..config import ConfigError
from .batches import ShardedBatches, mirror_mask

FORMAT = "pmf-fast prepared images v1"
MANIFEST, PLAN, LABELS, FILES = "manifest.json", "plan.json", "labels.npy", "files.txt"
HEADER = 128                      # bytes before the pixels: the .npy header, padded (64-byte aligned data)
CROP = "ADM center crop (pmf_fast.data.folder.center_crop_arr) of the 8-bit RGB image (check.load_rgb)"


class PreparedError(ConfigError):
    """A prepared dataset that cannot be used as it is (train.data, a config value, names it; so
    train.py reports it in one line); the message says what to do."""


def shard_name(k):
    return f"shard-{k:05d}.npy"


def default_shard_size(image_size):
    """Images per shard: about 1 GiB per file (256 px: 5,461 images, 512 px: 1,365), so ImageNet is a
    few hundred files (mmaps, open files) and a killed prepare loses at most a shard per process."""
    return max(1, 2 ** 30 // (image_size * image_size * 3))


def npy_header(n, size):
    """The .npy (version 1.0) header of uint8 [n, size, size, 3], padded to HEADER bytes."""
    d = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({n}, {size}, {size}, 3), }}"
    d = d.ljust(HEADER - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")


def image_digest(img):
    return hashlib.blake2b(np.ascontiguousarray(img).data, digest_size=16).hexdigest()


def shard_checksum(digests):
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def sample_positions(n):
    return sorted({0, n // 2, n - 1}) if n else []


def read_json(path):
    with open(path) as f:
        return json.load(f)


def map_shard(path, n, size):
    if n == 0:                                          # a shard of unusable files only: nothing to map
        return np.empty((0, size, size, 3), np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER, shape=(n, size, size, 3))


def shard_problem(root, entry, size):
    """None when the shard file matches its entry by size, header and sampled images; else what is
    wrong, in a few words."""
    path = os.path.join(root, entry["file"])
    expect = HEADER + entry["count"] * size * size * 3
    try:
        actual = os.path.getsize(path)
        if actual != expect:
            return f"{actual:,} bytes, expected {expect:,} (truncated or overwritten)"
        with open(path, "rb") as f:
            if f.read(HEADER) != npy_header(entry["count"], size):
                return "its header does not match the manifest"
        mm = map_shard(path, entry["count"], size)
        for i in sample_positions(entry["count"]):
            if image_digest(mm[i]) != entry["samples"][str(i)]:
                return f"image {i} differs from the one written (altered or replaced)"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


class Prepared:
    """An opened prepared dataset: labels, classes, and images gathered by global index across the
    memory-mapped shards (uint8 NHWC)."""

    def __init__(self, root, manifest, shards, labels):
        self.root, self.manifest, self.shards, self.labels = root, manifest, shards, labels
        self.image_size, self.classes = manifest["image_size"], manifest["classes"]
        self.starts = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self):
        return int(self.starts[-1])

    def gather(self, idx, out):
        """out[j] = image idx[j], for a sequence of global indices; out uint8 [len(idx), S, S, 3]."""
        idx = np.asarray(idx, dtype=np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for j, (s, i) in enumerate(zip(shard.tolist(), (idx - self.starts[shard]).tolist())):
            out[j] = self.shards[s][i]              # one memcpy per image; numpy releases the GIL for it
        return out

    def __getitem__(self, sl):
        """Images of a slice of global indices, as one uint8 array."""
        idx = np.arange(len(self))[sl]
        return self.gather(idx, np.empty((len(idx), self.image_size, self.image_size, 3), np.uint8))


def is_prepared(path):
    return os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, PLAN))


def load_manifest(root, image_size=None):
    """The manifest of the prepared dataset in `root`, checked for its format and image size."""
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        if os.path.isfile(os.path.join(root, PLAN)):
            plan = read_json(os.path.join(root, PLAN))
            raise PreparedError(f"{root} is an unfinished prepared dataset: run `python -m pmf_fast.data prepare "
                                f"{plan['source']} {root} --image-size {plan['image_size']}` again to finish it")
        raise PreparedError(f"{root} has no {MANIFEST}: not a prepared dataset")
    try:
        m = read_json(os.path.join(root, MANIFEST))
    except (OSError, ValueError) as e:
        raise PreparedError(f"{root}/{MANIFEST} is unreadable ({e}); run prepare again to rewrite it") from None
    if m.get("format") != FORMAT:
        raise PreparedError(f"{root} was written in format {m.get('format')!r}, this code reads {FORMAT!r}; "
                            "prepare it again into a new directory")
    size = m["image_size"]
    if image_size is not None and image_size != size:
        raise PreparedError(f"{root} holds {size} px images but {image_size} px are asked for: prepare "
                            f"{m['source']} with --image-size {image_size} into another directory")
    return m


def open_prepared(root, image_size=None, check=True):
    """The Prepared dataset in `root`, after the cheap checks (the manifest's format and image size,
    every shard's size, header and sampled images, the labels). Raises PreparedError naming the
    problem and what to do."""
    m = load_manifest(root, image_size)
    size = m["image_size"]
    again = f"run `python -m pmf_fast.data prepare {m['source']} {root} --image-size {size}` again to rewrite it"
    if check:
        for e in m["shards"]:
            problem = shard_problem(root, e, size)
            if problem:
                raise PreparedError(f"{root}: {e['file']} is damaged: {problem}; {again}")
    try:
        labels = np.load(os.path.join(root, LABELS))
    except (OSError, ValueError) as e:
        raise PreparedError(f"{root}/{LABELS} is unreadable ({e}); {again}") from None
    digest = hashlib.sha256(labels.tobytes()).hexdigest() if check else m["labels_sha256"]
    if labels.shape != (m["num_images"],) or digest != m["labels_sha256"]:
        raise PreparedError(f"{root}/{LABELS} does not match the manifest; {again}")
    shards = [map_shard(os.path.join(root, e["file"]), e["count"], size) for e in m["shards"]]
    return Prepared(root, m, shards, labels)


def _verify_shard(args):
    root, entry, size = args
    problem = shard_problem(root, entry, size)
    if problem:
        return problem
    mm = map_shard(os.path.join(root, entry["file"]), entry["count"], size)
    if shard_checksum([image_digest(img) for img in mm]) != entry["sha256"]:
        return "checksum mismatch (a changed byte)"
    return None


def verify(root, workers=None, progress=True):
    """Read every shard in full and compare its checksum: {shard file: problem} for the bad ones."""
    m = load_manifest(root)
    jobs = [(root, e, m["image_size"]) for e in m["shards"]]
    with ProcessPoolExecutor(workers or min(16, os.cpu_count() or 1)) as ex:
        results = ex.map(_verify_shard, jobs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), unit="shard", desc="verify")
        bad = {e["file"]: r for e, r in zip(m["shards"], results) if r}
    try:
        labels_ok = hashlib.sha256(np.load(os.path.join(root, LABELS)).tobytes()).hexdigest() == m["labels_sha256"]
    except (OSError, ValueError):
        labels_ok = False
    if not labels_ok:
        bad[LABELS] = "unreadable or checksum mismatch"
    return bad


class PreparedLoader:
    """Endless batches from a prepared dataset with the Loader interface (pmf_fast/data).

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
