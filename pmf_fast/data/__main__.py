"""Data tools:
    python -m pmf_fast.data check DIR                          list every unusable image of an ImageFolder
    python -m pmf_fast.data prepare SRC DST --image-size 256   decode and ADM-crop once into uint8 shards
    torchrun --nproc-per-node=8 -m pmf_fast.data prepare ...    the same, the shards shared out by rank
    python -m pmf_fast.data verify DST                         read every shard and compare its checksum
"""
import argparse
import os
import signal
import sys

from ..log import rank_zero
from .check import scan_images
from .folder import scan_folder


def check(a):
    unreadable = {}
    files, _, classes = scan_folder(a.dir, all_files=True, unreadable=unreadable)
    result = scan_images(files, a.workers, cache=not a.no_cache)
    for folder, reason in sorted(unreadable.items()):
        print(f"BAD  {os.path.join(a.dir, folder)}: {reason} (fix its permissions)")
    for path, reason in sorted(result["bad"].items()):
        print(f"BAD  {path}: {reason}")
    kinds = {}
    for note in result["converted"].values():
        kinds[note] = kinds.get(note, 0) + 1
    for note, n in sorted(kinds.items()):
        print(f"OK   {n} image(s) {note} to RGB on load")
    print(f"{len(files)} files in {len(classes)} classes: {len(files) - len(result['bad'])} usable, "
          f"{len(result['bad'])} unusable (excluded from training)"
          + (f"; {len(unreadable)} folder(s) not readable" if unreadable else ""))
    return 1 if result["bad"] or unreadable else 0


class Stopped(BaseException):
    """prepare was stopped by a signal; the finished shards are kept. A BaseException, as Ctrl-C's
    KeyboardInterrupt: no rank waits in an agreement for ranks still at work (torchrun stops them)."""


def _stop(signum, frame):
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def prepare(a):
    from .prepare import prepare as run
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    old = signal.signal(signal.SIGTERM, _stop)       # as Ctrl-C: the pool is stopped, unfinished shards removed
    try:
        if world > 1:                        # gloo on any machine: the ranks only agree and wait
            import datetime

            import torch.distributed as dist
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))   # ranks finish hours apart
        try:
            run(a.src, a.dst, a.image_size, a.shard_size, a.workers, rank, world, log=rank_zero(rank == 0))
        finally:
            if world > 1:
                dist.destroy_process_group()
    finally:
        signal.signal(signal.SIGTERM, old)   # called in-process (tests, notebooks): the caller's handler back
    return 0


def verify(a):
    from .shards import verify as run
    bad = run(a.dst, a.workers)
    for name, problem in sorted(bad.items()):
        print(f"BAD  {name}: {problem}")
    if bad:
        print(f"{len(bad)} damaged: run `python -m pmf_fast.data prepare SRC {a.dst}` again after deleting them "
              "(it rewrites missing shards)")
        return 1
    print(f"OK   every shard of {a.dst} matches its checksum")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pmf_fast.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="scan DIR/<class>/<image> and list unusable files")
    c.add_argument("dir")
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--no-cache", action="store_true", help="scan again even if a cached result exists")
    c = sub.add_parser("prepare", help="ADM-crop SRC/<class>/<image> once into uint8 shards in DST")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--image-size", type=int, default=256)
    c.add_argument("--shard-size", type=int, default=None, help="images per shard (default: about 1 GiB per shard)")
    c.add_argument("--workers", type=int, default=None, help="processes per rank (default: cores / ranks per node)")
    c = sub.add_parser("verify", help="read every shard of DST in full and compare its checksum")
    c.add_argument("dst")
    c.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    from ..dist import RankFailed
    from .shards import PreparedError
    try:
        return {"check": check, "prepare": prepare, "verify": verify}[a.cmd](a)
    except (FileNotFoundError, PermissionError, PreparedError, ValueError, RankFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as e:
        print(f"{a.cmd} {str(e) or 'stopped by Ctrl-C'}: what is finished is kept; run the same command again to "
              "continue", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143


if __name__ == "__main__":
    sys.exit(main())
