"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10
classes, bundled in the scikit-learn wheel, so nothing downloads), upsampled to 16x16."""
import numpy as np
import torch
import torch.nn.functional as F


def load_digits_split(image_size=16, seed=0, test_fraction=0.2):
    """((x_train, y_train), (x_test, y_test)): x [N, 1, S, S] float in [-1, 1], y int64.
    A fixed stratified split, so the generator never sees the judge's held-out digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]            # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                      stratify=d.target)
    return (x[idx_tr], y[idx_tr]), (x[idx_te], y[idx_te])
