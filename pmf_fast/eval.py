"""FID, Inception Score and precision/recall of generated samples, offline, in the standard protocol.

    python -m pmf_fast.eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Samples: an ADM-layout .npz (arr_0 uint8 [N, H, W, 3]), as sample.py writes. Reference: the ADM
reference batch (`mu`, `sigma` of ImageNet train, and arr_0, 10k images, for precision/recall), a
prepared dataset (python -m pmf_fast.data prepare; statistics read from its shards and cached
there), or a folder of images (statistics computed here, ADM center crop). Features come from the standard
Inception-v3 (the 2015-12-05 TensorFlow graph) as ported to PyTorch by torch-fidelity, and the
metrics are torch-fidelity's (FID from mu/sigma, IS over 10 splits of the unbiased logits,
precision/recall with 3 nearest neighbours). Numbers are close to, not bit-identical with, the
TensorFlow ADM evaluator; every result names its extractor. This module scores images; the FID of
a model during training (which generates images) is sampling.fid_of_model.

Weight and reference files (nothing downloads):
  weights-inception-2015-12-05-6726825d.pth  -> $TORCH_HOME/hub/checkpoints/ or PMF_INCEPTION_WEIGHTS
      from https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
  VIRTUAL_imagenet256_labeled.npz (or ..._imagenet512_...) -> anywhere, pass --ref
      from https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
"""
import argparse
import json
import os
import pickle
import sys
import warnings
import zipfile

import numpy as np
import torch

from .atomic import atomic_write

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
ADM_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{size}/VIRTUAL_imagenet{size}_labeled.npz"
EXTRACTOR_NAME = "torch-fidelity InceptionV3 (2015-12-05 graph), pool3 2048-d + unbiased logits"


