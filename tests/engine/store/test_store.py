"""ArtifactStore on a local dir, memory:// and S3 (moto server): commit, manifest, materialise, re-commit, gc, refs,
error wrapping and credential hygiene."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest

from vlflow.errors import StoreError, VlflowError
from vlflow.store import ArtifactStore, FileEntry, Manifest, files_digest

FILES = {
    "model.bin": os.urandom(300_000),
    "config.json": b'{"hidden": 8}',
    "sub/deeper/notes.txt": b"hello\n",
    "empty": b"",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name != ".complete"}


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "cache"), local_cache=tmp_path / "mirror")
    if request.param == "memory":
        return ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/cache", local_cache=tmp_path / "mirror")
    return ArtifactStore(request.getfixturevalue("s3_cache_url"), local_cache=tmp_path / "mirror")


def test_commit_manifest_materialize_round_trip(store, tmp_path):
    out = write_tree(tmp_path / "out", FILES)
    seen = []
    manifest = store.commit("k1", out, {"stage": "train", "metrics": {"loss": 0.5}},
                            progress=lambda done, total: seen.append((done, total)))

    assert [f.path for f in manifest.files] == sorted(FILES)
    for entry in manifest.files:
        assert entry.size == len(FILES[entry.path])
        assert entry.sha256 == hashlib.sha256(FILES[entry.path]).hexdigest()
    assert manifest.digest == files_digest(manifest.files)
    assert manifest.size == sum(len(d) for d in FILES.values())
    assert seen[-1] == (manifest.size, manifest.size)

    reread = store.manifest("k1")
    assert reread == manifest and reread.files == manifest.files  # the file list is read on first use
    assert store.has("k1") and not store.has("k2")
    assert reread.meta == {"stage": "train", "metrics": {"loss": 0.5}}

    local = store.materialize("k1")
    assert tree_bytes(local) == FILES
    with store.open("k1", "sub/deeper/notes.txt") as f:
        assert f.read() == b"hello\n"
    assert [m.key for m in store.list()] == ["k1"]
    assert store.garbage() == []

    if store.is_local:
        # Same filesystem: files are moved (the staging dir is emptied) and the attempt dir is used in place.
        assert not any(p.is_file() for p in out.rglob("*"))
        assert local == Path(store.url) / "artifacts" / "k1" / manifest.attempt
    else:
        assert tree_bytes(out) == FILES  # uploaded, not moved
        assert local == tmp_path / "mirror" / manifest.digest


def test_recommit_replaces_and_old_attempt_is_garbage(store, tmp_path):
    first = store.commit("k", write_tree(tmp_path / "v1", {"a.txt": b"one" * 100}), {"v": 1})
    second = store.commit("k", write_tree(tmp_path / "v2", {"a.txt": b"two", "b.txt": b"new"}), {"v": 2})

    assert second.attempt != first.attempt and second.digest != first.digest
    assert store.manifest("k").meta == {"v": 2}
    assert tree_bytes(store.materialize("k")) == {"a.txt": b"two", "b.txt": b"new"}
    assert store.garbage() == [f"artifacts/k/{first.attempt}"]

    count, freed = store.gc(keep={"k"})
    assert (count, freed) == (1, 300 + len(first.files_json()))  # its files and its file list
    assert store.garbage() == []
    assert tree_bytes(store.materialize("k")) == {"a.txt": b"two", "b.txt": b"new"}


def test_gc_removes_unkept_artifacts_and_remove_reports_bytes(store, tmp_path):
    store.commit("keep", write_tree(tmp_path / "a", {"x": b"1" * 10}), {})
    store.commit("drop", write_tree(tmp_path / "b", {"y": b"2" * 20}), {})
    store.commit("gone", write_tree(tmp_path / "c", {"z": b"3" * 30}), {})

    freed = store.remove("gone")
    assert freed >= 30  # the file plus its manifest
    assert not store.has("gone") and store.remove("gone") == 0

    count, freed = store.gc(keep={"keep"})
    assert count == 1 and freed >= 20
    assert [m.key for m in store.list()] == ["keep"]
    assert tree_bytes(store.materialize("keep")) == {"x": b"1" * 10}


def test_refs_round_trip(store):
    assert store.get_ref("runs/wf/train") is None
    store.put_ref("runs/wf/train", {"key": "abc", "components": {"params": {"lr": 0.1}}})
    store.put_ref("runs/wf/train", {"key": "def"})
    assert store.get_ref("runs/wf/train") == {"key": "def"}
    with pytest.raises(StoreError, match="invalid ref name"):
        store.put_ref("../escape", {})


def test_missing_artifacts_and_bad_keys_give_clear_errors(store, tmp_path):
    with pytest.raises(StoreError, match=r"no committed artifact nope in the artifact store") as err:
        store.materialize("nope")
    assert store.url in str(err.value)
    store.commit("k", write_tree(tmp_path / "o", {"a": b"x"}), {})
    with pytest.raises(StoreError, match="has no file 'missing.txt'"):
        store.open("k", "missing.txt")
    with pytest.raises(StoreError, match="read-only"):
        store.open("k", "a", "wb")
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(StoreError, match="invalid artifact key"):
            store.has(bad)
    assert issubclass(StoreError, VlflowError)


def test_has_reads_only_the_small_manifest(tmp_path):
    store = ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/c")
    store.commit("k", write_tree(tmp_path / "o", {f"f{i}": b"x" * 100 for i in range(50)}), {})
    calls = []
    for name in ("cat_file", "open", "cat", "ls", "find"):
        original = getattr(store.fs, name)
        setattr(store.fs, name, lambda *a, _n=name, _o=original, **k: (calls.append((_n, a[0])), _o(*a, **k))[1])
    try:
        assert store.has("k")
        manifest = store.manifest("k")
        assert manifest.size == 5000 and manifest.file_count == 50
        assert calls == [("cat_file", store._path("artifacts", "k", "manifest.json"))] * 2
        assert len(store.fs.cat_file(store._path("artifacts", "k", "manifest.json"))) < 1000
        calls.clear()
        assert len(manifest.files) == 50 and len(manifest.files) == 50
        assert calls == [("cat_file", store._path("artifacts", "k", f"{manifest.attempt}.files.json"))]
    finally:
        for name in ("cat_file", "open", "cat", "ls", "find"):
            delattr(store.fs, name)


@pytest.mark.parametrize("spelling", ["cache", "./cache/", "file://cache", "{tmp}/cache", "file://{tmp}/cache/"])
def test_plain_local_path_opens_like_fsspec_without_it(tmp_path, monkeypatch, spelling):
    """A plain local path skips fsspec's URL parsing (its import costs a no-op run); the store it opens is the one
    fsspec's LocalFileSystem opens, and its filesystem, made on first use, is LocalFileSystem."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.chdir(tmp_path)
    url = spelling.format(tmp=tmp_path)
    store = ArtifactStore(url, local_cache=tmp_path / "mirror")
    assert store.is_local and store._root == fsspec.core.url_to_fs(url)[1].rstrip("/")
    assert store.identity == f"file://{os.path.realpath(tmp_path / 'cache')}"
    assert isinstance(store.fs, LocalFileSystem) and store.manifest("k") is None
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    store.commit("k", tmp_path / "src", {})
    assert store.manifest("k").key == "k" and not ArtifactStore("memory://x").is_local


