"""ImageFolder data: the bad-file checker, the PIL and DALI loaders on the same real photos
(scikit-learn's bundled china.jpg and flower.jpg, cropped and re-encoded), labels, shards, resume."""
import io
import json
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from pmf_fast.data.__main__ import main as check_main
from pmf_fast.data.check import DecompressionBomb, check_image, load_rgb
from pmf_fast.data.dali import HAVE_DALI, DaliLoader
from pmf_fast.data.folder import FolderDataset, center_crop_arr, scan_folder, usable_images

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="pip install .[dali] brings NVIDIA DALI (CI installs it)")
BAD = {"zero.jpg": "empty file", "text.jpg": "not an image", "truncated.jpg": "truncated or corrupt",
       "corrupt.png": "truncated or corrupt", "anim.png": "unsupported format GIF"}
CONVERTED = {"gray.jpg": "L", "cmyk.jpg": "CMYK", "alpha.png": "RGBA", "palette.png": "P", "deep.png": "I;16"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    photos = load_sample_images().images                        # two real 427 x 640 photos
    for name, photo in zip(["china", "flower"], photos):
        os.makedirs(root / name)
        for i in range(6):
            crop = photo[i * 12: i * 12 + 300 + 10 * i, i * 30: i * 30 + 420]
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(crop).save(root / name / f"{i}.{ext}", quality=95)
    odd = root / "flower"
    good = np.asarray(load_sample_images().images[1][:200, :260])
    (odd / "zero.jpg").write_bytes(b"")
    (odd / "text.jpg").write_text("this is not a picture")
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "JPEG", quality=95)
    (odd / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)           # breaks the zlib stream / CRC
    (odd / "corrupt.png").write_bytes(bytes(data))
    Image.fromarray(good).save(odd / "anim.png", format="GIF")      # a GIF named .png
    Image.fromarray(good).convert("L").save(odd / "gray.jpg")
    Image.fromarray(good).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(good).convert("RGBA").save(odd / "alpha.png")
    Image.fromarray(good).convert("P").save(odd / "palette.png")
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(odd / "deep.png")
    (odd / "README.txt").write_text("not an image either")
    return root


