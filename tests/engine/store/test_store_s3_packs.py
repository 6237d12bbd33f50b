"""The object store on a real moto server, requests counted by the server: small files committed in a few pack
objects, read back whole or by range; damage to a pack found by `damage` (size) and `verify` (sha256 per file); a
no-op run reads one manifest per stage, concurrently (read_ahead)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
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
        self.in_flight = self.most_in_flight = 0  # requests being answered at once
        self.get_delay = 0.0  # seconds each GET is held: reads sent together then overlap whatever the machine's load
        self._lock = threading.Lock()

        def counting(environ, start_response):
            with self._lock:
                self.requests[environ["REQUEST_METHOD"]] += 1
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if self.get_delay and environ["REQUEST_METHOD"] == "GET":
                    time.sleep(self.get_delay)
                return app(environ, start_response)
            finally:
                with self._lock:
                    self.in_flight -= 1

        self.server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> Counter[str]:
        """The requests answered since the last call, by method (and the count of most at once starts again)."""
        with self._lock:
            taken, self.requests, self.most_in_flight = self.requests, Counter(), 0
        return taken


@pytest.fixture
def counting_moto(moto_server, s3_env, monkeypatch, tmp_path):
    moto = CountingMoto()
    monkeypatch.setenv("VLFLOW_S3_ENDPOINT_URL", moto.url)  # for child processes too
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("VLFLOW_LOCAL_CACHE", str(tmp_path / "mirror"))  # read-ahead hints of this test only
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
    files = small_files(tmp_path / "out", 300)
    manifest = store.commit("k", tmp_path / "out", {"stage": "s"})

    packs = manifest.pack_sizes()
    total_small = sum(len(data) for rel, data in files.items() if rel != "weights.bin")
    assert sum(packs.values()) == total_small and max(packs.values()) <= 4000 and len(packs) <= total_small // 2000 + 1
    # 301 files: the packs, the large file, the file list and the manifest, one PUT each; nothing else
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


def test_read_ahead_reads_the_manifests_asked_for_last_time_at_once(counting_moto, tmp_path):
    from tests.conftest import create_bucket

    store = ArtifactStore(f"s3://{create_bucket(counting_moto.url)}/cache")
    keys = [f"k{i}" for i in range(10)]
    for key in keys[:8]:
        (tmp_path / key).mkdir()
        (tmp_path / key / "f").write_text(key)
        store.commit(key, tmp_path / key, {})
    counting_moto.take()
    counting_moto.get_delay = 0.05

    with store.read_ahead("plan/w"):  # nothing remembered yet: one GET per manifest, one after the other
        assert [store.manifest(k) is not None for k in keys] == [True] * 8 + [False] * 2
    assert counting_moto.take() == Counter({"GET": 10})

    with store.read_ahead("plan/w"):
        most_at_once = counting_moto.most_in_flight
        assert counting_moto.take() == Counter({"GET": 10}) and most_at_once > 1  # all at once
        manifests = [store.manifest(k) for k in keys]
        assert counting_moto.take() == Counter()  # served from what was read ahead
        assert store.manifest("k0") is not None and counting_moto.take() == Counter({"GET": 1})  # each served once
    assert [m.key if m else None for m in manifests] == keys[:8] + [None, None]

    other = threading.Thread(target=lambda: store.manifest("k1"))  # another thread (a running stage) reads anew
    with store.read_ahead("plan/w"):
        counting_moto.take()
        other.start()
        other.join()
        assert counting_moto.take() == Counter({"GET": 1})
        assert store.manifest("k1") is not None and counting_moto.take() == Counter()


CHAIN = "name: chain\nstages:\n  s0: {uses: testing.write, with: {files: 3, text: a}}\n" + "".join(
    f"  s{i}: {{uses: testing.concat, inputs: {{a: s{i - 1}}}, with: {{suffix: '{i}'}}}}\n" for i in range(1, 5))


def test_a_no_op_run_reads_one_manifest_per_stage_all_at_once(counting_moto, tmp_path):
    """Each key depends on the manifest upstream (inputs), yet the no-op's 5 reads are in flight together."""
    from tests.conftest import create_bucket

    (tmp_path / "wf.yaml").write_text(CHAIN)
    command = [str(Path(sys.executable).with_name("vlflow")), "run", "wf.yaml", "--cache",
               f"s3://{create_bucket(counting_moto.url)}/cache", "--state-dir", str(tmp_path / "state")]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "5 ran, 0 cached" in first.stdout, first.stdout + first.stderr
    # what each stage committed stayed as the local copy the next stage read (no download)
    assert len(list((tmp_path / "state" / "mirror").glob("*/.complete"))) == 5
    counting_moto.take()
    counting_moto.get_delay = 0.05
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 ran, 5 cached" in again.stdout, again.stdout + again.stderr
    most_at_once = counting_moto.most_in_flight
    assert counting_moto.take() == Counter({"GET": 5}) and most_at_once > 1