def test_corrupt_manifest_is_ignored_with_a_warning(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "cache"))
    manifest = store.commit("k", write_tree(tmp_path / "o", {"a": b"abc"}), {})
    manifest_path = tmp_path / "cache" / "artifacts" / "k" / "manifest.json"

    files_path = manifest_path.parent / f"{manifest.attempt}.files.json"
    tampered = json.loads(files_path.read_text())
    tampered["files"][0][1] = 4  # the file list no longer matches the manifest digest
    files_path.write_text(json.dumps(tampered))
    with pytest.raises(StoreError, match="file list does not match the manifest digest"):
        store.manifest("k").files

    manifest_path.write_text('{"format": 2, "key": "k", "files": [')  # truncated
    with caplog.at_level(logging.WARNING, logger="vlflow.store"):
        assert store.manifest("k") is None and not store.has("k")
    assert "corrupt manifest of artifact k" in caplog.text
    # Its attempt is not referenced by a valid manifest any more, so gc may reclaim it.
    assert store.garbage() == [f"artifacts/k/{manifest.attempt}"]
    list_size = files_path.stat().st_size
    assert store.gc(keep={"k"}) == (1, 3 + list_size)


def test_local_commit_copies_files_reached_through_symlinks(tmp_path):
    outside = write_tree(tmp_path / "input_artifact", {"data.bin": b"shared"})
    out = write_tree(tmp_path / "out", {"own.txt": b"mine"})
    (out / "link.bin").symlink_to(outside / "data.bin")
    (out / "linked_dir").symlink_to(outside, target_is_directory=True)

    store = ArtifactStore(str(tmp_path / "cache"))
    store.commit("k", out, {})
    assert tree_bytes(store.materialize("k")) == {"own.txt": b"mine", "link.bin": b"shared",
                                                  "linked_dir/data.bin": b"shared"}
    assert (outside / "data.bin").read_bytes() == b"shared"  # the link target was copied, not moved away
    assert not (out / "own.txt").exists()  # own files were moved


