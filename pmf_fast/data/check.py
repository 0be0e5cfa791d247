"""Find unusable images before training: `python -m pmf_fast.data check DIR`.

Unusable (listed, excluded from training): zero bytes, not an image, truncated or corrupt data,
formats outside SUPPORTED, and decompression bombs (a header claiming more pixels than PIL's limit,
PIL.Image.MAX_IMAGE_PIXELS: 89,478,485 by default; PIL warns above it and refuses above twice it, we
refuse both). Usable with conversion on load (counted): grayscale, CMYK, alpha,
palette and 16-bit images, all read as 8-bit RGB by `load_rgb`.
Scans decode every image fully (in worker processes; under torch.distributed each rank takes
1/world of the files) and are cached per dataset in $PMF_CACHE (default ~/.cache/pmf_fast), keyed by
the list of files with their sizes and mtimes, so a changed dataset is scanned again. A prepared
dataset (`python -m pmf_fast.data prepare`) needs no scan at all: its manifest lists the unusable files.
"""
import ctypes
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch.distributed as tdist
from PIL import Image

from ..atomic import atomic_write
from ..dist import agreed, all_gather_objects, is_dist

PR_SET_PDEATHSIG = 1                       # linux/prctl.h: a signal for this process when its parent exits
SUPPORTED = {"JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP"}
_limit_lock = threading.Lock()


class DecompressionBomb(ValueError):
    """An image whose header claims more pixels than PIL.Image.MAX_IMAGE_PIXELS."""


def open_image(path):
    """Image.open, raising DecompressionBomb (with the claimed size) for PIL's decompression-bomb
    error and its warning alike: such a file is refused before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = Image.MAX_IMAGE_PIXELS
    with _limit_lock:                       # read the claimed size only: lift the limit, decode nothing
        try:
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as im:
                w, h = im.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    raise DecompressionBomb(f"decompression bomb: {w}x{h} pixels exceeds PIL's limit of {limit} "
                            "(PIL.Image.MAX_IMAGE_PIXELS)")


def load_rgb(path):
    """8-bit RGB array of an image, converting grayscale, CMYK, alpha, palette and 16-bit.
    Raises DecompressionBomb (a ValueError) for a header that claims too many pixels."""
    with open_image(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):            # 16/32-bit grayscale -> 8-bit
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return im.convert("RGB")


def check_image(path):
    """(problem or None, conversion note or None) for one file."""
    return inspect_image(path)[:2]


def inspect_image(path):
    """(problem or None, conversion note or None, the 8-bit RGB image or None): the check and the
    image it decoded, so that preparing a dataset decodes each file once."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", None, None
        with open_image(path) as im:
            fmt, mode = im.format, im.mode
            if fmt not in SUPPORTED:
                return f"unsupported format {fmt}", None, None
            im.verify()                                           # structure, checksums (PNG)
        rgb = load_rgb(path)                                      # full decode: catches truncation
    except FileNotFoundError:
        return "file not found (deleted after the listing?)", None, None
    except PermissionError:
        return "not readable (permission denied)", None, None
    except Image.UnidentifiedImageError:
        return "not an image", None, None
    except DecompressionBomb as e:
        return str(e), None, None
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt ({str(e)[:80]})", None, None
    except Exception as e:                                        # one odd file must not stop a scan
        return f"unreadable ({type(e).__name__}: {str(e)[:80]})", None, None
    note = None if mode == "RGB" else f"converted from {mode}"
    return None, note, rgb


def worker_init():
    """Start of a pool worker: it dies with the process that started it and leaves Ctrl-C to it (that
    process stops the pool and prints one line). Without this a kill -9 or SIGTERM of prepare left
    the workers alive, blocked on their task pipe, and Ctrl-C printed one traceback per process.
    The initializer of the scan's pool here and of prepare's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):                     # the kernel's SIGKILL when the parent exits
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()   # elsewhere, and the race


def _exit_with_parent(parent, every=0.5):
    while os.getppid() == parent:                            # re-parented: the parent has gone
        time.sleep(every)
    os._exit(1)


def _signature(files):
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _cache_path(files):
    cache_dir = os.environ.get("PMF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pmf_fast"))
    return os.path.join(cache_dir, f"scan-{_signature(files)}.json")


def _read_cache(path):
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):                                 # absent or damaged: scan again
        return None
    return out if isinstance(out, dict) and out.keys() == {"bad", "converted"} else None


def _write_cache(path, out):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: json.dump(out, f), mode="w")
    except OSError:                                               # a read-only cache only costs a rescan
        pass


def _check_files(files, workers):
    """check_image over the files in `workers` processes: [(problem, note)]."""
    if not files:
        return []
    with ProcessPoolExecutor(workers, initializer=worker_init) as ex:
        return list(ex.map(check_image, files, chunksize=64))


def scan_images(files, workers=None, cache=True):
    """{"bad": {path: reason}, "converted": {path: note}} for the files, from the cache if current.

    Under torch.distributed the scan is shared out: each rank checks every world-th file, the
    results are gathered (all_gather_object) and rank 0 writes the cache, so N ranks decode each
    file once, not N times. The cache is used only when every rank has it (the ranks agree), since
    a node-local cache directory may hold it on some nodes and not on others.
    What can fail on one rank alone (a file gone before its stat, a broken worker pool) runs in an
    `agreed` block before each gather, so every rank stops with that rank's line (pmf_fast/dist.py)."""
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if is_dist() else (0, 1)
    with agreed("reading the image scan cache"):
        path = _cache_path(files)
        out = _read_cache(path) if cache else None
    out = out if all(all_gather_objects(out is not None)) else None
    if out is not None:
        return out
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))   # ranks sharing this host's cores
    workers = workers or max(1, min(16, (os.cpu_count() or 1) // local_world))
    mine = files[rank::world]
    with agreed("checking the images"):
        results = _check_files(mine, workers)
    parts = all_gather_objects({"bad": {f: r for f, (r, _) in zip(mine, results) if r},
                                "converted": {f: n for f, (r, n) in zip(mine, results) if n and not r}})
    out = {k: dict(sorted((f, v) for p in parts for f, v in p[k].items())) for k in ("bad", "converted")}
    with agreed("writing the image scan cache"):   # also the wait: the cache is written before any rank reads it
        if cache and rank == 0:
            _write_cache(path, out)
    return out
