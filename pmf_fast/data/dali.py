"""NVIDIA DALI input pipeline for ImageFolder data (optional: `pip install .[dali]`).

JPEG decoding on the GPU (nvJPEG, "mixed") keeps up with the training step where PIL cannot; on a
machine without CUDA the same graph runs with the CPU decoder (CI tests it that way).
  reader   fn.readers.file over the usable files (the same list and labels as the PIL loader),
           sharded by rank, shuffled, padded last batch, checkpointable; plain reads, not mmap: a
           mapped file truncated on disk kills the process with SIGBUS (measured: exit 135)
  decode   fn.decoders.image, RGB
  crop     ADM-style center crop: resize the shorter side to the model resolution (cubic, antialias),
           then crop the center. ADM halves with BOX filtering first and resizes with PIL's BICUBIC,
           so pixels differ: on 256 px crops of real photos the mean absolute difference is 2.7 of
           255 for PNGs and 3.6 for a JPEG/PNG mix, up to 14 for one image (crop offsets can differ
           by a pixel); cubic was the closest of DALI's filters (linear and Lanczos: 3.4 on the
           PNGs). tests/test_data_folder.py checks it.
  flip     optional horizontal flip, off by default (the official recipe uses none)
  output   float CHW in [-1, 1] (mean = std = 127.5); LastBatchPolicy.DROP for static shapes

A file deleted or overwritten after the scan stops a DALI pipeline for good ("Critical error in
pipeline ... nvImageCodec failure", or "Failed to open file"). DaliLoader then does what the PIL
loader does: it finds the files that changed since the scan and are now unusable, replaces each in
its list by the next usable file (as FolderDataset does), warns once per file, and rebuilds the
pipeline from the reader checkpoint taken before the failed batch. The list keeps its length, so the
shards, the epoch and the sample order stay those of an uninterrupted run, the bad file swapped out.
"""
import base64
import bisect
import os
import time
import warnings

import torch

from .check import check_image

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False


if HAVE_DALI:
    @pipeline_def(enable_checkpointing=True)
    def adm_pipeline(files, labels, image_size, shard_id, num_shards, decoder_device, flip, reader_seed):
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=True, pad_last_batch=True, name="Reader", seed=reader_seed,
                                       dont_use_mmap=True)
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=image_size, interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                          mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror,
                                          output_layout="CHW", dtype=types.FLOAT)
        return images, label


class DaliLoader:
    """Endless batches (x [B, 3, S, S] in [-1, 1] on `device`, y [B] int64) with the Loader
    interface of pmf_fast.data; state_dict() holds DALI's reader checkpoint. scanned_at: the time
    (time.time()) before the files were scanned; files modified after it are the suspects when the
    pipeline fails (default: now)."""

    def __init__(self, files, labels, image_size, batch, rank, world, seed, device, num_threads=4,
                 flip=False, state=None, scanned_at=None):
        if not HAVE_DALI:
            raise ImportError("NVIDIA DALI is not installed: pip install .[dali] (or train.loader=pil)")
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self.files, self.labels = list(files), list(labels)
        self.scanned_at = time.time() if scanned_at is None else scanned_at
        self.replaced = {}                                      # bad path -> (reason, the path used instead)
        self.args = dict(image_size=image_size, shard_id=rank, num_shards=world,
                         decoder_device="mixed" if gpu else "cpu", flip=flip, reader_seed=seed,
                         batch_size=batch, num_threads=num_threads,
                         device_id=(torch.cuda.current_device() if self.device.index is None else self.device.index)
                         if gpu else None, seed=seed + rank)
        self._build(state)

    def _build(self, state):
        ckpt = state if isinstance(state, bytes) else base64.b64decode(state["dali"]) if state else None
        self.pipe = adm_pipeline(files=self.files, labels=self.labels, **self.args, checkpoint=ckpt)
        self.pipe.build()
        self.it = DALIGenericIterator(self.pipe, ["images", "labels"], reader_name="Reader",
                                      last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            pos = self.it.checkpoints()[0]                      # the position of this batch (~30 us)
            try:
                try:
                    out = next(self.it)
                except StopIteration:                           # epoch end: auto_reset starts the next
                    out = next(self.it)
                break
            except RuntimeError as e:
                if "Critical error in pipeline" not in str(e):
                    raise
                self._drop_broken_files(e)
                self._build(pos)                                # the same position, without the bad files
        x, y = out[0]["images"], out[0]["labels"].reshape(-1).long()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _drop_broken_files(self, error):
        """Replace the files that are unusable now (deleted, or changed since the scan and failing the
        checker, or named in DALI's error) by the next usable file. Raises the error again, with a
        message, when no such file is found: then DALI fails on a file that PIL reads."""
        msg = str(error)
        named = {w.strip("'\":,;()[]") for w in msg.split()}
        suspects = []
        for i, f in enumerate(self.files):
            try:
                changed = os.stat(f).st_mtime >= self.scanned_at - 2.0   # 2 s: coarse file-system clocks
            except OSError:
                changed = True                                  # deleted or unreadable
            if changed or f in named:
                suspects.append(i)
        bad = {}
        for i in suspects:
            reason = bad.get(self.files[i]) or check_image(self.files[i])[0]
            if reason:
                bad[self.files[i]] = reason
        if not bad:
            lines = [line.strip() for line in msg.splitlines() if line.strip()]
            first = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[-1]
            raise RuntimeError(f"the DALI pipeline failed, and no image changed since the scan is unreadable "
                               f"({first.strip()[:200]}); run `python -m pmf_fast.data check <data>`, or train "
                               "with train.loader=pil") from error
        good = [i for i, f in enumerate(self.files) if f not in bad]
        if not good:
            raise RuntimeError("no readable image left in the dataset") from error
        for i, f in enumerate(self.files):
            if f in bad:
                j = good[bisect.bisect(good, i) % len(good)]           # the next usable one, as FolderDataset
                if f not in self.replaced:
                    self.replaced[f] = (bad[f], self.files[j])
                    warnings.warn(f"skipping unreadable image {f}: {bad[f]} (changed on disk after the scan); "
                                  f"DALI reads {self.files[j]} in its place from the same position", stacklevel=3)
                self.files[i], self.labels[i] = self.files[j], self.labels[j]

    def state_dict(self):
        # the iterator's checkpoint accounts for batches prefetched but not handed out
        return {"dali": base64.b64encode(self.it.checkpoints()[0]).decode()}

    def load_state_dict(self, state):
        self._build(state)
