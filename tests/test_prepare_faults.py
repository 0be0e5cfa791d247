"""Faults of `python -m pmf_fast.data prepare`, as a user meets them: SIGTERM, Ctrl-C and kill -9 of
the process (no worker outlives it, one line, the rerun gives the same dataset), a class folder
without read permission and a DST that cannot be written (as an unprivileged user: root reads and
writes everything), and a rank that fails under torch.distributed (the others stop with its line)."""
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from pmf_fast.data.__main__ import main as data_main
from pmf_fast.data.prepare import prepare
from pmf_fast.data.shards import MANIFEST, open_prepared, shard_name
from tests.photos import photo_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, SHARD = 32, 3
NOBODY = 65534
quiet = lambda s: None                                                              # noqa: E731


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(src, dst): the photo folder and its prepared copy (one process, the reference)."""
    tmp = tmp_path_factory.mktemp("faults")
    src = photo_folder(tmp / "src")
    prepare(src, str(tmp / "ref"), SIZE, SHARD, workers=1, log=quiet, progress=False)
    return src, str(tmp / "ref")


def _children(pid):
    """The pids whose parent is `pid`."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _alive(pid):
    """Whether pid runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _slow_prepare(src, dst):
    """prepare in a new process group with 2 workers, each file slowed to 1 s (so that it is still
    running when the test stops it, 1 s after the workers start, on a loaded machine too: at 0.3 s
    a whole prepare of the photos once finished first); returns (the process, its 2 worker pids)."""
    code = ("import sys, time\n"
            "import pmf_fast.data.prepare as p\n"
            "real = p.inspect_image\n"
            "p.inspect_image = lambda path: (time.sleep(1.0), real(path))[1]\n"
            "from pmf_fast.data.__main__ import main\n"
            f"sys.exit(main(['prepare', {src!r}, {dst!r}, '--image-size', '{SIZE}', '--shard-size', '{SHARD}', "
            "'--workers', '2']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                       PYTHONPATH=ROOT))
    deadline = time.time() + 120
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)                                                        # a few chunks in flight
    return proc, _children(proc.pid)


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_a_stopped_prepare_leaves_no_worker_and_resumes_identically(photos, tmp_path, how):
    src, ref = photos
    dst = str(tmp_path / "dst")
    proc, workers = _slow_prepare(src, dst)
    if how == "Ctrl-C":                                    # a terminal signals the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    time.sleep(1.5)                                        # the workers' parent poll runs every 0.5 s
    assert [w for w in workers if _alive(w)] == [], f"workers alive after {how}"
    if how != "SIGKILL":
        assert "Traceback" not in err, err
        assert proc.returncode == (130 if how == "Ctrl-C" else 143)
        assert err.strip().splitlines()[-1] == (f"prepare stopped by {'Ctrl-C' if how == 'Ctrl-C' else how}: what is "
                                                "finished is kept; run the same command again to continue")
        assert not [f for f in os.listdir(dst) if ".tmp." in f]          # the unfinished shards removed
    assert not os.path.exists(os.path.join(dst, MANIFEST))
    assert data_main(["prepare", src, dst, "--image-size", str(SIZE), "--shard-size", str(SHARD),
                      "--workers", "1"]) == 0
    a, b = open_prepared(dst), open_prepared(ref)
    assert np.array_equal(a[:], b[:]) and np.array_equal(a.labels, b.labels)
    assert a.manifest["unusable"] == b.manifest["unusable"] and not [f for f in os.listdir(dst) if ".tmp." in f]


def _as_nobody(fn, *args):
    """fn(*args) in a forked child that runs as the user nobody; returns what it returned (JSON)."""
    Image.init()                                     # PIL's plugins, imported here: the child may not read them
    out = tempfile.mkdtemp()
    os.chmod(out, 0o777)

    def child():
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(fn(*args), f)
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(120)
    try:
        assert p.exitcode == 0, f"the child exited with {p.exitcode}"
        with open(os.path.join(out, "result.json")) as f:
            return json.load(f)
    finally:
        shutil.rmtree(out)


def _prepare_logged(src, dst):
    lines = []
    prepare(src, dst, SIZE, SHARD, workers=1, log=lines.append, progress=False)
    return lines


def _check_output(src):
    """The exit status and the output of `python -m pmf_fast.data check SRC`."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = data_main(["check", src, "--no-cache", "--workers", "1"])
    return [rc, out.getvalue()]


