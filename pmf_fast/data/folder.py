"""ImageNet-style class folders (root/<class>/<image>), read with PIL and the ADM center crop."""
import os

import numpy as np
import torch
from PIL import Image

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


def scan_folder(root):
    """(files, labels, classes): sorted class folders -> 0..K-1, as torchvision's ImageFolder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset directory {root!r} does not exist; pass train.data=<ImageFolder root> "
                                "(root/<class>/<image>) or train.data=digits")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"dataset directory {root!r} has no class folders; expected root/<class>/<image>")
    files, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for n in sorted(names):
                if n.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(i)
    if not files:
        raise ValueError(f"dataset directory {root!r} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return files, labels, classes


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root, image_size):
        self.files, self.labels, self.classes = scan_folder(root)
        self.image_size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            arr = center_crop_arr(im.convert("RGB"), self.image_size)
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0   # [3, S, S] in [-1, 1]
        return x, self.labels[i]
