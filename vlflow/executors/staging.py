"""The staging dirs of stage executions: each is claimed under a flock-ed owner lock that the OS releases when its run
dies, so the next run can sweep what killed runs left without touching a live run's (of any workflow or cache that
shares the state dir)."""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

STAGING_OWNER = ".owner.lock"  # flock-ed by the run that stages there, released by the OS when it dies
STAGING_GRACE_S = 10.0  # a dot-named staging dir this young is being claimed (mkdir, flock, rename)


def claim_staging(staging: Path) -> int:
    """Create the staging dir of one stage execution, holding its owner lock; returns the fd to close when done.

    The dir is made under a dot-name and renamed once the lock is held, so a sweep never sees it unowned."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    claiming = staging.with_name("." + staging.name)
    claiming.mkdir()
    fd = os.open(claiming / STAGING_OWNER, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(claiming, staging)
    return fd


def sweep_stale_staging(state_dir: Path) -> list[Path]:
    """Remove the staging dirs of stage executions whose run is gone (killed: its partial output stays there).

    A live run, of any workflow or cache sharing this state dir, holds the owner lock of each of its staging dirs."""
    removed = []
    root = Path(state_dir) / "staging"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < STAGING_GRACE_S:
                continue  # being claimed right now
            fd = os.open(entry / STAGING_OWNER, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError:  # vanished meanwhile (its run finished)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run's
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