def test_remote_materialize_reuses_complete_copy_and_replaces_stale_one(tmp_path):
    store = ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/c")
    store.commit("k", write_tree(tmp_path / "o", {"a": b"new content"}), {})
    dest = tmp_path / "mirror" / "k"
    write_tree(dest, {"a": b"half", "leftover": b"?"})  # an interrupted earlier download, no .complete marker

    assert tree_bytes(store.materialize("k", dest)) == {"a": b"new content"}
    (dest / "a").write_bytes(b"new CONTENT")  # same size: proves the second call does not download again
    assert store.materialize("k", dest) == dest and (dest / "a").read_bytes() == b"new CONTENT"
    (dest / "a").write_bytes(b"truncated")  # another size: the cheap check sees it, the copy is downloaded again
    assert store.materialize("k", dest) == dest and tree_bytes(dest) == {"a": b"new content"}


def test_s3_endpoint_from_explicit_storage_options(moto_server, s3_env, monkeypatch, tmp_path):
    from tests.conftest import create_bucket

    bucket = create_bucket(moto_server)
    monkeypatch.delenv("VLFLOW_S3_ENDPOINT_URL")
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL")
    store = ArtifactStore(f"s3://{bucket}/x", storage_options={"client_kwargs": {"endpoint_url": moto_server}})
    store.commit("k", write_tree(tmp_path / "o", {"a": b"abc"}), {})
    assert store.fs.cat_file(f"{bucket}/x/artifacts/k/manifest.json").startswith(b"{")
    assert tree_bytes(store.materialize("k", tmp_path / "m")) == {"a": b"abc"}


SECRET_KEY_ID = "AKIAVLFLOWSECRETID42"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_credentials_never_appear_in_errors_or_repr(moto_server, s3_env, tmp_path):
    store = ArtifactStore("s3://no-such-bucket-vlflow/cache",
                          storage_options={"key": SECRET_KEY_ID, "secret": SECRET,
                                           "client_kwargs": {"endpoint_url": moto_server}})
    assert repr(store) == "ArtifactStore('s3://no-such-bucket-vlflow/cache')"
    with pytest.raises(StoreError) as err:
        store.commit("abc123", write_tree(tmp_path / "o", {"a": b"x"}), {})
    message = str(err.value)
    assert "s3://no-such-bucket-vlflow/cache" in message and "abc123" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    # Backend messages are scrubbed too, whatever they contain.
    leaked = store._scrub(RuntimeError(f"bad request key={SECRET_KEY_ID} for {SECRET} secret: hunter2"))
    for text in (message, leaked, repr(store)):
        assert SECRET not in text and SECRET_KEY_ID not in text and "hunter2" not in text


