"""One owner per run directory: the run lock (rank 0 holds it while a run trains) and the check that
its holder is alive, on this host (the pid) or on another (the heartbeat).

    lock = claim_run_dir(run_dir, is_main)   # every rank: rank 0 takes it, a refusal stops all
    lock.still_mine()                        # False once removed or taken over (the Stopper asks)
    lock.release()
"""
import datetime
import json
import os
import socket
import threading
import time

from .atomic import _alive, atomic_write, clean_temporaries
from .checkpoint import CheckpointError
from .dist import all_gather_objects

LOCK = "run.lock"


class RunBusy(RuntimeError):
    """The run directory is held by a live run."""


class RunLock:
    """An O_EXCL lock file in the run directory (atomic create, also on NFS v3+) naming its holder:
    host, pid, start time, and a heartbeat counter that a thread of the holder rewrites every
    `heartbeat_s`. A lock whose holder is gone is stale and taken over:
    - same host: the pid is not alive (os.kill(pid, 0)); decided at once (kill -9, a crash);
    - another host (its pid means nothing here): the heartbeat stops. The file is watched for up to
      `stale_after_s`: a beat means a live holder (refused within one heartbeat); none, or a file
      already older than `stale_after_s`, means the holder's node is gone. Watching the counter,
      not comparing mtimes with our clock, is immune to clock skew between hosts and to NFS's
      cached file attributes (a reopen reads fresh content). A requeued job on another node thus
      waits at most `stale_after_s` for a lost node's lock."""

    def __init__(self, run_dir, heartbeat_s=10.0, stale_after_s=60.0):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "beat": 0,
                   "token": os.urandom(8).hex()}               # tells apart two starts in one second
        self.created, self.held, self._stop = [], False, threading.Event()
        self._thread, self.lost = None, None        # lost: who holds the directory now, once it is not us

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}                                # torn by a crash mid-create: no live holder wrote it

    def _mine(self, holder):
        return holder is not None and {k: holder.get(k) for k in ("host", "pid", "since", "token")} == \
            {k: self.me[k] for k in ("host", "pid", "since", "token")}

    def _stale(self, holder):
        if not holder or "pid" not in holder:
            return True
        if holder.get("host") == self.me["host"]:
            # a live pid that started after the lock was made is another process under a reused pid (a
            # restarted container keeps its host name and counts pids from 1 again, even up to ours)
            pid = holder["pid"]
            return not _alive(pid) or _started_after(pid, holder.get("since"))
        deadline = time.monotonic() + self.stale_after_s
        while time.monotonic() < deadline:
            if _age(self.path) > self.stale_after_s:
                return True
            now = self._read()
            if now != holder:
                return False                         # a beat (or a new holder): alive
            time.sleep(min(1.0, self.heartbeat_s / 4))
        return True

    def acquire(self):
        """Hold the lock or raise RunBusy naming the holder. Creates run_dir (and its missing parents,
        train.out_dir among them) when missing; release() removes what it created again if nothing
        else was written there."""
        self.created = _missing_dirs(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        clean_temporaries(self.run_dir, LOCK)        # a heartbeat cut by a kill
        # the lock appears whole: written to a file of our own, then hard-linked to its name (link, like
        # O_EXCL, fails when the name exists), so no starter ever reads a half-written lock
        mine = f"{self.path}.new.{os.getpid()}.{threading.get_ident()}"
        with open(mine, "w") as f:
            json.dump(self.me, f)
        try:
            return self._acquire(mine)
        finally:
            os.remove(mine)

    def _acquire(self, mine):
        for _ in range(100):
            try:
                os.link(mine, self.path)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue                         # released between our create and our read
                if not holder and _age(self.path) < 5:
                    time.sleep(0.1)                  # just created, its content not yet written
                    continue
                if not self._stale(holder):
                    raise RunBusy(f"{self.run_dir} is in use by another run (host {holder.get('host')}, pid "
                                  f"{holder.get('pid')}, since {holder.get('since')}); wait for it to end or stop "
                                  "it, or pass --name for a new run") from None
                self._take_over(holder)
                continue
            time.sleep(0.05)                         # a concurrent take-over may have moved ours aside
            if not self._mine(self._read()):
                continue
            self.held = True
            self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
            self._thread.start()
            return self
        raise RunBusy(f"{self.run_dir}: could not take the lock {LOCK} (other runs keep taking it over)")

    def _take_over(self, stale):
        """Move the stale lock aside; if it changed since it was judged (another starter took it over
        first, or its holder beat), put it back unless the path is taken again."""
        aside = f"{self.path}.stale.{os.getpid()}.{threading.get_ident()}"   # unique per starter
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (ValueError, OSError):
            moved = {}
        if moved != stale:                           # changed, or being written by a new starter: not ours
            try:
                os.link(aside, self.path)            # never replaces a lock created meanwhile
            except OSError:
                pass
        os.remove(aside)

    def still_mine(self):
        """Whether this process still holds the lock. False once it was removed, taken over (this
        process judged gone) or overwritten: then self.lost names the new holder, and the run stops
        (Stopper) without writing anything more in the directory. Read twice, 0.2 s apart, before
        the lock counts as lost."""
        if self.lost is None and self.held:
            for attempt in range(2):
                holder = self._read()
                if self._mine(holder):
                    return True
                if not attempt:
                    time.sleep(0.2)
            self.lost = ("removed" if holder is None else "unreadable" if not holder else
                         f"held by host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}")
        return self.lost is None

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            if not self.still_mine():
                return                               # the Stopper ends the run at its next check
            self.me["beat"] += 1
            try:
                atomic_write(self.path, lambda f: json.dump(self.me, f), mode="w")
            except OSError:
                pass                                 # a full disk: the next beat tries again

    def release(self):
        """Remove the lock if this process still holds it; remove run_dir if this lock created it and
        nothing else was written there (a refused start leaves nothing behind)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held and self._mine(self._read()):
            os.remove(self.path)
        self.held = False
        for d in self.created:                       # leaf first; a directory with anything in it stays
            try:
                os.rmdir(d)
            except OSError:
                break
        self.created = []


def _missing_dirs(path):
    """The directories os.makedirs(path) would create, deepest first."""
    out, path = [], os.path.abspath(path)
    while not os.path.isdir(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _age(path):
    """Seconds since path was last written (0 when it is gone: the caller reads it again)."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _started_after(pid, since):
    """Whether process `pid` started after the ISO time `since` (Linux /proc; False when unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])      # field 22: start time after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return started > datetime.datetime.fromisoformat(since).timestamp() + 2
    except (OSError, ValueError, TypeError, StopIteration, IndexError):
        return False


def claim_run_dir(run_dir, is_main):
    """Rank 0 takes the run directory's lock; every rank learns the outcome (a collective), so a
    refusal stops all ranks with the same RunBusy. Returns the lock (None on other ranks)."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except Exception as e:                      # e.g. an unwritable train.out_dir: the others must not wait
            refusal = e
    refusal = all_gather_objects(None if refusal is None else (type(refusal).__name__, str(refusal)))[0]
    if refusal is not None:
        raise RunBusy(refusal[1]) if refusal[0] == "RunBusy" else CheckpointError(f"{refusal[0]}: {refusal[1]}")
    return lock
