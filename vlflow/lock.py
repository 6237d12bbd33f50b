"""Exclusive, cross-process locks on a cache: `CacheLock` (a local file) and `LeaseLock` (an object-store object).

`CacheLock` is an `fcntl.flock` on a local lock file, so the OS releases it when the holder exits or is killed. The
file also records who holds it (pid, host, start time, command) so that a waiter can say what it waits for, and so
that a lock left behind by a killed holder is reported when taken over. A local cache keeps its lock files inside
itself (`<cache>/locks/`), so every run using that cache (any state dir, any spelling of its path) meets them.
A clean release deletes the file (a long-lived cache would otherwise keep one per stage key it ever built); only a
killed holder's file stays, until the next holder of that lock releases it. Deleting is safe because the holder
unlinks while it still holds the flock, and every acquirer checks, once it holds the flock, that the path still names
the file it locked: one that had opened the unlinked file (it waited on it) opens the path again.

`LeaseLock` is the same for object stores, which have no flock: a lock object created only if absent (a conditional
PUT, `If-None-Match: *`) holding owner and expiry, renewed while held; an expired lease (its holder died) is taken
over, and a holder checks it still owns the lease before it commits.

    with CacheLock(cache / "locks" / "runs" / "wf.lock", name=store.url, on_wait=print, timeout=600):
        ...
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from vlflow.secrets import mask

try:
    from vlflow.errors import LockError
except ImportError:  # vlflow.errors not there yet
    class LockError(RuntimeError):  # type: ignore[no-redef]
        pass

POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 1.0
LEASE_SECONDS = 120.0  # an object-store lock not renewed for this long (+ CLOCK_SKEW_SECONDS) belongs to a dead run
CLOCK_SKEW_SECONDS = 30.0  # expiries are written with the holder's clock and read with the waiter's

log = logging.getLogger("vlflow.lock")


def _default_command() -> str:
    """This process's command line, credentials masked (it is written to the lock file and shown to waiters)."""
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return mask(shlex.join(argv), assignments=True)[:200]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _clock(timestamp: float) -> str:
    when = time.localtime(timestamp)
    same_day = time.strftime("%Y-%m-%d", when) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", when)