@pytest.mark.parametrize("packed", [False, True], ids=["one-object-per-file", "packs"])
def test_upload_rejected_midway_leaves_no_manifest(moto_server, s3_env, tmp_path, packed):
    """A second front end on the same moto backend refuses one PUT (a file's, or with small files packed, the fourth
    pack's); the commit fails and commits nothing."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from tests.conftest import create_bucket

    moto_app = DomainDispatcherApplication(create_backend_app)
    rejected = []

    def reject_one_put(environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and ("poison" in environ["PATH_INFO"]
                                                   or environ["PATH_INFO"].endswith("/.vlflow-packs/00003")):
            rejected.append(environ["PATH_INFO"])
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<Error><Code>AccessDenied</Code><Message>injected failure</Message></Error>"]
        return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, reject_one_put, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        bucket = create_bucket(moto_server)
        rejecting = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server.server_port}"}}
        store = ArtifactStore(f"s3://{bucket}/cache", storage_options=rejecting,
                              **({"pack_bytes": 4000} if packed else {"pack_file_limit": 0}))
        files = {f"f{i:03d}.bin": b"x" * 1000 for i in range(40)}
        files["f020_poison.bin"] = b"bad"
        with pytest.raises(StoreError, match=r"cannot commit artifact k1 in the artifact store s3://"):
            store.commit("k1", write_tree(tmp_path / "o", files), {})
        assert rejected
        assert not store.has("k1") and store.list() == []
        garbage = store.garbage()
        assert len(garbage) == 1 and garbage[0].startswith("artifacts/k1/")
        assert store.gc(keep=set())[0] == 1
        assert store.fs.find(f"{bucket}/cache") == []
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_manifest_summary_round_trip_and_digests():
    files = [FileEntry("b", 2, "00"), FileEntry("a", 1, "ff"), FileEntry("_vlflow/stage.log", 9, "aa")]
    manifest = Manifest(key="k", attempt="a1", created=1.0, files=files, digest=files_digest(files), meta={"x": [1]})
    loaded = Manifest.from_summary(json.dumps(manifest.summary()), lambda key, attempt, digest: files)
    assert loaded == manifest and (loaded.size, loaded.file_count, loaded.files) == (12, 3, files)
    assert files_digest(files) == files_digest(list(reversed(files)))  # order-independent
    assert files_digest([FileEntry("a", 1, "fe"), *files[1:]]) != manifest.digest
    # data_digest ignores the runner's bookkeeping: a rerun with another log has the same data
    rerun = [*files[:2], FileEntry("_vlflow/stage.log", 12, "bb")]
    assert files_digest(rerun) != manifest.digest
    assert files_digest(rerun, exclude="_vlflow") == manifest.data_digest == files_digest(files[:2])


def test_concurrent_materialize_of_one_artifact_downloads_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/c")
    store.commit("k", write_tree(tmp_path / "o", {f"f{i}": bytes([i]) * 1000 for i in range(20)}), {})
    downloads = []
    original_get = store.fs.get
    store.fs.get = lambda rpaths, lpaths, **kw: (downloads.append(len(rpaths)), original_get(rpaths, lpaths, **kw))
    dest = tmp_path / "mirror" / "k"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: store.materialize("k", dest), range(4)))
    assert results == [dest] * 4 and downloads == [1]  # one concurrent get (of one pack: the files are small)
    assert tree_bytes(dest) == {f"f{i}": bytes([i]) * 1000 for i in range(20)}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["k"]  # no partial or stale dirs left


@pytest.mark.parametrize("packed", [False, True], ids=["one-object-per-file", "packs"])
def test_remote_materialize_checks_sizes(tmp_path, packed):
    store = ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/c", pack_file_limit=1 << 20 if packed else 0)
    manifest = store.commit("k", write_tree(tmp_path / "o", {"a.bin": b"12345"}), {})
    stored = store._path("artifacts", "k", manifest.attempt, manifest.files[0].pack or "a.bin")
    store.fs.pipe_file(stored, b"123")  # damaged behind our back (the file, or the pack holding it)
    with pytest.raises(StoreError, match=r"a\.bin has 3 bytes after download, the manifest says 5"):
        store.materialize("k", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_local_commit_from_another_filesystem_copies(tmp_path):
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a different filesystem than the temp dir")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other_fs:
        out = write_tree(Path(other_fs) / "out", FILES)
        store = ArtifactStore(str(tmp_path / "cache"))
        manifest = store.commit("k", out, {})
        assert tree_bytes(out) == FILES  # copied, the source is left alone
        assert tree_bytes(store.materialize("k")) == FILES
        assert {f.path: f.sha256 for f in manifest.files} == {p: hashlib.sha256(d).hexdigest()
                                                              for p, d in FILES.items()}


def _edit_attempt_file(store: ArtifactStore, manifest, relpath: str, data: bytes | None) -> None:
    """Replace (or delete, data=None) one file inside a committed attempt, behind the store's back."""
    path = f"{store._attempt_dir(manifest)}/{relpath}"
    if data is None:
        store.fs.rm_file(path)
    else:
        store.fs.pipe_file(path, data)
    store.fs.invalidate_cache()


