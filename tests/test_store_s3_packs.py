"""The object-store layout on a real moto server: small files committed in a few pack objects, read back whole or by
range, damage to a pack found by `damage` (size) and `verify` (sha256 per file), and a commit's request count."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from vlflow.errors import StoreError
from vlflow.store import ArtifactStore


class CountingMoto:
    """A second front end on the session's moto backend that counts the HTTP requests it answers (by method)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests[environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> Counter[str]:
        with self._lock:
            taken, self.requests = self.requests, Counter()
        return taken


@pytest.fixture
def counting_moto(moto_server, s3_env, monkeypatch):
    moto = CountingMoto()
    monkeypatch.setenv("VLFLOW_S3_ENDPOINT_URL", moto.url)
    yield moto
    moto.server.shutdown()
    moto.thread.join(timeout=10)


def small_files(root: Path, count: int) -> dict[str, bytes]:
    files = {f"shard{i % 3}/item{i:04d}.txt": f"item {i}\n".encode() * (i % 7) for i in range(count)}
    files["weights.bin"] = os.urandom(3000)  # over the pack limit below: its own object
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_small_files_commit_in_few_packs_and_read_back(counting_moto, tmp_path):
    from tests.conftest import create_bucket

    url = f"s3://{create_bucket(counting_moto.url)}/cache"
    counting_moto.take()
    store = ArtifactStore(url, local_cache=tmp_path / "mirror", pack_file_limit=2000, pack_bytes=4000)
    files = small_files(tmp_path / "out", 600)
    manifest = store.commit("k", tmp_path / "out", {"stage": "s"})

    packs = manifest.pack_sizes()
    total_small = sum(len(data) for rel, data in files.items() if rel != "weights.bin")
    assert sum(packs.values()) == total_small and max(packs.values()) <= 4000 and len(packs) <= total_small // 2000 + 1
    # 601 files: the packs, the large file, the file list and the manifest, one PUT each; nothing else
    assert counting_moto.take() == Counter({"PUT": len(packs) + 3})
    assert {e.path: (e.size, e.sha256) for e in manifest.files} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files.items()}
    assert [e.path for e in manifest.files if e.pack is None] == ["weights.bin"]

    fresh = ArtifactStore(url, local_cache=tmp_path / "mirror")  # reads what the list says, whatever its own limits
    loaded = fresh.manifest("k")
    assert fresh.damage(loaded) == [] and fresh.verify(loaded) == []
    counting_moto.take()
    copy = fresh.materialize("k")
    got = {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert got.pop(".complete") == manifest.digest.encode() and got == files
    # the manifest, the file list, then every pack and the large file: no request per small file
    assert sum(counting_moto.take().values()) <= len(packs) + 3
    assert not list((tmp_path / "mirror").glob("*.packs")) and not list((tmp_path / "mirror").glob(".*"))

    with fresh.open("k", "shard1/item0013.txt") as f:  # a range GET inside a pack
        assert f.read() == files["shard1/item0013.txt"]
    with fresh.open("k", "shard0/item0000.txt", "r") as f:  # an empty packed file, as text
        assert f.read() == ""

    listing = json.loads(fresh.fs.cat_file(f"{url[5:]}/artifacts/k/{manifest.attempt}.files.json"))
    assert [p["path"] for p in listing["packs"]] == sorted(packs) and all(p.startswith(".vlflow-packs/") for p in packs)


def test_a_damaged_pack_is_found_and_never_consumed(s3_cache_url, tmp_path):
    store = ArtifactStore(s3_cache_url, local_cache=tmp_path / "mirror", pack_bytes=4000)
    files = small_files(tmp_path / "out", 300)
    manifest = store.commit("k", tmp_path / "out", {})
    pack = sorted(manifest.pack_sizes())[1]
    pack_path = f"{store._attempt_dir(manifest)}/{pack}"
    original = store.fs.cat_file(pack_path)
    victim = min((e for e in manifest.files if e.pack == pack and e.size), key=lambda e: e.offset)

    # Same size, one byte changed: only the re-hash sees it, naming the file and its pack.
    flipped = bytearray(original)
    flipped[victim.offset] ^= 0xFF
    store.fs.pipe_file(pack_path, bytes(flipped))
    assert store.damage(store.manifest("k")) == []
    problems = store.verify(store.manifest("k"))
    assert len(problems) == 1 and problems[0].startswith(f"{victim.path} (in pack {pack}) has other contents")

    # Truncated: the cheap check sees it, so a run rebuilds the artifact instead of consuming it.
    store.fs.pipe_file(pack_path, original[:-5])
    held = sum(1 for e in manifest.files if e.pack == pack)
    expected = [f"pack {pack} (holding {held} files) has {len(original) - 5} bytes, the manifest says {len(original)}"]
    assert store.damage(store.manifest("k")) == expected and store.verify(store.manifest("k")) == expected
    with pytest.raises(StoreError, match="bytes after download, the manifest says"):
        store.materialize("k", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()

    store.fs.rm_file(pack_path)
    assert store.damage(store.manifest("k")) == [f"pack {pack} (holding {held} files) is missing"]
    assert files  # the other packs are untouched