def test_check_lists_every_unusable_file(folder, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PMF_CACHE", str(tmp_path))
    assert check_main(["check", str(folder), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    bad = {line.split(": ", 1)[0].split("/")[-1]: line.split(": ", 1)[1] for line in out.splitlines()
           if line.startswith("BAD")}
    expect = dict(BAD, **{"README.txt": "not an image"})
    assert bad.keys() == expect.keys()
    for name, reason in expect.items():
        assert bad[name].startswith(reason), (name, bad[name])
    assert "23 files in 2 classes: 17 usable, 6 unusable" in out
    for name, mode in CONVERTED.items():
        assert check_image(str(folder / "flower" / name)) == (None, f"converted from {mode}")
        assert load_rgb(str(folder / "flower" / name)).mode == "RGB"
    deep = np.asarray(load_rgb(str(folder / "flower" / "deep.png")))[..., 0]
    assert abs(int(deep.max()) - int(load_sample_images().images[1][:200, :260, 0].max())) <= 1   # 16 -> 8 bit


def test_scan_is_cached_and_refreshed(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("PMF_CACHE", str(tmp_path))
    files, labels, classes, report = usable_images(str(folder))
    assert len(files) == 12 + len(CONVERTED) and "5 unusable excluded" in report   # .txt is not an image file
    assert len(os.listdir(tmp_path)) == 1
    usable_images(str(folder))
    assert len(os.listdir(tmp_path)) == 1                                          # reused


def test_labels_match_imagefolder(folder):
    import torchvision
    files, labels, classes = scan_folder(str(folder))
    ref = torchvision.datasets.ImageFolder(str(folder), loader=lambda p: p,
                                           is_valid_file=lambda p: p.endswith((".jpg", ".png")))
    assert classes == ref.classes
    assert [(f, l) for f, l in zip(files, labels)] == [(p, l) for p, l in ref.samples]


def test_pil_loader_replaces_a_file_broken_after_the_scan(folder, tmp_path):
    files, labels, _, _ = usable_images(str(folder))
    broken = tmp_path / "gone.jpg"
    broken.write_bytes(b"")
    ds = FolderDataset([str(broken)] + files, [7] + labels, 32)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y = ds[0]
    assert y == labels[0] and x.shape == (3, 32, 32)


@needs_dali
def test_dali_and_pil_give_the_same_crops(folder):
    files, _, _, _ = usable_images(str(folder))
    files = [f for f in files if "/flower/" not in f or os.path.basename(f)[0].isdigit()]   # the 12 photos
    size = 256
    dali = DaliLoader(files, list(range(len(files))), size, 4, 0, 1, seed=0, device="cpu", num_threads=2)
    seen, diffs = set(), []
    for _ in range(len(files) // 4):
        x, idx = next(dali)
        for img, i in zip(x, idx.tolist()):
            seen.add(i)
            ref = torch.from_numpy(np.ascontiguousarray(center_crop_arr(load_rgb(files[i]), size))).permute(2, 0, 1)
            diffs.append((img * 127.5 + 127.5 - ref.float()).abs().mean().item())
    assert len(seen) == 12
    print(f"DALI vs PIL ADM crop at {size} px: mean |diff| {np.mean(diffs):.2f} / 255, max per image {max(diffs):.2f}")
    # measured: 3.6 mean, 14 worst image (ADM's BOX halving + PIL bicubic against one antialiased cubic
    # resize, and crop offsets that can differ by a pixel)
    assert np.mean(diffs) < 4.0 and max(diffs) < 16.0


@needs_dali
def test_dali_shards_partition_and_resume(folder):
    files, _, _, _ = usable_images(str(folder))
    n = len(files)
    per_rank = []
    for rank in range(2):
        loader = DaliLoader(files, list(range(n)), 32, 4, rank, 2, seed=3, device="cpu", num_threads=1)
        got = [next(loader)[1].tolist() for _ in range(2)]                      # one epoch: 8 of 8.5 per rank
        per_rank.append({i for b in got for i in b})
    assert not per_rank[0] & per_rank[1] and len(per_rank[0]) == len(per_rank[1]) == 8

    a = DaliLoader(files, list(range(n)), 32, 4, 0, 1, seed=3, device="cpu", num_threads=1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expect = [next(a)[1] for _ in range(4)]                                      # crosses an epoch
    b = DaliLoader(files, list(range(n)), 32, 4, 0, 1, seed=3, device="cpu", num_threads=1, state=state)
    assert all(torch.equal(e, next(b)[1]) for e in expect)


@pytest.mark.parametrize("loader", ["pil"] + (["dali"] if HAVE_DALI else []))
def test_training_on_a_folder_with_bad_files(folder, tmp_path, loader, capsys, monkeypatch):
    import train
    monkeypatch.setenv("PMF_CACHE", str(tmp_path))
    run = train.main(["--preset", "pMF-XS/4-test", "--name", loader, f"train.out_dir={tmp_path}",
                      f"train.data={folder}", f"train.loader={loader}", "train.steps=3", "model.in_channels=3",
                      "train.batch_size=4", "train.num_workers=1", "train.ckpt_every=2"])
    out = capsys.readouterr().out
    assert "17 usable images in 2 classes; 5 unusable excluded, 5 converted" in out
    assert [json.loads(l)["step"] for l in open(os.path.join(run, "log.jsonl"))] == [3]
    resumed = train.main(["--resume", run, "train.steps=5"])                     # data position restored
    assert [json.loads(l)["step"] for l in open(os.path.join(resumed, "log.jsonl"))] == [3, 5]


def test_check_cli_on_a_missing_dir(tmp_path, capsys):
    assert check_main(["check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def forged_png(w, h):
    """A 69-byte PNG whose IHDR (valid CRC) claims w x h RGB pixels: what a decompression bomb shows PIL."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def forged_bmp(w, h):
    """A 118-byte BMP whose BITMAPINFOHEADER claims w x h 24-bit pixels."""
    pixels = bytes(64)
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(pixels), 0, 0, 14 + len(dib)) + dib + pixels


def test_decompression_bombs_are_listed_and_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMF_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng()
    root = tmp_path / "data"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    huge = int(rng.integers(60_000, 100_001)), int(rng.integers(60_000, 100_001))   # > 2x PIL's limit: its error
    big = int(rng.integers(9_500, 10_500)), 10_000                                   # 1x..2x the limit: its warning
    (root / "a" / "huge.png").write_bytes(forged_png(*huge))
    (root / "b" / "big.bmp").write_bytes(forged_bmp(*big))
    limit = Image.MAX_IMAGE_PIXELS

    assert check_main(["check", str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"huge.png: decompression bomb: {huge[0]}x{huge[1]} pixels exceeds PIL's limit of {limit}" in out
    assert f"big.bmp: decompression bomb: {big[0]}x{big[1]} pixels exceeds PIL's limit of {limit}" in out
    assert "6 files in 2 classes: 4 usable, 2 unusable" in out and Image.MAX_IMAGE_PIXELS == limit

    files, labels, _, report = usable_images(str(root))
    assert len(files) == 4 and "2 unusable excluded" in report and not any("huge" in f or "big" in f for f in files)

    # the PIL loader: a file that became a bomb after the scan is skipped with a warning, not a crash
    for bomb, size in ((root / "a" / "huge.png", huge), (root / "b" / "big.bmp", big)):
        with pytest.raises(DecompressionBomb, match=f"{size[0]}x{size[1]} pixels"):
            load_rgb(str(bomb))
        ds = FolderDataset([str(bomb)] + files, [5] + labels, 16)
        with pytest.warns(UserWarning, match=f"skipping unreadable image .*{bomb.name}: decompression bomb"):
            x, y = ds[0]
        assert y == labels[0] and x.shape == (3, 16, 16)


def tiny_jpegs(root, n, age_s=100):
    """n random 8x8 JPEGs, dated age_s seconds back (scanned long ago)."""
    rng, files = np.random.default_rng(), []
    past = time.time() - age_s
    for i in range(n):
        path = str(root / f"{i:04d}.jpg")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, quality=90)
        os.utime(path, (past, past))
        files.append(path)
    return files, rng


# DALI's reader fills a shuffle buffer of 1,024 samples (initial_fill) when it starts: with 1,100 files,
# about 70 are read only later, after the damage; every 10th file damaged hits several of them
N_DAMAGE = 1100


@needs_dali
@pytest.mark.parametrize("damage", ["delete", "overwrite"])
def test_dali_replaces_files_broken_after_the_scan(tmp_path, damage):
    files, rng = tiny_jpegs(tmp_path, N_DAMAGE)
    labels = list(range(N_DAMAGE))
    loader = DaliLoader(files, labels, 8, 4, 0, 1, seed=5, device="cpu", num_threads=1)
    batches = [next(loader)]
    broken = set(range(int(rng.integers(0, 10)), N_DAMAGE, 10))
    for i in broken:
        if damage == "delete":
            os.remove(files[i])
        else:
            with open(files[i], "wb") as f:
                f.write(rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches += [next(loader) for _ in range(N_DAMAGE // 4 + 10)]            # past the epoch's end
    warned = {str(w.message).split(":")[0].removeprefix("skipping unreadable image ") for w in caught
              if "skipping unreadable image" in str(w.message)}
    assert warned == {files[i] for i in broken}                                 # once per file, named
    assert len(caught) == len(broken)

    # the same order as a run that had the next usable file in each broken one's place from the start
    instead = {i: min([j for j in range(i + 1, N_DAMAGE) if j not in broken] or [0]) for i in broken}
    ref = DaliLoader([files[instead.get(i, i)] for i in labels], [instead.get(i, i) for i in labels], 8, 4, 0, 1,
                     seed=5, device="cpu", num_threads=1)
    read_before = 0
    for x, y in batches:
        rx, ry = next(ref)
        assert [instead.get(i, i) for i in y.tolist()] == ry.tolist()
        if broken & set(y.tolist()):
            read_before += 1                    # a broken file read (into the shuffle buffer) before the damage
        else:
            assert torch.equal(x, rx)
    assert read_before < len(batches) // 2                 # most batches compared image by image


@needs_dali
def test_dali_failure_without_a_changed_file_says_so(tmp_path):
    files, rng = tiny_jpegs(tmp_path, N_DAMAGE)
    loader = DaliLoader(files, list(range(N_DAMAGE)), 8, 4, 0, 1, seed=5, device="cpu", num_threads=1)
    next(loader)
    st = os.stat(files[0])
    for f in files[int(rng.integers(0, 10))::10]:                   # overwritten, mtime set back: invisible
        open(f, "wb").write(b"garbage")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(RuntimeError, match="no image changed since the scan is unreadable.*nvImageCodec"):
        for _ in range(N_DAMAGE // 4):
            next(loader)


# ----------------------------------------------------------------------------- one rank fails in the shared scan
def _scan_on_two_ranks(rank, world, init_file, src, out_dir, failing):
    """Rank `rank` scans the folder with the others; on rank 1, `failing` ("listing" or "checking")
    raises first. Writes this rank's outcome: "ok" or the exception's type and line."""
    import torch.distributed as dist

    from pmf_fast.data import check, folder
    from tests.helpers import write_outcome
    os.environ["PMF_CACHE"] = os.path.join(out_dir, f"cache{rank}")
    if rank == 1 and failing == "listing":
        folder.scan_folder = lambda root: (_ for _ in ()).throw(ValueError(f"{root} is not mounted on this node"))
    if rank == 1 and failing == "checking":
        check._check_files = lambda files, workers: (_ for _ in ()).throw(RuntimeError("a scan worker was killed"))
    # a short timeout: a rank left waiting fails the test within a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    write_outcome(out_dir, rank, lambda: folder.usable_images(src, workers=1))
    dist.destroy_process_group()


@pytest.mark.parametrize("failing", ["listing", "checking"])
def test_a_rank_failing_in_the_shared_scan_stops_every_rank(tmp_path, failing):
    """The folder scan gathers over the ranks; a rank that fails before a gather (its folder missing,
    its worker pool broken) stops the others with its line, none waiting in the gather."""
    import torch.multiprocessing as mp

    from tests.photos import photo_folder
    src = photo_folder(tmp_path / "src", per_class=2, seed=int(np.random.default_rng(0).integers(100)))
    mp.start_processes(_scan_on_two_ranks, args=(2, str(tmp_path / "init"), str(src), str(tmp_path), failing),
                       nprocs=2, start_method="fork")
    own, other = (json.load(open(tmp_path / f"rank{r}.json")) for r in (1, 0))
    what = "listing" if failing == "listing" else "checking the images"
    line = "is not mounted on this node" if failing == "listing" else "a scan worker was killed"
    assert own.endswith(line) and not own.startswith("RankFailed"), own
    assert other.startswith("RankFailed: rank 1 on ") and what in other and other.endswith(line), other
