"""`python -m pmf_fast.data prepare SRC DST --image-size 256`: decode, check and ADM-crop every image
of an ImageFolder once, into the uint8 shards of pmf_fast/data/shards.py.

  parallel   a process pool per rank decodes chunks of 32 files straight into the shard's file
             (memory-mapped; no pixels cross a pipe); under torchrun rank r takes shards r, r+W, ...
  resumable  a shard is written to a temporary file, synced, renamed, then recorded (shard-k.json);
             a run that is killed or stopped by a full disk continues from the recorded shards
  checked    the same rule as the folder loader (check.inspect_image): unusable files are left out
             and listed with their reason in the manifest; DST made from another source, image
             size or listing is refused
The shards' file space is reserved (posix_fallocate) before any worker writes into the mapping:
a full disk is then an ENOSPC error in the main process, not a SIGBUS in a worker.
The workers die with the process that started them (kill -9 included) and leave Ctrl-C to it; under
torchrun a rank that fails stops the others with its line at the next point where ranks wait.
"""
import errno
import hashlib
import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import numpy as np

from ..atomic import atomic_write, clean_temporaries, temporary_path
from ..dist import agreed
from . import shards
from .check import inspect_image, worker_init
from .folder import center_crop_arr, scan_folder

CHUNK = 32                                 # files per worker task: ~0.3 s of decoding, a smooth progress bar


class NoSpace(shards.PreparedError):
    """DST's file system is full."""


def _dst_error(e, dst):
    """An OSError met writing DST as one line with its remedy (a full disk: NoSpace); others as they are."""
    if e.errno == errno.ENOSPC:
        return NoSpace(f"no space left on {dst}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and str(e.filename or "").startswith(dst):
        return shards.PreparedError(f"cannot write to {dst} ({e.strerror}: {e.filename}): choose a DST this user "
                                    "can write to, or give it write permission, and run the same command again")
    return e


def crop_chunk(tmp, planned, size, paths, slot):
    """Worker: check, decode and crop `paths` into slots slot, slot+1, ... of the shard's temporary
    file. Returns [(problem, conversion note, image digest)] per file (a problem leaves its slot empty)."""
    mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=shards.HEADER, shape=(planned, size, size, 3))
    out = []
    for j, path in enumerate(paths):
        problem, note, rgb = inspect_image(path)
        if problem:
            out.append((problem, None, None))
            continue
        mm[slot + j] = arr = center_crop_arr(rgb, size)
        out.append((None, note, shards.image_digest(arr)))
    del mm
    return out


class _Inline:
    """The executor interface, run in this process: one worker needs no pool (nor its start-up)."""

    def submit(self, fn, *args):
        f = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:
            f.set_exception(e)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _reserve(path, nbytes):
    """Create `path` with `nbytes` of disk space reserved (ENOSPC now rather than SIGBUS later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            os.ftruncate(fd, nbytes)                    # a file system without fallocate: sparse
    finally:
        os.close(fd)


def _finish_shard(dst, k, tmp, planned, size, results, rel, labels):
    """Compact the usable images to the front, write the header, sync, rename, record: the shard's
    entry (the record holds the labels and files as well)."""
    keep = [i for i, r in enumerate(results) if r[0] is None]
    per_image = size * size * 3
    if len(keep) < planned and keep:
        mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=shards.HEADER, shape=(planned, size, size, 3))
        for new, old in enumerate(keep):
            if new != old:
                mm[new] = mm[old]
        mm.flush()
        del mm
    with open(tmp, "r+b") as f:
        f.truncate(shards.HEADER + len(keep) * per_image)
        f.write(shards.npy_header(len(keep), size))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(dst, shards.shard_name(k)))
    digests = [results[i][2] for i in keep]
    record = {"file": shards.shard_name(k), "count": len(keep), "sha256": shards.shard_checksum(digests),
              "samples": {str(i): digests[i] for i in shards.sample_positions(len(keep))},
              "labels": [labels[i] for i in keep], "files": [rel[i] for i in keep],
              "unusable": {rel[i]: r[0] for i, r in enumerate(results) if r[0]},
              "converted": sum(1 for r in results if r[0] is None and r[1])}
    atomic_write(os.path.join(dst, shards.shard_name(k)[:-4] + ".json"), lambda f: json.dump(record, f), mode="w")


def _record(dst, k, size):
    """The record of shard k when its file matches it (cheap checks), else None."""
    path = os.path.join(dst, shards.shard_name(k)[:-4] + ".json")
    try:
        rec = shards.read_json(path)
    except (OSError, ValueError):
        return None
    return rec if shards.shard_problem(dst, rec, size) is None else None


def _check_plan(dst, plan):
    """Write DST's plan, or check that the one there asks for the same; a one-line error if not."""
    path = os.path.join(dst, shards.PLAN)
    if os.path.isfile(path):
        old = shards.read_json(path)
        if old.get("source") != plan["source"]:
            return f"{dst} was prepared from {old.get('source')}, not {plan['source']}: choose another DST"
        if old.get("image_size") != plan["image_size"]:
            return (f"{dst} holds {old.get('image_size')} px images, not {plan['image_size']} px: choose another DST "
                    f"for {plan['image_size']} px")
        if old.get("shard_size") != plan["shard_size"]:
            return (f"{dst} was begun with --shard-size {old.get('shard_size')}: run again with that (or leave "
                    "the option out)")
        if old != plan:
            return (f"the files in {plan['source']} changed since {dst} was begun ({plan['num_files']:,} files now, "
                    f"{old.get('num_files', 0):,} then): prepare into a new DST")
        return None
    if os.path.isdir(dst) and os.listdir(dst):
        return f"{dst} is not empty and holds no prepared dataset: choose a new or empty directory"
    os.makedirs(dst, exist_ok=True)
    atomic_write(path, lambda f: json.dump(plan, f, indent=1), mode="w")
    return None