def is_device_error(e):
    """Whether `e` is the accelerator's (CUDA out of memory, a device-side assert, a launch failure),
    not a file's: such an error is raised as it is, never reported as a bad weight file."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None)) if k)
    return isinstance(e, kinds) or str(e).startswith("CUDA")


def inception_path():
    home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return os.environ.get("PMF_INCEPTION_WEIGHTS", os.path.join(home, "hub", "checkpoints", INCEPTION_FILE))


class InceptionExtractor:
    """uint8 [N, 3, H, W] -> (pool [N, 2048], logits [N, 1008]) float64 numpy, from a local weight file."""
    name = EXTRACTOR_NAME

    def __init__(self, device="cpu", weights=None):
        path = weights or inception_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Inception weights not found at {path}. Download {INCEPTION_URL} and put it there "
                "(or set PMF_INCEPTION_WEIGHTS to the file).")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:                # built on the CPU, where what can fail is the file: torch.load, load_state_dict
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=path)
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:   # cut short
            if is_device_error(e):          # a file of CUDA tensors is loaded onto the GPU: its errors are the GPU's
                raise
            raise ValueError(f"Inception weights {path} cannot be read ({str(e)[:120]}): download "
                             f"{INCEPTION_URL} again and put it there") from None
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images_u8):
        pool, logits = self.net(images_u8.to(self.device))
        return pool.double().cpu().numpy(), logits.double().cpu().numpy()


def extract(extractor, images_nhwc, batch=200, progress=False):
    """Features of uint8 NHWC images (numpy or tensor), in batches. Grayscale is repeated to RGB."""
    pools, logits = [], []
    it = range(0, len(images_nhwc), batch)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="features")
    for i in it:
        x = torch.as_tensor(np.asarray(images_nhwc[i:i + batch])).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        p, lg = extractor(x.contiguous())
        pools.append(p)
        logits.append(lg)
    return np.concatenate(pools), np.concatenate(logits)


def stats(features):
    """FID statistics of features [N, D]: {"mu": mean [D], "sigma": covariance [D, D]}, the layout
    of the ADM reference batches and torch-fidelity."""
    return {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False)}


def fid(stat_a, stat_b):
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    return fid_statistics_to_metric(stat_a, stat_b, verbose=False)["frechet_inception_distance"]


def inception_score(logits, splits=10):
    from torch_fidelity.metric_isc import isc_features_to_metric
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(fake_features, real_features, k=3):
    from torch_fidelity.metric_prc import prc_features_to_metric
    out = prc_features_to_metric(torch.from_numpy(fake_features).float(), torch.from_numpy(real_features).float(),
                                 prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


def read_npz(path, names, remedy):
    """{name: array} of the members `names` that the .npz archive at `path` holds, read in full; a
    ValueError naming the file, the problem and `remedy` when it is not an .npz archive or is damaged."""
    try:
        z = np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:   # not .npy/.npz, or cut short
        raise ValueError(f"{path} is not a readable .npz archive ({str(e)[:80]}): {remedy}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz archive: {remedy}")
    try:
        with z:
            return {k: z[k] for k in names if k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:   # a damaged member
        raise ValueError(f"{path} is damaged ({str(e)[:80]}): {remedy}") from None


def load_samples(path):
    """arr_0 of an ADM-layout .npz: uint8 [N, H, W, C], C 3 (RGB) or 1 (grayscale)."""
    remedy = "write one with sample.py --out x.npz"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} not found ({remedy})")
    arr = read_npz(path, ["arr_0"], remedy).get("arr_0")
    if arr is None:
        raise ValueError(f"{path} has no arr_0: expected the ADM layout (uint8 [N, H, W, C]); {remedy}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3) or not len(arr):
        raise ValueError(f"{path}: arr_0 is {arr.dtype} {list(arr.shape)}; expected uint8 [N, H, W, C] with N > 0 "
                         f"and C 3 or 1; {remedy}")
    return arr


def prepared_reference(root, extractor, image_size=None, batch=200, keep=10000):
    """(stats, features of `keep` evenly spaced images for precision/recall) of a prepared dataset
    (python -m pmf_fast.data prepare), read from its shards: no decoding, and the mean and covariance
    accumulated in float64 over all images without holding their features. The result is cached in
    root (fid_stats-<key>.npz, keyed by the extractor and the shards' checksums) for the next start."""
    import hashlib

    from .data.shards import open_prepared
    ds = open_prepared(root, image_size)
    name = getattr(extractor, "name", None)
    key = hashlib.sha256(json.dumps([name, [e["sha256"] for e in ds.manifest["shards"]]]).encode()).hexdigest()
    cache = os.path.join(root, f"fid_stats-{key[:16]}.npz") if name else None
    if cache and os.path.isfile(cache):
        try:
            z = read_npz(cache, ["mu", "sigma", "real"], "computed again")
            if len(z) == 3:
                return {"mu": z["mu"], "sigma": z["sigma"]}, z["real"]
            warnings.warn(f"{cache} lacks {sorted({'mu', 'sigma', 'real'} - z.keys())}: computed again", stacklevel=2)
        except ValueError as e:                        # a damaged cache costs a recomputation, not the run
            warnings.warn(str(e), stacklevel=2)
    n = len(ds)
    kept = set(np.linspace(0, n - 1, min(keep, n)).round().astype(int).tolist())
    total = outer = None
    real = []
    for i in range(0, n, batch):
        pool, _ = extract(extractor, ds[i:i + batch], batch)
        total = pool.sum(0) if total is None else total + pool.sum(0)
        outer = pool.T @ pool if outer is None else outer + pool.T @ pool
        real.append(pool[[j in kept for j in range(i, i + len(pool))]])
    mu = total / n
    st = {"mu": mu, "sigma": (outer - n * np.outer(mu, mu)) / (n - 1)}      # np.cov's unbiased estimate
    real = np.concatenate(real)
    if cache:
        try:
            atomic_write(cache, lambda f: np.savez(f, mu=st["mu"], sigma=st["sigma"], real=real))
        except OSError:                                # a read-only dataset: computed again next time
            pass
    return st, real


def folder_images(ref, image_size):
    """The images of an ImageFolder (ref/<class>/<image>) as uint8 [N, S, S, 3], decoded as training
    decodes them (data/check.py's load_rgb, ADM center crop). An image that cannot be decoded is a
    ValueError naming it and the checker that lists every such file."""
    from .data.check import load_rgb
    from .data.folder import center_crop_arr, scan_folder
    files, _, _ = scan_folder(ref)
    imgs = []
    for f in files:
        try:
            imgs.append(center_crop_arr(load_rgb(f), image_size))
        except (OSError, ValueError, SyntaxError) as e:          # not an image, truncated, corrupt, too large
            why = " ".join(str(e).split())[:120] or type(e).__name__
            raise ValueError(f"reference image {f} cannot be read ({why}): run `python -m pmf_fast.data check "
                             f"{ref}` to list the unusable files, and move them out of {ref}") from None
    return np.stack(imgs)


def reference(ref, extractor, image_size=None, batch=200, features=True):
    """(stats, features for precision/recall or None) from an ADM .npz, a prepared dataset (python -m
    pmf_fast.data prepare), or a folder of images. features=False skips the features of an ADM batch's
    10k images (FID alone)."""
    from .data.shards import is_prepared
    if os.path.isdir(ref) and is_prepared(ref):
        return prepared_reference(ref, extractor, image_size, batch)
    if os.path.isdir(ref):
        if image_size is None:
            raise ValueError("a reference folder needs the image size of the samples")
        pool, _ = extract(extractor, folder_images(ref, image_size), batch)
        return stats(pool), pool
    if not os.path.isfile(ref):
        size = image_size or 256
        raise FileNotFoundError(f"reference {ref!r} not found. For ImageNet {size}x{size} download "
                                f"{ADM_REF_URL.format(size=size)} and pass its path with --ref (or pass a "
                                "prepared dataset or a folder of images).")
    size = image_size or 256
    z = read_npz(ref, ["mu", "sigma", "arr_0"], f"download the reference batch {ADM_REF_URL.format(size=size)} "
                 "again, or pass another --ref")
    if "mu" in z and "sigma" in z:
        st = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        real = extract(extractor, z["arr_0"], batch)[0] if "arr_0" in z and features else None
        return st, real
    if "arr_0" in z:
        pool, _ = extract(extractor, z["arr_0"], batch)
        return stats(pool), pool
    raise ValueError(f"{ref}: expected mu/sigma (ADM reference batch) or arr_0 images")


def evaluate(samples, ref, extractor, batch=200, progress=False):
    """The metrics dict for uint8 NHWC samples against a reference: an ADM .npz, a prepared dataset
    or a folder of images (see reference)."""
    pool, logits = extract(extractor, samples, batch, progress)
    ref_stats, ref_feats = reference(ref, extractor, samples.shape[1], batch)
    out = {"num_samples": int(len(samples)), "fid": fid(stats(pool), ref_stats)}
    out["inception_score"], out["inception_score_std"] = inception_score(logits)
    if ref_feats is not None:
        out["precision"], out["recall"] = precision_recall(pool, ref_feats)
    out["extractor"] = getattr(extractor, "name", type(extractor).__name__)
    out["reference"] = os.path.basename(ref.rstrip("/"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="ADM-layout .npz from sample.py")
    p.add_argument("--ref", required=True, help="ADM reference batch .npz, a prepared dataset (python -m "
                   "pmf_fast.data prepare), or a folder of reference images (<class>/<image>)")
    p.add_argument("--weights", default=None, help=f"Inception weights (default: {inception_path()})")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="metrics JSON (default: next to the samples)")
    a = p.parse_args(argv)
    out = a.out or os.path.splitext(a.samples)[0] + ".metrics.json"
    try:                                       # bad input: one line (the problem, the remedy), exit 1
        samples = load_samples(a.samples)
        metrics = evaluate(samples, a.ref, InceptionExtractor(a.device, a.weights), a.batch, progress=True)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        atomic_write(out, lambda f: json.dump(metrics, f, indent=2), mode="w")
    except OSError as e:
        print(json.dumps(metrics, indent=2))
        sys.exit(f"error: cannot write the metrics to {out} ({e.strerror or e}): pass --out with a writable path")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
