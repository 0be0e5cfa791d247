"""Atomic file writes, the one implementation used by checkpoints, samples and the data-scan cache.

`atomic_write(path, write)` writes to `<path>.tmp.<pid>.<host>` in the same directory (so the rename
stays on one file system), flushes and fsyncs it, then renames it over `path` with os.replace: a
reader sees the old file or the new one, never half of one, and a crash mid-write leaves the old
file as it was. The temporary file is removed when writing fails; one left by a killed process
(SIGKILL, power loss) is removed by `clean_temporaries` at the next start. The host name is part of
the name because processes on two machines (or two containers, pid 1 each) sharing a directory
often have equal pids.
"""
import glob
import os
import socket

TMP_TAG = ".tmp."                         # <path>.tmp.<pid>.<host>: whose temporary file it is


def temporary_path(path):
    return f"{path}{TMP_TAG}{os.getpid()}.{socket.gethostname()}"


def atomic_write(path, write, mode="wb"):
    """Call write(f) on a temporary file opened with `mode`, then atomically replace `path` by it.
    Returns path. Errors (OSError for a full disk or an unwritable directory, or any error of
    write) propagate after the temporary file is removed; `path` is never touched by a failure."""
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
    return path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_temporaries(directory, pattern="*", all_hosts=False):
    """Remove the temporary files `<pattern>.tmp.<pid>[.<host>]` in `directory` that no running
    process on this machine is writing (their pid is gone); returns the removed paths, sorted.
    Temporary files of live processes (another rank, or a writer on this machine) and of other
    machines are left alone; all_hosts removes those of other machines too, for a caller that
    knows it is the only writer of these files."""
    removed, host = [], socket.gethostname()
    for p in sorted(glob.glob(os.path.join(glob.escape(directory), f"{pattern}{TMP_TAG}*"))):
        pid, _, writer = p.rsplit(TMP_TAG, 1)[1].partition(".")
        if not pid.isdigit():
            continue
        if writer and writer != host:
            if not all_hosts:
                continue
        elif int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            os.remove(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed
