"""Find unusable images before training: `python -m pmf_fast.data check DIR`.

Unusable (listed, excluded from training): zero bytes, not an image, truncated or corrupt data,
formats outside SUPPORTED, and decompression bombs (a header claiming more pixels than PIL's limit,
PIL.Image.MAX_IMAGE_PIXELS: 89,478,485 by default; PIL warns above it and refuses above twice it, we
refuse both). Usable with conversion on load (counted): grayscale, CMYK, alpha,
palette and 16-bit images, all read as 8-bit RGB by `load_rgb`.
Scans decode every image fully (in worker processes) and are cached per dataset in
$PMF_CACHE (default ~/.cache/pmf_fast), keyed by the list of files with their sizes and mtimes, so
a changed dataset is scanned again.
"""
import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from ..atomic import atomic_write

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
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", None
        with open_image(path) as im:
            fmt, mode = im.format, im.mode
            if fmt not in SUPPORTED:
                return f"unsupported format {fmt}", None
            im.verify()                                           # structure, checksums (PNG)
        load_rgb(path)                                            # full decode: catches truncation
    except FileNotFoundError:
        return "file not found (deleted after the listing?)", None
    except Image.UnidentifiedImageError:
        return "not an image", None
    except DecompressionBomb as e:
        return str(e), None
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt ({str(e)[:80]})", None
    except Exception as e:                                        # one odd file must not stop a scan
        return f"unreadable ({type(e).__name__}: {str(e)[:80]})", None
    note = None if mode == "RGB" else f"converted from {mode}"
    return None, note


def _signature(files):
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def scan_images(files, workers=None, cache=True):
    """{"bad": {path: reason}, "converted": {path: note}} for the files, from the cache if current."""
    cache_dir = os.environ.get("PMF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pmf_fast"))
    path = os.path.join(cache_dir, f"scan-{_signature(files)}.json")
    if cache and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    workers = workers or min(16, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as ex:
        results = list(ex.map(check_image, files, chunksize=64))
    out = {"bad": {f: r for f, (r, _) in zip(files, results) if r},
           "converted": {f: n for f, (r, n) in zip(files, results) if n and not r}}
    if cache:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write(path, lambda f: json.dump(out, f), mode="w")
        except OSError:                                           # a read-only cache only costs a rescan
            pass
    return out
