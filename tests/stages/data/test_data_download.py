"""download stage against a local http.server (dropped connections, Range, checksums) and safe archive extraction."""
import hashlib
import io
import os
import socket
import tarfile
import time
import zipfile

import pytest
from vlflow.stages.data.archive import safe_extract
from vlflow.stages.data.download import download_files
from vlflow.stages.data.errors import DataError
from vlflow.stages.data.spec import DownloadParams
from vlflow.stages.testing.http_files import RangeFileHandler, serve

PAYLOAD = os.urandom(300_000)


class Handler(RangeFileHandler):
    """/ok/NAME serves with Range support; /drop/NAME drops the first GET mid-file; /norange/NAME drops the first GET
    and then ignores Range; /flaky/NAME drops every GET and ignores Range; /trickle/NAME sends a byte every 0.1 s."""

    requests: list = []  # (path, Range header, status) of every GET

    def honours_range(self, mode: str) -> bool:
        return mode in ("ok", "drop", "trickle")

    def send_body(self, mode: str, data: bytes, start: int, range_header: str | None) -> None:
        previous = sum(1 for p, _, _ in self.requests if p == self.path)
        self.requests.append((self.path, range_header, 206 if start else 200))
        if (mode in ("drop", "norange") and previous == 0) or mode == "flaky":  # send a part, hang up
            self.wfile.write(data[start:start + (len(data) - start) // 3])
            self.wfile.flush()
            time.sleep(0.2)  # let the client consume what was sent before the connection breaks
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if mode == "trickle":  # a byte every 0.1 s: never a read timeout, never done
            for byte in data[start:start + 40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def server():
    Handler.files = {"a.bin": PAYLOAD, "b.bin": PAYLOAD[::-1], "data.tar.gz": _tar_gz({"d/x.txt": b"hello"})}
    with serve(Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def clear_requests():
    Handler.requests.clear()


def _tar_gz(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def params(*files, **kwargs):
    return DownloadParams(files=list(files), progress=False, chunk_bytes=16384, timeout_s=10, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_parallel_download_with_checksums(server, tmp_path):
    metrics = download_files(params(
        {"url": f"{server}/ok/a.bin", "sha256": sha256(PAYLOAD), "md5": hashlib.md5(PAYLOAD).hexdigest()},
        {"url": f"{server}/ok/b.bin", "path": "sub/b.bin"}), tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert (tmp_path / "sub" / "b.bin").read_bytes() == PAYLOAD[::-1]
    assert metrics == {"files": 2, "bytes": 2 * len(PAYLOAD)}
    assert not (tmp_path / ".staging").exists()


def test_dropped_connection_resumes_with_range(server, tmp_path):
    download_files(params({"url": f"{server}/drop/a.bin", "sha256": sha256(PAYLOAD)}), tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    (first_path, first_range, _), (_, second_range, second_status) = Handler.requests
    assert first_range is None
    assert second_range == f"bytes={len(PAYLOAD) // 3}-" and second_status == 206  # resumed, not restarted


def test_server_ignoring_range_restarts_from_zero_once(server, tmp_path):
    download_files(params({"url": f"{server}/norange/a.bin", "sha256": sha256(PAYLOAD)}), tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert [(r is not None, s) for _, r, s in Handler.requests] == [(False, 200), (True, 200)]


def test_server_ignoring_range_and_dropping_again_is_refused(server, tmp_path):
    with pytest.raises(DataError, match=r"flaky/a.bin: the server ignores HTTP Range requests"):
        download_files(params({"url": f"{server}/flaky/a.bin"}, retries=5), tmp_path)
    assert len(Handler.requests) == 3  # first try, restart from zero, refused on the next 200
    assert not (tmp_path / "a.bin").exists()


def test_retries_exhausted(server, tmp_path):
    with pytest.raises(DataError, match=r"flaky/b.bin: download failed after 1 attempts"):
        download_files(params({"url": f"{server}/flaky/b.bin"}, retries=0), tmp_path)


def test_a_trickling_server_is_cut_off_by_the_low_speed_limit(server, tmp_path):
    """Each byte arrives well inside the read timeout, so only the low-speed limit ends the attempt (curl's
    --speed-limit/--speed-time); the retry resumes from the bytes kept, then gives up with one clear error."""
    started = time.monotonic()
    with pytest.raises(DataError, match=r"trickle/a.bin: download failed after 2 attempts \(\d+ bytes kept in "
                                        r"a.bin.part\): _TooSlow: \d+ bytes in \d+ s, below "
                                        r"low_speed_bytes_per_s=1000 over low_speed_s=0.5"):
        download_files(params({"url": f"{server}/trickle/a.bin"}, retries=1, low_speed_bytes_per_s=1000,
                              low_speed_s=0.5), tmp_path)
    assert time.monotonic() - started < 10
    assert [header for path, header, _ in Handler.requests if path == "/trickle/a.bin"][1].startswith("bytes=")


def test_checksum_mismatch_discards_file(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DataError) as info:
        download_files(params({"url": f"{server}/ok/a.bin", "sha256": wrong}), tmp_path)
    message = str(info.value)
    assert f"{server}/ok/a.bin" in message and wrong in message and sha256(PAYLOAD) in message
    assert not (tmp_path / "a.bin").exists()
    assert not list((tmp_path / ".staging").glob("*"))  # the .part file is gone too


def test_not_found_and_several_errors(server, tmp_path):
    with pytest.raises(DataError, match=r"2 downloads failed:(.|\n)*missing.bin: not found"):
        download_files(params({"url": f"{server}/ok/missing.bin"},
                              {"url": f"{server}/ok/b.bin", "md5": "1" * 32}), tmp_path)


def test_download_and_extract_archive(server, tmp_path):
    download_files(params({"url": f"{server}/ok/data.tar.gz", "extract": True, "extract_to": "unpacked",
                           "keep_archive": False}), tmp_path)
    assert (tmp_path / "unpacked" / "d" / "x.txt").read_bytes() == b"hello"
    assert not (tmp_path / "data.tar.gz").exists()


def test_file_url_download(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    download_files(params({"url": f"file://{source}", "path": "copy.bin", "sha256": sha256(PAYLOAD)}),
                   tmp_path / "out")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == PAYLOAD


def test_params_reject_escaping_paths():
    with pytest.raises(ValueError, match="relative path inside the output dir"):
        DownloadParams(files=[{"url": "http://127.0.0.1/x", "path": "../x"}])
    with pytest.raises(ValueError, match=r"files\[0\] and files\[1\] both write 'x'"):
        DownloadParams(files=[{"url": "http://127.0.0.1/a/x"}, {"url": "http://127.0.0.1/b/x"}])


def _tar_with(tmp_path, build) -> str:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        build(tar)
    return path


def _add_file(tar, name, content=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def _add_link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


@pytest.mark.parametrize("entry,build,reason", [
    ("/tmp/evil.txt", lambda t: _add_file(t, "/tmp/evil.txt"), "absolute path"),
    ("a/../../evil.txt", lambda t: _add_file(t, "a/../../evil.txt"), "'..'"),
    ("sub/link", lambda t: _add_link(t, "sub/link", "../../outside"), "symlink"),
    ("abs_link", lambda t: _add_link(t, "abs_link", "/etc/passwd"), "symlink"),
    ("hard", lambda t: _add_link(t, "hard", "../outside", tarfile.LNKTYPE), "hard link"),
])
def test_tar_entries_escaping_target_are_refused(tmp_path, entry, build, reason):
    def with_a_safe_file_first(tar):
        _add_file(tar, "good.txt")
        build(tar)

    archive = _tar_with(tmp_path, with_a_safe_file_first)
    with pytest.raises(DataError) as info:
        safe_extract(archive, tmp_path / "dest")
    assert repr(entry) in str(info.value) and reason in str(info.value) and "evil.tar" in str(info.value)
    assert not (tmp_path / "dest" / "good.txt").exists()  # nothing extracted before the check


def test_zip_entries_escaping_target_are_refused(tmp_path):
    for name in ("../evil.txt", "/abs.txt"):
        archive = tmp_path / "evil.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("ok.txt", "fine")
            zf.writestr(zipfile.ZipInfo(name), "bad")
        with pytest.raises(DataError, match=f"refusing to extract entry {name!r}"):
            safe_extract(archive, tmp_path / "dest")
        assert not (tmp_path / "dest" / "ok.txt").exists()


def test_safe_archives_extract(tmp_path):
    archive = _tar_with(tmp_path, lambda t: (_add_file(t, "d/f.txt", b"data"), _add_link(t, "d/l", "f.txt")))
    safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "l").read_bytes() == b"data"
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("z/a.txt", "zip")
    safe_extract(tmp_path / "ok.zip", tmp_path / "z")
    assert (tmp_path / "z" / "z" / "a.txt").read_text() == "zip"


def test_s3_download_through_moto(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="dir/a.bin", Body=PAYLOAD)
        download_files(params({"url": "s3://data/dir/a.bin", "sha256": sha256(PAYLOAD)},
                              storage_options={"s3": {"endpoint_url": endpoint}}), tmp_path)
        assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    finally:
        server.stop()


def test_partial_file_in_work_dir_resumes_on_the_next_run(server, tmp_path):
    """A run that gives up (retries exhausted) keeps its .part in the stage's work dir; the next run resumes it."""
    work = tmp_path / "work"
    first_out, second_out = tmp_path / "out1", tmp_path / "out2"
    with pytest.raises(DataError, match="download failed after 1 attempts"):
        download_files(params({"url": f"{server}/drop/a.bin", "sha256": sha256(PAYLOAD)}, retries=0), first_out, work)
    kept = work / "a.bin.part"
    assert kept.stat().st_size == len(PAYLOAD) // 3
    download_files(params({"url": f"{server}/drop/a.bin", "sha256": sha256(PAYLOAD)}, retries=0), second_out, work)
    assert (second_out / "a.bin").read_bytes() == PAYLOAD
    assert Handler.requests[-1][1:] == (f"bytes={len(PAYLOAD) // 3}-", 206)
