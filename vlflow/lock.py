"""An exclusive, cross-process lock on a cache, held for a whole `vlflow run`.

It is an `fcntl.flock` on a local lock file, so the OS releases it when the holder exits or is killed. The file also
records who holds it (pid, host, start time, command) so that a waiter can say what it waits for, and so that a lock
left behind by a killed holder is reported when taken over. Locks for remote caches live in a local state dir.

    with CacheLock(state_dir / "locks" / "cache.lock", name=store.url, on_wait=print, timeout=600):
        ...
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            self._wait_for(fd)
        except BaseException:
            os.close(fd)
            raise
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

    def _wait_for(self, fd: int) -> None:
        if self._try_lock(fd):
            return
        record = self.holder()
        if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            raise LockError(f"this process (pid {os.getpid()}) already holds the lock on {self.name} ({self.path})")
        message = f"waiting for {self._describe(record)} holding the lock on {self.name}"
        if record is not None and record.get("host") == socket.gethostname() and not _pid_alive(record["pid"]):
            message += " (that process is gone, but a process it started still holds the lock file open)"
        self._notify(message)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = POLL_SECONDS
        while not self._try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                raise LockError(f"gave up after {self.timeout:g}s waiting for {self._describe(self.holder())} "
                                f"holding the lock on {self.name} (lock file {self.path})")
            remaining = float("inf") if deadline is None else max(deadline - time.monotonic(), 0.0)
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, MAX_POLL_SECONDS)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file means "released cleanly"; the file itself stays (unlinking races)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "CacheLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