def test_damage_sees_missing_resized_and_extra_files_and_verify_sees_same_size_edits(store, tmp_path):
    store.pack_file_limit = 0  # one object per file (packs: tests/engine/store/test_store_s3_packs.py)
    out = write_tree(tmp_path / "out", FILES)
    manifest = store.commit("k", out, {})
    assert store.damage(manifest) == [] and store.verify(manifest) == []

    _edit_attempt_file(store, manifest, "config.json", b'{"hidden": 9}')  # same size: only a re-hash sees it
    assert store.damage(store.manifest("k")) == []
    problems = store.verify(store.manifest("k"))
    assert len(problems) == 1 and problems[0].startswith("config.json has other contents than committed (sha256 ")

    _edit_attempt_file(store, manifest, "config.json", b'{"hidden": 8, "extended": 1}')
    _edit_attempt_file(store, manifest, "sub/deeper/notes.txt", None)
    _edit_attempt_file(store, manifest, "planted.txt", b"x")
    expected = ["config.json has 28 bytes, the manifest says 13", "sub/deeper/notes.txt is missing",
                "planted.txt is not in the manifest"]
    assert store.damage(store.manifest("k")) == expected
    assert store.verify(store.manifest("k")) == expected


def _rewrite_summary(path: Path, **changes) -> None:
    summary = json.loads(path.read_text())
    summary.update(changes)
    path.write_text(json.dumps(summary))


@pytest.mark.parametrize("attempt", ["../../outside", "/etc", "..", "a/b", "manifest.json", "x.files.json", ""])
def test_manifest_whose_attempt_is_not_a_plain_name_is_never_read(tmp_path, caplog, attempt):
    store = ArtifactStore(str(tmp_path / "cache"))
    store.commit("k", write_tree(tmp_path / "o", {"a": b"abc"}), {})
    _rewrite_summary(tmp_path / "cache" / "artifacts" / "k" / "manifest.json", attempt=attempt)
    with caplog.at_level(logging.WARNING, logger="vlflow.store"):
        assert store.manifest("k") is None
    assert "corrupt manifest of artifact k" in caplog.text and "attempt" in caplog.text
    with pytest.raises(StoreError, match="no committed artifact k"):
        store.materialize("k")


@pytest.mark.parametrize("field,value", [("size", -1), ("size", 1.5), ("file_count", True), ("digest", "xyz"),
                                         ("data_digest", "A" * 64), ("key", "../k"), ("created", "soon")])