def prepare(src, dst, image_size=256, shard_size=None, workers=None, rank=0, world=1, log=print, progress=True):
    """Prepare SRC (root/<class>/<image>) into DST as rank `rank` of `world` (the ranks share the
    shards); rank 0 writes the manifest once all shards are recorded. Returns the manifest."""
    if image_size < 1 or (shard_size is not None and shard_size < 1):
        raise shards.PreparedError(f"--image-size {image_size} and --shard-size {shard_size} must be positive")
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if os.path.commonpath([src, dst]) == src:
        raise shards.PreparedError(f"DST {dst} is inside SRC {src}: it would be read as a class; choose another DST")
    # every step that ranks wait after is agreed (pmf_fast/dist.agreed): a rank that fails there stops
    # them all with its line, where it would otherwise leave them waiting for hours (the gloo timeout)
    with agreed(f"preparing {dst}"):
        unreadable = {}
        files, labels, classes = scan_folder(src, unreadable=unreadable)
        if unreadable:
            log(f"warning: {len(unreadable)} folder(s) of {src} cannot be read, their images are left out "
                "(fix their permissions and prepare into a new DST to include them): "
                + "; ".join(f"{d}: {why}" for d, why in unreadable.items()))
        rel = [os.path.relpath(f, src) for f in files]
        shard_size = shard_size or shards.default_shard_size(image_size)
        listing = hashlib.sha256("".join(f"{r}\0{y}\n" for r, y in zip(rel, labels)).encode()).hexdigest()
        plan = {"format": shards.FORMAT, "source": src, "image_size": image_size, "shard_size": shard_size,
                "num_files": len(files), "classes": classes, "listing_sha256": listing}
        if unreadable:                               # a key only when needed: plans begun before it still match
            plan["unreadable"] = unreadable
        try:
            refusal = _check_plan(dst, plan) if rank == 0 else None
        except OSError as e:
            raise _dst_error(e, dst) from None
        if refusal:
            raise shards.PreparedError(refusal)

    n_shards = math.ceil(len(files) / shard_size)
    span = lambda k: range(k * shard_size, min(len(files), (k + 1) * shard_size))     # noqa: E731
    mine = list(range(rank, n_shards, world))
    try:
        with agreed(f"preparing {dst}"):
            try:
                for k in mine:                       # left by a killed run of this rank's shards (any host)
                    clean_temporaries(dst, shards.shard_name(k), all_hosts=True)
                todo = [k for k in mine if _record(dst, k, image_size) is None]
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                workers = workers or max(1, (os.cpu_count() or 1) // local_world)
                log(f"prepare {src} -> {dst}: {len(files):,} files in {len(classes)} classes, {n_shards} shards of "
                    f"{shard_size} at {image_size} px ({image_size * image_size * 3:,} bytes/image); this rank: "
                    f"{len(mine) - len(todo)} of {len(mine)} shards already done; {workers} worker processes")
                _run(dst, todo, span, files, rel, labels, image_size, workers, progress and rank == 0)
            except OSError as e:
                raise _dst_error(e, dst) from None
    except NoSpace:                                  # every rank has stopped: count what is finished
        done = sum(_record(dst, k, image_size) is not None for k in range(n_shards))
        raise NoSpace(f"no space left on {dst}: free space and run the same command again to continue "
                      f"({done} of {n_shards} shards finished)") from None
    manifest = None
    with agreed(f"writing the manifest of {dst}"):
        if rank == 0:
            try:
                manifest = _write_manifest(dst, plan, n_shards)
            except OSError as e:
                e = _dst_error(e, dst)
                if isinstance(e, NoSpace):
                    e = NoSpace(f"no space left on {dst}: free space and run the same command again to finish "
                                f"(all {n_shards} shards are written)")
                raise e from None
            bad = manifest["unusable"]
            log(f"prepared {manifest['num_images']:,} images in {dst} ({manifest['bytes'] / 2**30:.2f} GiB); "
                f"{len(bad)} unusable files left out{': ' if bad else ''}"
                + "; ".join(f"{f}: {r}" for f, r in list(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
                + f"; {manifest['converted']} converted to RGB")
    return manifest


def _run(dst, todo, span, files, rel, labels, size, workers, progress):
    """Crop the shards `todo` in `workers` processes, with chunks of consecutive shards in flight."""
    per_image = size * size * 3
    tasks = ((k, s, [files[i] for i in span(k)[s:s + CHUNK]]) for k in todo for s in range(0, len(span(k)), CHUNK))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(span(k)) for k in todo), unit="img", desc="prepare", dynamic_ncols=True,
                   smoothing=0.05)
    ex = ProcessPoolExecutor(workers, initializer=worker_init) if workers > 1 else _Inline()
    open_shards, pending = {}, {}
    try:
        task = next(tasks, None)
        while task is not None or pending:
            while task is not None and len(pending) < (2 * workers + 2 if workers > 1 else 1):
                k, s, paths = task
                if k not in open_shards:
                    n = len(span(k))
                    tmp = temporary_path(os.path.join(dst, shards.shard_name(k)))
                    open_shards[k] = {"tmp": tmp, "results": [None] * n, "left": math.ceil(n / CHUNK)}
                    _reserve(tmp, shards.HEADER + n * per_image)
                pending[ex.submit(crop_chunk, open_shards[k]["tmp"], len(span(k)), size, paths, s)] = (k, s)
                task = next(tasks, None)
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                k, s = pending.pop(fut)
                res, st = fut.result(), open_shards[k]
                st["results"][s:s + len(res)] = res
                st["left"] -= 1
                if bar is not None:
                    bar.update(len(res))
                if st["left"] == 0:
                    r = span(k)
                    _finish_shard(dst, k, st["tmp"], len(r), size, st["results"], rel[r.start:r.stop],
                                  labels[r.start:r.stop])
                    del open_shards[k]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        for st in open_shards.values():                  # unfinished shards: nothing half-written is kept
            if os.path.exists(st["tmp"]):
                os.remove(st["tmp"])
        if bar is not None:
            bar.close()


def _write_manifest(dst, plan, n_shards):
    records = []
    for k in range(n_shards):
        rec = _record(dst, k, plan["image_size"])
        if rec is None:
            raise shards.PreparedError(f"{dst}: {shards.shard_name(k)} is missing or damaged after every rank "
                                       "finished (is DST on a file system that every node sees?); run the same "
                                       "command again")
        records.append(rec)
    labels = np.array([y for r in records for y in r["labels"]], dtype=np.int64)
    atomic_write(os.path.join(dst, shards.LABELS), lambda f: np.save(f, labels))
    listing = "".join(p + "\n" for r in records for p in r["files"])
    atomic_write(os.path.join(dst, shards.FILES), lambda f: f.write(listing), mode="w")
    import PIL
    size = plan["image_size"]
    manifest = {"format": shards.FORMAT, "source": plan["source"], "image_size": size, "crop": shards.CROP,
                "pillow": PIL.__version__, "classes": plan["classes"], "num_files": plan["num_files"],
                "num_images": int(len(labels)), "bytes": int(len(labels)) * size * size * 3 + shards.HEADER * n_shards,
                "unusable": {**plan.get("unreadable", {}),
                             **{f: why for r in records for f, why in r["unusable"].items()}},
                "converted": sum(r["converted"] for r in records),
                "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "shards": [{k: r[k] for k in ("file", "count", "sha256", "samples")} for r in records]}
    atomic_write(os.path.join(dst, shards.MANIFEST), lambda f: json.dump(manifest, f, indent=1), mode="w")
    return manifest