class CacheLock:
    """Context manager: exclusive lock `path` (created if needed) on the cache called `name`.

    `on_wait(message)` is called once when the lock is busy, and when a stale lock of a dead holder is taken over.
    `timeout` (seconds) raises LockError instead of waiting longer; None waits as long as it takes.
    """

    def __init__(self, path: Path, name: str, on_wait: Callable[[str], None] | None = None,
                 timeout: float | None = None, *, command: str | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.on_wait = on_wait
        self.timeout = timeout
        self.command = mask(command, assignments=True) if command else _default_command()
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"CacheLock({str(self.path)!r}, name={self.name!r}, held={self._fd is not None})"

    def _notify(self, message: str) -> None:
        if self.on_wait is not None:
            self.on_wait(message)

    def holder(self) -> dict | None:
        """What the lock file says about the current (or last, if it died) holder; None when unknown."""
        try:
            text = self.path.read_text()
            record = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None

    def _describe(self, record: dict | None) -> str:
        if record is None:
            return "another vlflow process"
        command = mask(str(record.get("command") or "vlflow run"), assignments=True)  # a record of another vlflow
        started = _clock(record["started"]) if isinstance(record.get("started"), (int, float)) else "?"
        where = f"pid {record['pid']}"
        if record.get("host") != socket.gethostname():
            where += f" on {record.get('host')}"
        return f"{command} ({where}, started {started})"

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self) -> None:
        if self._fd is not None:
            raise LockError(f"the lock on {self.name} is already held by this CacheLock ({self.path})")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        notified = False
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
            try:
                notified = self._wait_for(fd, deadline, notified)
                if self._locked_file_is_the_path(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder deleted it while we waited on it: lock the file the path names now
        previous = self.holder()
        if previous is not None:
            # The file still names a holder although nobody holds the flock: it died without releasing cleanly.
            command = mask(str(previous.get("command", "?")), assignments=True)
            self._notify(f"previous holder pid {previous['pid']} ({command}) is gone; "
                         f"taking over the stale lock on {self.name}")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def _locked_file_is_the_path(self, fd: int) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        locked = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (locked.st_dev, locked.st_ino)

    def _wait_for(self, fd: int, deadline: float | None, notified: bool) -> bool:
        """Wait until `fd` is flock-ed (LockError past `deadline`); says once whom it waits for. Returns whether
        it has said so (by now or before: `notified`)."""
        if self._try_lock(fd):
            return notified
        record = self.holder()
        if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            raise LockError(f"this process (pid {os.getpid()}) already holds the lock on {self.name} ({self.path})")
        if not notified:
            message = f"waiting for {self._describe(record)} holding the lock on {self.name}"
            if record is not None and record.get("host") == socket.gethostname() and not _pid_alive(record["pid"]):
                message += " (that process is gone, but a process it started still holds the lock file open)"
            self._notify(message)
        delay = POLL_SECONDS
        while not self._try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                raise LockError(f"gave up after {self.timeout:g}s waiting for {self._describe(self.holder())} "
                                f"holding the lock on {self.name} (lock file {self.path})")
            remaining = float("inf") if deadline is None else max(deadline - time.monotonic(), 0.0)
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, MAX_POLL_SECONDS)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            try:  # while the flock is held: whoever waits on this file then sees it is no longer the path's
                if self._locked_file_is_the_path(fd):  # (not if someone deleted it by hand and another took it)
                    os.unlink(self.path)
            except OSError:  # a directory we may not write: an empty file says "released cleanly" instead
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def ensure_held(self) -> None:
        """Raise LockError unless this lock is held (an flock cannot be lost while its holder lives)."""
        if self._fd is None:
            raise LockError(f"the lock on {self.name} is not held ({self.path})")

    def __enter__(self) -> "CacheLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class LeaseLock:
    """Context manager: exclusive lock object `path` on fsspec filesystem `fs` (an object store).

    Created with an exclusive write (`pipe_file(mode="create")`, a conditional PUT on S3) and read back, so that
    a backend that ignores the condition still lets only the last writer believe it holds the lock. A heartbeat
    thread renews the lease every `lease / 3` seconds; `ensure_held()` re-reads it (call it before committing).
    """

    def __init__(self, fs, path: str, name: str, on_wait: Callable[[str], None] | None = None,
                 timeout: float | None = None, *, lease: float = LEASE_SECONDS, command: str | None = None) -> None:
        self.fs = fs
        self.path = path
        self.name = name
        self.on_wait = on_wait
        self.timeout = timeout
        self.lease = lease
        self.command = mask(command, assignments=True) if command else _default_command()
        self.owner = uuid.uuid4().hex
        self._held = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost while held (set by the heartbeat)

    def __repr__(self) -> str:
        return f"LeaseLock({self.path!r}, name={self.name!r}, held={self._held})"

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.time(), "command": self.command,
                           "expires": time.time() + self.lease}).encode()

    def holder(self) -> dict | None:
        self.fs.invalidate_cache(self.path)
        try:
            record = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign content: treat as expired so it is replaced
            return {"owner": None, "expires": 0}
        return record if isinstance(record, dict) else {"owner": None, "expires": 0}

    def _create(self) -> bool:
        try:
            self.fs.pipe_file(self.path, self._record(), mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a backend without exclusive create: the read-back decides
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, self._record())
        holder = self.holder()  # read back: the write is ours only if the object names us
        return holder is not None and holder.get("owner") == self.owner

    def _expired(self, record: dict) -> bool:
        pid = record.get("pid")
        if record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return True  # its holder on this machine is gone: no need to wait for the lease to run out
        expires = record.get("expires")
        return not isinstance(expires, (int, float)) or time.time() > expires + CLOCK_SKEW_SECONDS

    def _notify(self, message: str) -> None:
        if self.on_wait is not None:
            self.on_wait(message)

    def acquire(self) -> None:
        if self._held:
            raise LockError(f"the lock on {self.name} is already held by this LeaseLock ({self.path})")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay, waiting = POLL_SECONDS, False
        while not self._create():
            record = self.holder()
            if record is None:
                continue  # released between our write and our read: try again at once
            if self._expired(record):
                self._notify(f"the lease of {_describe_record(record)} on {self.name} expired; taking it over")
                self._remove_if_owner(record.get("owner"))
                continue
            if not waiting:
                self._notify(f"waiting for {_describe_record(record)} holding the lock on {self.name}")
                waiting = True
            if deadline is not None and time.monotonic() >= deadline:
                raise LockError(f"gave up after {self.timeout:g}s waiting for {_describe_record(record)} holding "
                                f"the lock on {self.name} (lock object {self.path})")
            remaining = float("inf") if deadline is None else max(deadline - time.monotonic(), 0.0)
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, MAX_POLL_SECONDS)
        self._held, self.lost = True, None
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, name="vlflow-lease", daemon=True)
        self._heartbeat.start()

    def _remove_if_owner(self, owner) -> None:
        """Delete the lock object if it still names `owner` (a small race remains: object stores cannot delete
        conditionally everywhere; the loser of that race finds its lease gone in `ensure_held` before it commits)."""
        record = self.holder()
        if record is not None and record.get("owner") == owner:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                record = self.holder()
                if record is None or record.get("owner") != self.owner:
                    self.lost = f"{_describe_record(record)} took it over" if record else "it was removed"
                    return
                self.fs.pipe_file(self.path, self._record())
            except Exception as exc:  # a failed renewal is retried; ensure_held decides before a commit
                log.warning("could not renew the lock on %s: %s", self.name, mask(str(exc), assignments=True))

    def ensure_held(self) -> None:
        """Raise LockError unless the lock object still names this holder with an unexpired lease."""
        record = self.holder() if self._held else None
        if not self._held or record is None or record.get("owner") != self.owner or self._expired(record):
            why = self.lost or ("it was never acquired" if not self._held else "its lease expired or was taken over")
            raise LockError(f"lost the lock on {self.name} ({why}); not committing")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._remove_if_owner(self.owner)

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _describe_record(record: dict | None) -> str:
    if not record or not isinstance(record.get("pid"), int):
        return "another vlflow process"
    command = mask(str(record.get("command") or "vlflow run"), assignments=True)
    started = _clock(record["started"]) if isinstance(record.get("started"), (int, float)) else "?"
    where = f"pid {record['pid']}"
    if record.get("host") != socket.gethostname():
        where += f" on {record.get('host')}"
    return f"{command} ({where}, started {started})"
