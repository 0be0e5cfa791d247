import numpy as np
import pytest
import torch
from PIL import Image

from pmf_fast.data import ShardedBatches, make_loader
from pmf_fast.data.digits import load_digits_split
from pmf_fast.data.folder import center_crop_arr, scan_folder


def test_shards_partition_each_global_batch():
    n, b, world = 103, 5, 3
    shards = [ShardedBatches(n, b, r, world, seed=7) for r in range(world)]
    for epoch in range(2):
        seen = []
        for i in range(shards[0].per_epoch):
            parts = [s.indices(epoch, i) for s in shards]
            assert all(len(p) == b for p in parts)
            seen += torch.cat(parts).tolist()
        assert len(seen) == len(set(seen)) == shards[0].per_epoch * b * world     # no overlap in an epoch


def test_loader_resumes_at_the_same_position():
    a, _, _ = make_loader("digits", image_size=16, batch_per_rank=32)
    for _ in range(50):                                   # past an epoch boundary (44 batches)
        next(a)
    state = a.state_dict()
    expect = [next(a)[1] for _ in range(3)]
    b, _, _ = make_loader("digits", image_size=16, batch_per_rank=32)
    b.load_state_dict(state)
    assert all(torch.equal(x, next(b)[1]) for x in expect)


def test_digits_split():
    (x, y), (xt, yt) = load_digits_split(16)
    assert x.shape == (1437, 1, 16, 16) and xt.shape == (360, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["zebra", "ant", "moth"]:
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40 + i, 57, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    files, labels, classes = scan_folder(str(tmp_path))
    assert classes == ["ant", "moth", "zebra"] and len(files) == 12            # sorted, as ImageFolder
    assert labels == sorted(labels)
    loader, n, k = make_loader(str(tmp_path), image_size=16, batch_per_rank=4)
    x, y = next(loader)
    assert (n, k) == (12, 3) and x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_center_crop_is_adm():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    # by hand: BOX halvings while the short side is >= 128 (300 -> 150 -> 75), BICUBIC to 64, center crop
    half = img.resize((350, 150), resample=Image.BOX).resize((175, 75), resample=Image.BOX)
    small = np.array(half.resize((round(175 * 64 / 75), 64), resample=Image.BICUBIC))
    left = (small.shape[1] - 64) // 2
    assert np.array_equal(out, small[:, left:left + 64])


def test_bad_dataset_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(str(tmp_path))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no images"):
        scan_folder(str(tmp_path))


def test_flip_is_optional_seeded_and_mirrors():
    plain, _, _ = make_loader("digits", image_size=16, batch_per_rank=32)
    flipped, _, _ = make_loader("digits", image_size=16, batch_per_rank=32, flip=True)
    again, _, _ = make_loader("digits", image_size=16, batch_per_rank=32, flip=True)
    (a, ya), (b, yb), (c, _) = next(plain), next(flipped), next(again)
    assert torch.equal(ya, yb) and torch.equal(b, c)                       # same position, same flips
    same = [(b[i] == a[i]).all().item() for i in range(32)]
    mirrored = [(b[i] == a[i].flip(-1)).all().item() for i in range(32)]
    assert all(s or m for s, m in zip(same, mirrored)) and 4 < sum(mirrored) < 28


def _loader_on_two_ranks(rank, world, init_file, folder, out_dir):
    """make_loader where rank 0 sees a prepared dataset at train.data and rank 1 an image folder."""
    import datetime

    import torch.distributed as dist

    import pmf_fast.data as D
    from tests.helpers import write_outcome
    if rank == 0:
        D.is_prepared = lambda path: True
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))       # a rank left waiting fails within a minute
    write_outcome(out_dir, rank, lambda: D.make_loader(folder, image_size=16, batch_per_rank=2, rank=rank,
                                                       world_size=world, log=lambda s: None))
    dist.destroy_process_group()


def test_ranks_that_see_different_kinds_of_data_stop_together(tmp_path):
    """A prepared dataset on one node and a plain folder at the same path on another would send the
    ranks down branches with different gathers: both stop at once with one line naming the ranks."""
    import json

    import torch.multiprocessing as mp

    from tests.photos import photo_folder
    folder = str(photo_folder(tmp_path / "src", per_class=2))
    mp.start_processes(_loader_on_two_ranks, args=(2, str(tmp_path / "init"), folder, str(tmp_path)), nprocs=2,
                       start_method="fork")
    for r in range(2):
        got = json.load(open(tmp_path / f"rank{r}.json"))
        assert got == (f"ValueError: train.data={folder} differs between the ranks (ranks [0] see a prepared "
                       "dataset; ranks [1] see an image folder): put it on storage every node sees, the same on all "
                       "of them"), got
