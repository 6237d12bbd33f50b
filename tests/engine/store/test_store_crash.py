"""A commit killed with SIGKILL midway (a real child process) is never reported as committed, and gc reclaims it."""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlflow.store import ArtifactStore

# Commits argv[3] as key argv[2] to argv[1] (store options: JSON argv[4]); pauses for the parent's SIGKILL once half
# the bytes are stored.
COMMIT_CHILD = """
import json, sys, time
from pathlib import Path
from vlflow.store import ArtifactStore

def progress(done, total):
    if done * 2 >= total:
        print("HALFWAY", flush=True)
        time.sleep(60)

store = ArtifactStore(sys.argv[1], **json.loads(sys.argv[4]))
store.commit(sys.argv[2], Path(sys.argv[3]), {"stage": "crash"}, progress=progress)
print("COMMITTED", flush=True)
"""
FILE_SIZE = 512


def make_output(root: Path, num_files: int) -> Path:
    for i in range(num_files):
        path = root / f"shard{i % 7}" / f"part{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i % 256]) * FILE_SIZE)
    return root


def commit_and_kill_midway(url: str, key: str, source: Path, **store_options) -> None:
    child = subprocess.Popen([sys.executable, "-c", COMMIT_CHILD, url, key, str(source), json.dumps(store_options)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            line = ""
            while not line and time.monotonic() < deadline and child.poll() is None:
                if selector.select(timeout=0.5):
                    line = child.stdout.readline().strip()
        assert line == "HALFWAY", f"child did not reach the middle of the commit: {line!r} {child.stderr.read()}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        child.stdout.close()
        child.stderr.close()


def check_half_written_attempt_is_garbage(store: ArtifactStore, key: str, tmp_path: Path, num_files: int) -> None:
    assert not store.has(key) and store.manifest(key) is None and store.list() == []
    garbage = store.garbage()
    assert len(garbage) == 1 and garbage[0].startswith(f"artifacts/{key}/")
    stored = sum(info["size"] for info in store.fs.find(store._path(*garbage[0].split("/")), detail=True).values())
    assert 0 < stored < FILE_SIZE * num_files  # really half-written

    count, freed = store.gc(keep={key})  # even a kept key's unreferenced attempt is garbage
    assert count == 1 and freed == stored
    assert store.garbage() == []

    manifest = store.commit(key, make_output(tmp_path / "again", num_files), {"stage": "retry"})
    assert store.has(key) and len(manifest.files) == num_files


def test_killed_local_commit_is_never_committed(tmp_path):
    url = str(tmp_path / "cache")
    commit_and_kill_midway(url, "k1", make_output(tmp_path / "out", 400))
    check_half_written_attempt_is_garbage(ArtifactStore(url), "k1", tmp_path, 400)


@pytest.mark.parametrize("options", [{"pack_file_limit": 0}, {"pack_bytes": 2048}],
                         ids=["one-object-per-file", "packs"])
def test_killed_s3_upload_is_never_committed(s3_cache_url, tmp_path, options):
    """Files one object each, or small files in packs (here 4 files per pack: 20 packs, a few uploaded at the kill)."""
    commit_and_kill_midway(s3_cache_url, "k1", make_output(tmp_path / "out", 80), **options)  # moto: ~100 PUT/s
    check_half_written_attempt_is_garbage(ArtifactStore(s3_cache_url, **options), "k1", tmp_path, 80)
