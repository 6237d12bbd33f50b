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
    # The holder deleted the file we waited on as it released it: we hold the file the path names now (holder() above
    # read it), and deleted it in turn: a clean release leaves no lock file, so none is reported stale next time.
    assert not lock_path.exists()


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path, start_holder):
    lock_path = tmp_path / "cache.lock"
    holder = start_holder(lock_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)

    messages = []
    started = time.monotonic()
    assert lock_path.exists()  # a killed holder could not delete its file
    with CacheLock(lock_path, name="s3://bucket/cache", on_wait=messages.append, timeout=5):
        assert time.monotonic() - started < 5  # no waiting (far below the timeout): the OS released the flock
    assert messages == [f"previous holder pid {holder.pid} (vlflow run wf.yaml) is gone; "
                        "taking over the stale lock on s3://bucket/cache"]
    assert not lock_path.exists()  # the next clean release deletes it


# Takes the lock argv[1] argv[3] times (polling every ms), each time adding 1 to the number in file argv[2] by a read
# and a write: two such processes lose an increment whenever both hold the lock at once.
CONTENDER = """
import pathlib, sys, time
from vlflow import lock

lock.POLL_SECONDS = lock.MAX_POLL_SECONDS = 0.001
counter, go = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[2] + ".go")
while not go.exists():
    time.sleep(0.001)
for _ in range(int(sys.argv[3])):
    with lock.CacheLock(sys.argv[1], name="cache", command="contender", timeout=60):
        counter.write_text(str(int(counter.read_text()) + 1))
"""


def test_two_processes_contending_keep_it_exclusive_and_leave_no_lock_file(tmp_path):
    """Each release deletes the file that the other process may have opened and be waiting on: it must notice that
    the file it then locks is no longer the path's and lock the path's new file, or both would hold the lock."""
    lock_path, counter, rounds = tmp_path / "locks" / "keys" / "k.lock", tmp_path / "counter", 300
    counter.write_text("0")
    contenders = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(lock_path), str(counter), str(rounds)])
                  for _ in range(2)]
    (tmp_path / "counter.go").touch()
    assert [c.wait(timeout=120) for c in contenders] == [0, 0]
    assert int(counter.read_text()) == 2 * rounds  # no increment lost: never held by both at once
    assert list((tmp_path / "locks" / "keys").iterdir()) == []  # released and nobody waits: no file left behind


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


# ---- the cache itself serialises runs: real `vlflow run` processes ------------------------------------------------

SLOW_STAGE = """
name: {name}
stages:
  slow: {{uses: testing.write, with: {{files: 2, text: shared, sleep: 4}}}}
"""


def start_run(tmp_path, workflow: str, cache: str, state_dir: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlflow.cli", "run", workflow, "--cache", cache, "--state-dir",
                             state_dir], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "250", **(env or {})})


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return " ".join(out.split())


def attempts(cache_dir) -> list:
    """Every attempt dir written under the cache's artifacts (a second commit of a key would leave a second one)."""
    return [p for p in (cache_dir / "artifacts").glob("*/*") if p.is_dir()]


def held_key_locks(cache_dir) -> list:
    """The key lock files naming a holder (a released one is deleted, maybe while we look)."""
    held = []
    for path in (cache_dir / "locks" / "keys").glob("*.lock"):
        try:
            if path.stat().st_size > 0:
                held.append(path)
        except FileNotFoundError:
            pass
    return held


@pytest.mark.parametrize("second_cache", ["file://{cache}", "{cache}/"])
def test_runs_with_other_state_dirs_and_cache_spellings_wait_for_each_other(tmp_path, second_cache):
    (tmp_path / "wf.yaml").write_text(SLOW_STAGE.format(name="wf"))
    cache = tmp_path / "cache"
    first = start_run(tmp_path, "wf.yaml", str(cache), "state1")
    wait_until(lambda: held_key_locks(cache), "the first run to execute its stage")
    second = start_run(tmp_path, "wf.yaml", second_cache.format(cache=cache), "state2")
    out1, out2 = finish(first), finish(second)

    assert "✓ done slow" in out1 and "1 ran, 0 cached" in out1
    assert "waiting for " in out2 and f"(pid {first.pid}, started" in out2  # it says for whom it waits
    assert "✓ cached slow" in out2 and "0 ran, 1 cached" in out2
    assert len(attempts(cache)) == 1  # one execution, one commit