def _cli_errors(src, *dsts):
    """The exit status and the last stderr line of `prepare SRC DST` for each DST."""
    import contextlib
    import io
    out = []
    for dst in dsts:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = data_main(["prepare", src, dst, "--image-size", str(SIZE), "--shard-size", str(SHARD),
                            "--workers", "1"])
        out.append([rc, err.getvalue().strip().splitlines()[-1]])
    return out


@pytest.fixture
def open_tree(photos):
    """A copy of the photo folder that the user nobody can reach (pytest's tmp_path is root's only)."""
    root = tempfile.mkdtemp()
    try:
        os.chmod(root, 0o755)
        shutil.copytree(photos[0], os.path.join(root, "src"))
        yield root
    finally:
        for dirpath, dirs, _ in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)
        shutil.rmtree(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the prepare as the user nobody")
def test_an_unreadable_class_folder_is_listed_and_warned_about(photos, open_tree):
    src, dst = os.path.join(open_tree, "src"), os.path.join(open_tree, "dst")
    shutil.copytree(os.path.join(src, "china"), os.path.join(src, "locked"))
    os.chmod(os.path.join(src, "locked"), 0o000)
    os.makedirs(dst, mode=0o777)
    os.chmod(dst, 0o777)
    lines = _as_nobody(_prepare_logged, src, dst)
    assert lines[0].startswith(f"warning: 1 folder(s) of {src} cannot be read, their images are left out")
    m = open_prepared(dst).manifest
    assert m["unusable"]["locked/"] == "folder not readable (Permission denied): its images are left out"
    assert m["classes"] == ["china", "flower", "locked"] and m["num_images"] == open_prepared(photos[1]).manifest[
        "num_images"]
    assert "locked/: folder not readable" in lines[-1]                        # and in the closing summary
    rc, out = _as_nobody(_check_output, src)                                 # and the checker names it
    assert rc == 1 and f"BAD  {src}/locked/: folder not readable (Permission denied)" in out, out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the prepare as the user nobody")
def test_an_unwritable_dst_stops_with_the_remedy(photos, open_tree):
    src = os.path.join(open_tree, "src")
    new, part = os.path.join(open_tree, "new"), os.path.join(open_tree, "part")
    os.makedirs(new)                                                       # root's, empty: nobody cannot write
    prepare(src, part, SIZE, SHARD, workers=1, log=quiet, progress=False)  # root's, a shard to redo
    os.remove(os.path.join(part, shard_name(1)))
    os.remove(os.path.join(part, MANIFEST))
    results = _as_nobody(_cli_errors, src, new, part, os.path.join(new, "sub"))
    remedy = "): choose a DST this user can write to, or give it write permission, and run the same command again"
    for (rc, line), dst, name in zip(results, [new, part, os.path.join(new, "sub")],
                                     ["plan.json.tmp", shard_name(1) + ".tmp", "sub"]):
        assert rc == 2 and line.startswith(f"error: cannot write to {dst} (Permission denied: "), line
        assert name in line and line.endswith(remedy), line


def _failing_rank(rank, world, init_file, src, dst, out_dir, where):
    """Rank `rank` of a prepare in which rank 1 fails `where` (its source is missing, or its shards
    cannot be written); writes the error each rank stopped with."""
    from pmf_fast.data import prepare as P
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))           # a hang fails the test, not CI
    if rank == 1 and where == "source":
        src = src + "-not-mounted"
    if rank == 1 and where == "shards":
        P._run = lambda *a: (_ for _ in ()).throw(OSError(13, "Permission denied", os.path.join(dst, "x.tmp")))
    try:
        prepare(src, dst, SIZE, SHARD, workers=1, rank=rank, world=world, log=quiet, progress=False)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{where}{rank}.json"), "w") as f:
        json.dump(error, f)


@pytest.mark.parametrize("where", ["source", "shards"])
def test_a_failing_rank_stops_the_others_with_its_line(photos, tmp_path, where):
    src, dst = photos[0], str(tmp_path / "dst")
    t = time.time()
    # spawn: a forked rank of a process that ran OpenMP work can hang in its first parallel region
    mp.start_processes(_failing_rank, args=(2, str(tmp_path / "init"), src, dst, str(tmp_path), where), nprocs=2,
                       start_method="spawn")
    assert time.time() - t < 50                                            # nobody waited for the timeout
    mine, other = (json.load(open(tmp_path / f"{where}{r}.json")) for r in (1, 0))
    reason = (f"dataset directory '{src}-not-mounted' does not exist" if where == "source" else
              f"cannot write to {dst} (Permission denied: {dst}/x.tmp)")
    assert reason in mine
    assert other.startswith("RankFailed: rank 1 on ") and f"failed in preparing {dst}: " in other and reason in other
