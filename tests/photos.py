"""Small ImageFolders of real photographs for the data tests: crops and rescales of scikit-learn's
two bundled photos (china.jpg, flower.jpg, 427 x 640), re-encoded as JPEG and PNG, plus grayscale,
CMYK and palette images (usable, converted to RGB on load) and a truncated JPEG (unusable)."""
import io
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

# file -> the start of the checker's reason: what the manifest and the scan must list
UNUSABLE = {"flower/truncated.jpg": "truncated or corrupt"}
CONVERTED = {"china/gray.jpg", "flower/cmyk.jpg", "flower/palette.png"}


def photo_folder(root, per_class=5, seed=0):
    """root/{china,flower}/*: per_class crops and rescales of each photo (JPEG and PNG, short sides
    from below 64 to over 256, so the ADM crop both upscales and halves) and the odd files above.
    Returns root."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for name, photo in zip(["china", "flower"], photos):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(60, 427)), int(rng.integers(60, 640))
            top, left = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
            img = Image.fromarray(photo[top:top + h, left:left + w])
            if i % 3 == 2:                                            # a rescale, not only crops
                img = img.resize((max(40, int(w * 0.6)), max(40, int(h * 0.6))), Image.BILINEAR)
            ext = "jpg" if i % 2 else "png"
            img.save(os.path.join(root, name, f"{i}.{ext}"), quality=int(rng.integers(70, 98)))
    crop = Image.fromarray(photos[1][100:300, 150:450])
    crop.convert("L").save(os.path.join(root, "china", "gray.jpg"))
    crop.convert("CMYK").save(os.path.join(root, "flower", "cmyk.jpg"))
    crop.convert("P").save(os.path.join(root, "flower", "palette.png"))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=90)
    with open(os.path.join(root, "flower", "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    return str(root)
