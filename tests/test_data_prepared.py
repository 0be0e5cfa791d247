"""Prepared datasets on real photographs (tests/photos.py): prepare is bit-equal to the PIL loader,
resumable after a full disk, refuses another source or size, finds damaged shards; the loader gives
world-size-invariant batches and exact resumes; two ranks share the prepare and the folder scan;
FID statistics and train.py read a prepared dataset directly."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pmf_fast import eval as E
from pmf_fast.config import ConfigError
from pmf_fast.data import PreparedLoader, make_loader
from pmf_fast.data import check as C
from pmf_fast.data.__main__ import main as data_main
from pmf_fast.data.check import load_rgb
from pmf_fast.data.dali import HAVE_DALI, DaliLoader
from pmf_fast.data.folder import FolderDataset, center_crop_arr, usable_images
from pmf_fast.data.prepare import prepare
from pmf_fast.data.shards import FILES, MANIFEST, PreparedError, open_prepared, shard_name
from tests.helpers import RandomExtractor, gloo_group
from tests.photos import CONVERTED, UNUSABLE, photo_folder

SIZE, SHARD = 64, 4                   # 14 files, 13 usable: 4 shards, the last one short


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(src, dst, usable files, labels): the photo folder, prepared by a pool of 2 workers."""
    tmp = tmp_path_factory.mktemp("prepared")
    src = photo_folder(tmp / "src")
    os.environ.setdefault("PMF_CACHE", str(tmp / "cache"))
    prepare(src, str(tmp / "dst"), SIZE, SHARD, workers=2, log=lambda s: None, progress=False)
    files, labels, _, _ = usable_images(src)
    return src, str(tmp / "dst"), files, labels


def test_prepared_images_are_the_pil_loaders_bit_for_bit(prepared):
    src, dst, files, labels = prepared
    ds = open_prepared(dst, SIZE)
    m = ds.manifest
    assert (m["num_files"], m["num_images"], m["converted"]) == (14, 13, len(CONVERTED))
    assert m["unusable"].keys() == UNUSABLE.keys()
    assert all(m["unusable"][f].startswith(why) for f, why in UNUSABLE.items())
    with open(os.path.join(dst, FILES)) as f:
        assert f.read().splitlines() == [os.path.relpath(p, src) for p in files]      # the scan's verdicts
    assert ds.labels.tolist() == labels
    for path, img in zip(files, ds[:]):
        assert np.array_equal(img, center_crop_arr(load_rgb(path), SIZE)), path
    # the loader's floats are FolderDataset's, batch by batch, across an epoch boundary (2 per epoch)
    loader, n, k = make_loader(dst, image_size=SIZE, batch_per_rank=5, device="cpu", log=lambda s: None)
    assert isinstance(loader, PreparedLoader) and (n, k) == (13, 2)
    folder = FolderDataset(files, labels, SIZE)
    for _ in range(3):
        idx = loader.batches.indices(loader.epoch, loader.index)
        x, y = next(loader)
        assert torch.equal(x, torch.stack([folder[i][0] for i in idx]))
        assert y.tolist() == [labels[i] for i in idx]


