"""CacheLock across real processes: a second run waits (and says for whom), a SIGKILLed holder's lock is taken over,
and a timeout gives a LockError."""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest

from vlflow.errors import LockError
from vlflow.lock import CacheLock

# Takes the lock argv[1], says LOCKED, holds it until a line (or EOF) on stdin, writes the release time to argv[2].
HOLDER = """
import sys, time
from vlflow.lock import CacheLock

lock = CacheLock(sys.argv[1], name="s3://bucket/cache", command="vlflow run wf.yaml")
lock.acquire()
print("LOCKED", flush=True)
sys.stdin.readline()
with open(sys.argv[2], "w") as f:
    f.write(repr(time.time()))
lock.release()
"""


@pytest.fixture
def start_holder(tmp_path):
    children = []

    def start(lock_path):
        child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path), str(tmp_path / "released")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "holder did not start"
        assert child.stdout.readline().strip() == "LOCKED"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdin.close()
        child.stdout.close()


def test_second_process_waits_for_the_first(tmp_path, start_holder):
    lock_path = tmp_path / "locks" / "cache.lock"
    holder = start_holder(lock_path)
    messages = []

    def on_wait(message):
        messages.append(message)
        holder.stdin.write("release\n")  # let the holder finish only once we are known to be waiting
        holder.stdin.flush()

    with CacheLock(lock_path, name="s3://bucket/cache", on_wait=on_wait, timeout=30) as lock:
        acquired = time.time()
        assert lock.holder()["pid"] == os.getpid()
    released = float((tmp_path / "released").read_text())

    assert acquired >= released  # serialised: we got it only after the holder let go
    assert len(messages) == 1
    assert re.fullmatch(rf"waiting for vlflow run wf\.yaml \(pid {holder.pid}, started \d\d:\d\d:\d\d\) "
                        r"holding the lock on s3://bucket/cache", messages[0]), messages[0]
    assert holder.wait(timeout=10) == 0
    assert lock_path.read_text() == ""  # released cleanly: nothing recorded, so no stale-lock report next time


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path, start_holder):
    lock_path = tmp_path / "cache.lock"
    holder = start_holder(lock_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)

    messages = []
    started = time.monotonic()
    with CacheLock(lock_path, name="s3://bucket/cache", on_wait=messages.append, timeout=5):
        assert time.monotonic() - started < 5  # no waiting (far below the timeout): the OS released the flock
    assert messages == [f"previous holder pid {holder.pid} (vlflow run wf.yaml) is gone; "
                        "taking over the stale lock on s3://bucket/cache"]


def test_timeout_gives_lock_error(tmp_path, start_holder):
    lock_path = tmp_path / "cache.lock"
    holder = start_holder(lock_path)
    messages = []
    started = time.monotonic()
    with pytest.raises(LockError) as err:
        with CacheLock(lock_path, name="/data/cache", on_wait=messages.append, timeout=0.5):
            pytest.fail("acquired a lock that another process holds")
    waited = time.monotonic() - started
    assert 0.5 <= waited < 5  # generous: the machine is shared
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0]
    assert f"gave up after 0.5s waiting for vlflow run wf.yaml (pid {holder.pid}" in str(err.value)
    assert "/data/cache" in str(err.value) and str(lock_path) in str(err.value)
    assert holder.poll() is None  # the holder keeps its lock


def test_same_process_twice_fails_fast_and_release_is_clean(tmp_path):
    lock_path = tmp_path / "cache.lock"
    messages = []
    with CacheLock(lock_path, name="cache", on_wait=messages.append, command="first"):
        with pytest.raises(LockError, match=rf"this process \(pid {os.getpid()}\) already holds the lock on cache"):
            CacheLock(lock_path, name="cache", timeout=None).acquire()
    with CacheLock(lock_path, name="cache", on_wait=messages.append):
        pass
    assert messages == []