def test_manifest_fields_are_validated(tmp_path, caplog, field, value):
    store = ArtifactStore(str(tmp_path / "cache"))
    store.commit("k", write_tree(tmp_path / "o", {"a": b"abc"}), {})
    _rewrite_summary(tmp_path / "cache" / "artifacts" / "k" / "manifest.json", **{field: value})
    with caplog.at_level(logging.WARNING, logger="vlflow.store"):
        assert store.manifest("k") is None
    assert f"({field}" in caplog.text


@pytest.mark.parametrize("entry", [["../escape", 3, "0" * 64], ["/etc/passwd", 3, "0" * 64], ["a/./b", 3, "0" * 64],
                                   ["a", -3, "0" * 64], ["a", 3, "not-hex"]])
def test_file_list_entries_are_validated(tmp_path, entry):
    store = ArtifactStore(str(tmp_path / "cache"))
    manifest = store.commit("k", write_tree(tmp_path / "o", {"a": b"abc"}), {})
    files_path = tmp_path / "cache" / "artifacts" / "k" / f"{manifest.attempt}.files.json"
    listing = json.loads(files_path.read_text())
    listing["files"] = [entry]
    files_path.write_text(json.dumps(listing))
    with pytest.raises(StoreError, match="has a corrupt file list"):
        store.manifest("k").files
    assert store.damage(store.manifest("k"))[0].startswith("artifact k in ")  # damaged, so never consumed


def test_a_no_op_reads_each_manifest_and_ref_in_one_s3_request(moto_server, s3_env, s3_cache_url, tmp_path):
    """s3fs's cat_file sends a HEAD before the GET unless it reads with one connection; manifests, file lists and
    refs are small, so each is one GET (a missing one too: a 404 GET), counted on the client's request events."""
    store = ArtifactStore(s3_cache_url, local_cache=tmp_path / "mirror")
    store.commit("k", write_tree(tmp_path / "o", {"a": b"abc", "d/b": b"xyz"}), {"stage": "s"})
    store.put_ref("runs/w/s", {"key": "k"})
    store = ArtifactStore(s3_cache_url, local_cache=tmp_path / "mirror")  # nothing cached in the filesystem object
    store.fs.connect()
    calls: list[str] = []
    store.fs.s3.meta.events.register("before-call.s3.*", lambda event_name, **_: calls.append(event_name))
    manifest = store.manifest("k")
    assert manifest is not None and [c.split(".")[-1] for c in calls] == ["GetObject"]
    calls.clear()
    assert store.manifest("missing") is None and store.get_ref("runs/w/s") == {"key": "k"}
    assert [p.path for p in manifest.files] == ["a", "d/b"]
    assert [c.split(".")[-1] for c in calls] == ["GetObject"] * 3


def test_keep_committed_makes_the_uploaded_dir_the_local_copy(tmp_path):
    """A run's commit to an object store keeps its staged files as the artifact's local copy (one rename): nothing
    to delete, nothing to download for the stages that consume it; a dir holding a link is left to the caller."""
    store = ArtifactStore(f"memory://vlflow-test-{uuid.uuid4().hex[:8]}/c", local_cache=tmp_path / "mirror",
                          keep_committed=True)
    manifest = store.commit("k", write_tree(tmp_path / "out", FILES), {})
    copy = tmp_path / "mirror" / manifest.digest
    assert not (tmp_path / "out").exists() and tree_bytes(copy) == FILES
    assert (copy / ".complete").read_text() == manifest.digest
    store.fs.get = lambda *a, **k: pytest.fail("downloaded a copy that is already here")
    assert store.materialize("k") == copy

    linked = write_tree(tmp_path / "linked", {"a": b"1"})
    (linked / "b").symlink_to(linked / "a")
    other = store.commit("k2", linked, {})
    assert (linked / "b").is_symlink() and not (tmp_path / "mirror" / other.digest).exists()