def test_two_workflows_sharing_a_stage_key_execute_it_once(tmp_path):
    for name in ("one", "two"):  # other workflow names: the run lock does not serialise them, the key lock does
        (tmp_path / f"{name}.yaml").write_text(SLOW_STAGE.format(name=name))
    cache = tmp_path / "cache"
    first = start_run(tmp_path, "one.yaml", str(cache), "state1")
    wait_until(lambda: held_key_locks(cache), "the first run to execute its stage")
    second = start_run(tmp_path, "two.yaml", f"file://{cache}", "state2")
    out1, out2 = finish(first), finish(second)

    assert "✓ done slow" in out1
    assert re.search(r"waiting for .* holding the lock on artifact [0-9a-f]{12} \(stage slow\)", out2), out2
    assert "✓ cached slow" in out2 and "(committed meanwhile by another run)" in out2 and "0 ran, 1 cached" in out2
    assert len(attempts(cache)) == 1


def test_runs_on_one_object_store_cache_with_other_state_dirs_execute_a_stage_once(tmp_path, s3_cache_url, s3_env):
    import fsspec

    (tmp_path / "wf.yaml").write_text(SLOW_STAGE.format(name="wf"))
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_env})
    locks = s3_cache_url.removeprefix("s3://") + "/locks/keys"

    def lease_held():
        fs.invalidate_cache()
        return fs.exists(locks) and fs.ls(locks)

    first = start_run(tmp_path, "wf.yaml", s3_cache_url, "state1")
    wait_until(lease_held, "the first run to take the lease on its stage key")
    second = start_run(tmp_path, "wf.yaml", s3_cache_url, "state2")
    out1, out2 = finish(first), finish(second)

    assert "✓ done slow" in out1 and "1 ran, 0 cached" in out1
    assert re.search(rf"waiting for .*\(pid {first.pid}, started .* holding the lock on artifact", out2), out2
    assert "(committed meanwhile by another run)" in out2 and "0 ran, 1 cached" in out2
    fs.invalidate_cache()
    assert len([p for p in fs.glob(s3_cache_url.removeprefix("s3://") + "/artifacts/*/*")
                if fs.isdir(p)]) == 1  # one commit
    assert fs.find(locks) == []  # released


# ---- LeaseLock (object stores) --------------------------------------------------------------------------------

@pytest.fixture
def lease_fs(s3_cache_url, s3_env):
    import fsspec

    return fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_env}), s3_cache_url.removeprefix("s3://")


def test_lease_lock_is_exclusive_and_says_whom_it_waits_for(lease_fs):
    from vlflow.lock import LeaseLock

    fs, root = lease_fs
    path = f"{root}/locks/k.json"
    holder = LeaseLock(fs, path, name="artifact k", command="vlflow run wf.yaml")
    holder.acquire()
    messages = []
    with pytest.raises(LockError, match=r"gave up after 0.3s waiting for vlflow run wf.yaml \(pid \d+"):
        LeaseLock(fs, path, name="artifact k", on_wait=messages.append, timeout=0.3).acquire()
    assert messages[0].startswith("waiting for vlflow run wf.yaml (pid ")
    holder.ensure_held()
    holder.release()
    with LeaseLock(fs, path, name="artifact k", timeout=5) as second:
        second.ensure_held()
    assert not fs.exists(path)


def test_expired_lease_of_a_dead_holder_elsewhere_is_taken_over_and_the_old_holder_may_not_commit(lease_fs):
    import json as json_module

    from vlflow.lock import LeaseLock

    fs, root = lease_fs
    path = f"{root}/locks/k.json"
    stalled = LeaseLock(fs, path, name="artifact k", lease=0.2)
    stalled.acquire()
    stalled._stop.set()  # its heartbeat stops, as if the machine froze: the lease runs out
    record = json_module.loads(fs.cat_file(path))
    record.update(host="elsewhere", expires=time.time() - 3600)  # and it is another machine's, long expired
    fs.pipe_file(path, json_module.dumps(record).encode())

    messages = []
    with LeaseLock(fs, path, name="artifact k", on_wait=messages.append, timeout=5) as taker:
        assert len(messages) == 1 and "on elsewhere" in messages[0] and "expired; taking it over" in messages[0]
        with pytest.raises(LockError, match="lost the lock on artifact k"):
            stalled.ensure_held()  # it checks before committing, and finds the key is someone else's now
        taker.ensure_held()