def test_batches_are_world_size_invariant_and_resume_exactly(prepared):
    dst = prepared[1]
    quiet = lambda s: None                                                          # noqa: E731
    one = make_loader(dst, image_size=SIZE, batch_per_rank=6, seed=3, device="cpu", log=quiet, flip=True)[0]
    two = [make_loader(dst, image_size=SIZE, batch_per_rank=3, rank=r, world_size=2, seed=3, num_workers=2, log=quiet,
                       flip=True)[0] for r in range(2)]
    plain = make_loader(dst, image_size=SIZE, batch_per_rank=6, seed=3, device="cpu", log=quiet)[0]
    mirrored = 0
    for _ in range(3):                                                              # 2 batches per epoch
        (x, y), (px, _) = next(one), next(plain)
        parts = [next(loader) for loader in two]
        for r in range(2):                                  # rank r holds rows r::2 of the global batch
            assert torch.equal(parts[r][0], x[r::2]) and torch.equal(parts[r][1], y[r::2])
        same = [torch.equal(a, b) for a, b in zip(x, px)]
        flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(x, px)]
        assert all(s or f for s, f in zip(same, flipped))
        mirrored += sum(flipped)
    assert 0 < mirrored < 18
    state = one.state_dict()
    expect = [next(one) for _ in range(3)]
    again = make_loader(dst, image_size=SIZE, batch_per_rank=6, seed=3, device="cpu", log=quiet, flip=True)[0]
    again.load_state_dict(state)
    for ex, ey in expect:
        x, y = next(again)
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.gpu(reason="the pinned buffers and CUDA events need a GPU")
def test_cuda_batches_equal_the_cpu_ones(prepared):
    dst = prepared[1]
    cpu = make_loader(dst, image_size=SIZE, batch_per_rank=5, device="cpu", log=lambda s: None, flip=True)[0]
    gpu = make_loader(dst, image_size=SIZE, batch_per_rank=5, device="cuda", num_workers=2, log=lambda s: None,
                      flip=True)[0]
    assert gpu.bufs[0].is_pinned()
    for _ in range(7):                                  # past the epoch and around the ring of 3 buffers
        (a, ya), (b, yb) = next(cpu), next(gpu)
        assert b.is_cuda and b.is_contiguous() and torch.equal(a, b.cpu()) and torch.equal(ya, yb.cpu())


def test_prepare_resumes_after_a_full_disk(prepared, tmp_path, monkeypatch, capsys):
    src, ref = prepared[0], prepared[1]
    dst = str(tmp_path / "dst")
    args = ["prepare", src, dst, "--image-size", str(SIZE), "--shard-size", "3", "--workers", "1"]
    calls, real = [], os.posix_fallocate

    def full_after_two(fd, offset, length):
        calls.append(length)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", full_after_two)
    assert data_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]                 # after the progress bar
    assert err == (f"error: no space left on {dst}: free space and run the same command again to continue "
                   "(2 of 5 shards finished)")
    assert not [f for f in os.listdir(dst) if ".tmp." in f] and not os.path.exists(os.path.join(dst, MANIFEST))
    with pytest.raises(PreparedError, match="unfinished prepared dataset: run .* again to finish it"):
        make_loader(dst, image_size=SIZE, batch_per_rank=2, device="cpu")
    stale = os.path.join(dst, shard_name(4) + ".tmp.999999999")     # as left by a killed run (no such pid)
    open(stale, "wb").write(b"half a shard")
    calls.clear()
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (calls.append(a[2]), real(*a)))
    assert data_main(args) == 0
    assert len(calls) == 3 and not os.path.exists(stale)           # the two finished shards were kept
    a, b = open_prepared(dst), open_prepared(ref)
    assert np.array_equal(a[:], b[:]) and np.array_equal(a.labels, b.labels)
    assert a.manifest["unusable"] == b.manifest["unusable"]


