"""ImageNet-style class folders (root/<class>/<image>), read with PIL and the ADM center crop."""
import os
import warnings

import numpy as np
import torch
from PIL import Image

from ..dist import agreed
from .check import load_rgb, scan_images

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (guided-diffusion): halve with BOX while the short side is at least twice
    the target, resize the short side to the target with BICUBIC, then crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def scan_folder(root, all_files=False, unreadable=None):
    """(files, labels, classes): sorted class folders -> 0..K-1, as torchvision's ImageFolder.
    Image extensions only, unless all_files (the checker looks at every file). A folder that cannot
    be listed (no read permission) keeps its class, without its images: it goes into the dict
    `unreadable` ({"<class>/<sub>/": reason}) when one is given, else into a warning."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset directory {root!r} does not exist; pass train.data=<ImageFolder root> "
                                "(root/<class>/<image>) or train.data=digits")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except PermissionError:
        raise PermissionError(f"dataset directory {root!r} is not readable") from None
    if not classes:
        raise ValueError(f"dataset directory {root!r} has no class folders; expected root/<class>/<image>")
    files, labels, missed = [], [], {}

    def onerror(e):                            # os.walk would skip the folder without a word
        missed[os.path.relpath(e.filename, root) + "/"] = f"folder not readable ({e.strerror}): its images are left out"
    for i, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c), onerror=onerror)):
            for n in sorted(names):
                if all_files or n.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(i)
    if unreadable is not None:
        unreadable.update(missed)
    elif missed:
        warnings.warn(f"{len(missed)} folder(s) of {root} cannot be read, their images are left out (fix their "
                      "permissions): " + "; ".join(f"{d}: {why}" for d, why in missed.items()), stacklevel=2)
    if not files:
        raise ValueError(f"dataset directory {root!r} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return files, labels, classes


def usable_images(root, workers=None):
    """(files, labels, classes, report) with the unusable files (pmf_fast/data/check.py) left out;
    report is a one-line summary for the training log."""
    with agreed(f"listing {root}"):             # e.g. the folder missing on one node: before the scan's gathers
        files, labels, classes = scan_folder(root)
    scan = scan_images(files, workers)
    keep = [i for i, f in enumerate(files) if f not in scan["bad"]]
    if not keep:
        raise ValueError(f"dataset directory {root!r}: none of its {len(files)} images is usable; "
                         f"run `python -m pmf_fast.data check {root}`")
    report = (f"{len(keep)} usable images in {len(classes)} classes; {len(files) - len(keep)} unusable excluded, "
              f"{len(scan['converted'])} converted to RGB on load (details: python -m pmf_fast.data check {root})")
    return [files[i] for i in keep], [labels[i] for i in keep], classes, report


class FolderDataset(torch.utils.data.Dataset):
    """PIL loader: ADM center crop, [-1, 1]. A file that fails after the scan (changed on disk) is
    replaced by the next usable one with a warning: training neither crashes nor sees garbage."""

    def __init__(self, files, labels, image_size):
        self.files, self.labels, self.image_size = files, labels, image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            try:
                arr = center_crop_arr(load_rgb(self.files[k]), self.image_size)
            except (OSError, ValueError, SyntaxError) as e:
                warnings.warn(f"skipping unreadable image {self.files[k]}: {e}", stacklevel=2)
                continue
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0
            return x, self.labels[k]
        raise RuntimeError("no readable image left in the dataset")
