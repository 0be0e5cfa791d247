"""python -m pmf_fast.data check DIR: list every unusable image in an ImageFolder tree."""
import argparse
import sys

from .check import scan_images
from .folder import scan_folder


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pmf_fast.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="scan DIR/<class>/<image> and list unusable files")
    c.add_argument("dir")
    c.add_argument("--workers", type=int, default=None)
    c.add_argument("--no-cache", action="store_true", help="scan again even if a cached result exists")
    a = p.parse_args(argv)
    try:
        files, _, classes = scan_folder(a.dir, all_files=True)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = scan_images(files, a.workers, cache=not a.no_cache)
    for path, reason in sorted(result["bad"].items()):
        print(f"BAD  {path}: {reason}")
    kinds = {}
    for note in result["converted"].values():
        kinds[note] = kinds.get(note, 0) + 1
    for note, n in sorted(kinds.items()):
        print(f"OK   {n} image(s) {note} to RGB on load")
    print(f"{len(files)} files in {len(classes)} classes: {len(files) - len(result['bad'])} usable, "
          f"{len(result['bad'])} unusable (excluded from training)")
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