def test_damaged_shards_are_found_and_rewritten(prepared, tmp_path, capsys):
    src, dst = prepared[0], str(tmp_path / "dst")
    shutil.copytree(prepared[1], dst)
    per_image = SIZE * SIZE * 3

    def poke(k, image):                                              # change one byte of an image
        with open(os.path.join(dst, shard_name(k)), "r+b") as f:
            f.seek(128 + image * per_image + 1000)
            b = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([b ^ 0x5A]))
    poke(0, 1)                                                       # not a sampled image: only verify sees it
    assert len(open_prepared(dst)) == 13
    poke(1, 0)
    with pytest.raises(PreparedError, match=r"shard-00001\.npy is damaged: image 0 differs .* prepare .* again"):
        open_prepared(dst)
    with open(os.path.join(dst, shard_name(2)), "r+b") as f:
        f.truncate(128 + per_image * 2 + 77)
    assert data_main(["verify", dst, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD  shard-00000.npy: checksum mismatch" in out and "BAD  shard-00001.npy: image 0 differs" in out
    assert f"BAD  shard-00002.npy: {128 + per_image * 2 + 77:,} bytes, expected {128 + per_image * 4:,}" in out
    # prepare rewrites what its cheap check finds; a shard deleted after `verify` is rewritten too
    os.remove(os.path.join(dst, shard_name(0)))
    assert data_main(["prepare", src, dst, "--image-size", str(SIZE), "--shard-size", str(SHARD),
                      "--workers", "1"]) == 0
    assert data_main(["verify", dst, "--workers", "1"]) == 0
    assert np.array_equal(open_prepared(dst)[:], open_prepared(prepared[1])[:])


def test_prepare_refuses_other_sources_sizes_and_dirs(prepared, tmp_path):
    src, dst = prepared[0], prepared[1]
    with pytest.raises(PreparedError, match=f"holds {SIZE} px images, not 32 px: choose another DST"):
        prepare(src, dst, 32, log=lambda s: None)
    with pytest.raises(PreparedError, match=f"holds {SIZE} px images but 32 px are asked for"):
        make_loader(dst, image_size=32, batch_per_rank=2, device="cpu")
    other = photo_folder(tmp_path / "other", per_class=1, seed=1)
    with pytest.raises(PreparedError, match=f"was prepared from {src}, not {other}"):
        prepare(other, dst, SIZE, SHARD, log=lambda s: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(PreparedError, match="not empty and holds no prepared dataset"):
        prepare(other, str(tmp_path / "full"), SIZE, log=lambda s: None)
    with pytest.raises(PreparedError, match="inside SRC"):
        prepare(other, os.path.join(other, "prepared"), SIZE, log=lambda s: None)
    mine = str(tmp_path / "mine")
    prepare(other, mine, 16, workers=1, log=lambda s: None, progress=False)
    shutil.copy(os.path.join(other, "china", "0.png"), os.path.join(other, "china", "new.png"))
    with pytest.raises(PreparedError, match="changed since .* was begun .* prepare into a new DST"):
        prepare(other, mine, 16, workers=1, log=lambda s: None)


def _two_ranks(rank, world, init_file, src, out_dir):
    """Rank `rank`: the shared folder scan (counting the files this rank checks), twice, then its
    part of a prepare."""
    import torch.distributed as dist

    os.environ["PMF_CACHE"] = os.path.join(out_dir, "cache")
    checked = []
    real = C._check_files
    C._check_files = lambda files, workers: (checked.append(len(files)), real(files, workers))[1]
    with gloo_group(rank, world, init_file):
        first = usable_images(src, workers=1)[0]
        second = usable_images(src, workers=1)[0]
        prepare(src, os.path.join(out_dir, "dst"), SIZE, SHARD, workers=1, rank=rank, world=world,
                log=lambda s: None, progress=False)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"checked": checked, "first": first, "second": second}, f)


def test_two_ranks_share_the_scan_and_the_prepare(prepared, tmp_path):
    src, ref, files, _ = prepared
    # fork: the ranks inherit the imports (a spawned rank re-imports torch: 10-20 s on a busy 2-core machine)
    mp.start_processes(_two_ranks, args=(2, str(tmp_path / "init"), src, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["checked"] for r in ranks] == [[7], [7]]                    # 14 files, each checked once
    assert all(r["first"] == r["second"] == files for r in ranks)
    assert len(os.listdir(tmp_path / "cache")) == 1                       # written once, read by both
    a, b = open_prepared(str(tmp_path / "dst")), open_prepared(ref)
    assert [e["sha256"] for e in a.manifest["shards"]] == [e["sha256"] for e in b.manifest["shards"]]
    assert a.manifest["unusable"] == b.manifest["unusable"]


def test_a_damaged_scan_cache_is_scanned_again_and_rewritten(prepared, tmp_path, monkeypatch):
    src, _, files, _ = prepared
    monkeypatch.setenv("PMF_CACHE", str(tmp_path))
    usable_images(src, workers=1)
    (cache,) = tmp_path.iterdir()
    cache.write_text('{"bad": {"')                                   # cut short, as by a crash without atomicity
    assert usable_images(src, workers=1)[0] == files
    assert json.loads(cache.read_text())["bad"].keys() == {os.path.join(src, f) for f in UNUSABLE}


def test_fid_statistics_from_a_prepared_dataset(prepared, monkeypatch):
    src, dst, files, _ = prepared
    ex = RandomExtractor()
    for name in os.listdir(dst):
        if name.startswith("fid_stats-"):
            os.remove(os.path.join(dst, name))
    st, real = E.prepared_reference(dst, ex, SIZE, batch=5, keep=4)
    pool, _ = E.extract(ex, np.stack([center_crop_arr(load_rgb(f), SIZE) for f in files]))
    ref = E.stats(pool)
    assert np.allclose(st["mu"], ref["mu"], rtol=1e-12, atol=0) and np.allclose(st["sigma"], ref["sigma"], rtol=1e-9)
    assert np.array_equal(real, pool[[0, 4, 8, 12]])
    monkeypatch.setattr(E, "extract", lambda *a, **k: pytest.fail("the cached statistics were not used"))
    cached, _ = E.reference(dst, ex, SIZE)
    assert np.array_equal(cached["sigma"], st["sigma"])


def test_a_damaged_fid_cache_is_computed_again(prepared, tmp_path):
    dst = str(tmp_path / "dst")
    shutil.copytree(prepared[1], dst)
    ex = RandomExtractor()
    st, real = E.prepared_reference(dst, ex, SIZE, batch=5, keep=4)
    (cache,) = [os.path.join(dst, n) for n in os.listdir(dst) if n.startswith("fid_stats-")]
    whole = open(cache, "rb").read()
    for damaged in (whole[: len(whole) // 2], b"", whole[:-8] + bytes(8)):       # cut short, empty, its tail lost
        open(cache, "wb").write(damaged)
        with pytest.warns(UserWarning, match=r"fid_stats-.*\.npz is (damaged|not a readable \.npz).*computed again"):
            again, real_again = E.prepared_reference(dst, ex, SIZE, batch=5, keep=4)
        assert np.array_equal(again["sigma"], st["sigma"]) and np.array_equal(real_again, real)
        assert open(cache, "rb").read() == whole                                       # and written again
    assert not [n for n in os.listdir(dst) if ".tmp." in n]


def _fid_reference_ranks(rank, world, init_file, dst, out_dir):
    """Rank `rank` sets up the periodic FID of a run on the prepared dataset (counting the images
    this rank puts through the extractor), then again with rank 0's computation failing."""
    import torch.distributed as dist

    from pmf_fast import sampling
    from pmf_fast.config import get_config
    from pmf_fast.dist import RankFailed
    cfg = get_config("pMF-XS/4-test")
    cfg.train.eval_every, cfg.train.fid_ref, cfg.model.image_size = 1, dst, SIZE
    E.InceptionExtractor = lambda device: RandomExtractor()
    seen, real = [], E.extract
    E.extract = lambda ex, images, *a, **k: (seen.append(len(images)), real(ex, images, *a, **k))[1]
    lines = []
    with gloo_group(rank, world, init_file):
        ts = sampling.TrainSampling(cfg, model=None, emas=None, run_dir=out_dir, num_classes=10, device="cpu",
                                    rank=rank, world=world, log=lines.append)
        ready = ts.fid_setup is not None and (ts.fid_setup[1] is not None) == (rank == 0)
        E.prepared_reference = lambda *a: (_ for _ in ()).throw(RuntimeError("disk on fire"))
        try:
            sampling.TrainSampling(cfg, model=None, emas=None, run_dir=out_dir, num_classes=10, device="cpu",
                                   rank=rank, world=world, log=lines.append)
            failure = None
        except (RuntimeError, RankFailed) as e:
            failure = f"{type(e).__name__}: {e}"
        dist.barrier()
    with open(os.path.join(out_dir, f"fid{rank}.json"), "w") as f:
        json.dump({"seen": sum(seen), "ready": ready, "failure": failure, "lines": lines}, f)


@pytest.mark.slow
def test_one_rank_computes_the_fid_reference(prepared, tmp_path):
    dst = str(tmp_path / "dst")
    shutil.copytree(prepared[1], dst)
    for name in os.listdir(dst):
        if name.startswith("fid_stats-"):
            os.remove(os.path.join(dst, name))
    # spawn: forked ranks that run torch ops hung in the full suite (the parent's OpenMP pool is not fork-safe)
    mp.start_processes(_fid_reference_ranks, args=(2, str(tmp_path / "init"), dst, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [json.load(open(tmp_path / f"fid{r}.json")) for r in range(2)]
    assert [r["seen"] for r in ranks] == [13, 0] and all(r["ready"] for r in ranks)       # 13 images, once
    assert len([n for n in os.listdir(dst) if n.startswith("fid_stats-")]) == 1
    assert ranks[0]["failure"] == "RuntimeError: disk on fire"                 # its own error; the other rank
    assert ranks[1]["failure"].startswith("RankFailed: rank 0 on ")            # stops with its line, no hang
    assert ranks[1]["failure"].endswith("failed in computing the FID reference statistics: disk on fire")


@pytest.mark.skipif(not HAVE_DALI, reason="pip install .[dali] brings NVIDIA DALI (CI installs it)")
def test_dali_cpu_on_the_photo_folder_is_close_to_the_prepared_crop(prepared):
    src, dst, files, _ = prepared
    ds = open_prepared(dst)
    dali = DaliLoader(files, list(range(len(files))), SIZE, 4, 0, 1, seed=0, device="cpu", num_threads=1)
    diffs = []
    for _ in range(3):
        x, idx = next(dali)
        ref = torch.from_numpy(ds[:][idx.numpy()]).permute(0, 3, 1, 2).float()
        diffs += (x * 127.5 + 127.5 - ref).abs().mean((1, 2, 3)).tolist()
    print(f"DALI (CPU) vs prepared ADM crop at {SIZE} px: mean |diff| {np.mean(diffs):.2f} / 255, "
          f"worst image {max(diffs):.2f}")
    # measured 4.2 mean, 10.5 worst (at 256 px on other crops: 3.6 and 14, tests/test_data_folder.py)
    assert np.mean(diffs) < 6.0 and max(diffs) < 20.0


def test_train_reads_a_prepared_dataset(prepared, tmp_path, capsys):
    import train
    dst = str(tmp_path / "dst16")
    prepare(prepared[0], dst, 16, workers=1, log=lambda s: None, progress=False)
    run = train.main(["--preset", "pMF-XS/4-test", "--name", "prep", f"train.out_dir={tmp_path}",
                      f"train.data={dst}", "train.steps=2", "model.in_channels=3", "train.batch_size=4",
                      "train.num_workers=2", "train.flip=true"])
    out = capsys.readouterr().out
    assert f"data {dst}: prepared, 13 images in 2 classes at 16 px" in out
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))] == [2]
    with pytest.raises(ConfigError, match="holds 16 px images but 32 px are asked for"):    # one line in train.py
        train.main(["--preset", "pMF-XS/4-test", "--name", "p32", f"train.out_dir={tmp_path}", f"train.data={dst}",
                    "model.in_channels=3", "model.image_size=32"])
