"""download: fetch files through fsspec, verify checksums, resume partial HTTP downloads, extract archives safely.

Bytes go to `<output>/.staging/<path>.part` and are moved into place only after the checksums match. After a
dropped connection the next attempt resumes the .part file: HTTP asks for `Range: bytes=<size>-` (a server that
answers 200 instead of 206 makes us restart from byte zero, once), other filesystems seek.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import aiohttp
import fsspec
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from vlflow.secrets import mask

from .archive import archive_kind, safe_extract
from .errors import DataError

log = logging.getLogger("vlflow.stages.data")

STAGING = ".staging"
# Errors after which a retry (resuming the .part file) may succeed.
TRANSIENT_ERRORS = (OSError, aiohttp.ClientError, FSTimeoutError, TimeoutError)


class _Truncated(OSError):
    """The connection ended before all announced bytes arrived."""


class _TooSlow(OSError):
    """Fewer bytes arrived than the low-speed limit allows: a trickling server would otherwise hold the stage for ever
    (each byte resets the socket read timeout)."""


class _RangeIgnored(Exception):
    """The server answered a Range request with the whole file (HTTP 200)."""


def target_name(spec) -> str:
    return spec.target


def _is_http(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("http", "https")


class _Fetcher:
    """Downloads one file into its .part file, resuming after transient errors."""

    def __init__(self, spec, part: Path, params, progress: Progress, filesystems: dict, lock: threading.Lock):
        self.spec, self.part, self.params, self.progress = spec, part, params, progress
        self.filesystems, self.lock = filesystems, lock
        self.task = progress.add_task(target_name(spec), total=None, start=True)
        self.restarted_from_zero = False
        self.shown_url = mask(spec.url)  # messages and logs never carry user:password@ or ?token=

    def _filesystem(self):
        protocol = self.spec.url.split("://", 1)[0].lower() if "://" in self.spec.url else "file"
        with self.lock:  # one fsspec instance (event loop, connection pool) per protocol
            if protocol not in self.filesystems:
                if protocol in ("http", "https"):
                    timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.params.timeout_s,
                                                    sock_read=self.params.timeout_s)
                    options = {"client_kwargs": {"timeout": timeout}, **self.params.storage_options.get(protocol, {})}
                    self.filesystems[protocol] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
                else:
                    options = self.params.storage_options.get(protocol, {})
                    self.filesystems[protocol] = fsspec.filesystem(protocol, **options)
            return self.filesystems[protocol]

    def run(self) -> None:
        failures = 0
        while True:
            offset = self.part.stat().st_size if self.part.exists() else 0
            try:
                self._copy(offset)
                return
            except _RangeIgnored:
                raise DataError(f"{self.shown_url}: the server ignores HTTP Range requests (answered 200 instead of "
                                f"206) and the download broke again after restarting from zero; giving up") from None
            except FileNotFoundError:
                raise DataError(f"{self.shown_url}: not found") from None
            except aiohttp.ClientResponseError as exc:
                if exc.status < 500:  # client errors (403, 404, 416...) do not heal by retrying
                    raise DataError(f"{self.shown_url}: HTTP {exc.status} {exc.message}") from None
                error: Exception = exc
            except TRANSIENT_ERRORS as exc:
                error = exc
            failures += 1
            have = self.part.stat().st_size if self.part.exists() else 0
            if failures > self.params.retries:
                raise DataError(f"{self.shown_url}: download failed after {failures} attempts "
                                f"({have} bytes kept in {self.part.name}): {_describe(error)}")
            log.warning("%s: %s; retrying from byte %d (%d/%d)", self.shown_url, _describe(error),
                        have, failures, self.params.retries)
            time.sleep(min(0.2 * 2 ** (failures - 1), 5.0))  # brief backoff

    def _copy(self, offset: int) -> None:
        fs = self._filesystem()
        if _is_http(self.spec.url):
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            source = fs.open(self.spec.url, "rb", block_size=0, headers=headers)
            response = source.r
            total = _total_size(response.headers, offset)
            if offset and response.status != 206:
                if self.restarted_from_zero:
                    source.close()
                    raise _RangeIgnored()
                # The body is the whole file: start over from byte zero with this response.
                log.warning("%s: server ignored Range (HTTP %d instead of 206); restarting from zero",
                            self.shown_url, response.status)
                self.restarted_from_zero = True
                offset = 0
                total = _total_size(response.headers, 0)
        else:
            if isinstance(fs, LocalFileSystem):  # a FIFO would block forever, /dev/zero would fill the disk
                mode = os.stat(fs._strip_protocol(self.spec.url)).st_mode
                if not stat.S_ISREG(mode):
                    raise DataError(f"{self.shown_url}: not a regular file (a FIFO, device or directory)")
            source = fs.open(self.spec.url, "rb")
            total = fs.size(self.spec.url)
            if offset:
                source.seek(offset)
        self.progress.update(self.task, total=total, completed=offset)
        limit, window = self.params.low_speed_bytes_per_s, self.params.low_speed_s
        window_start, window_bytes = time.monotonic(), 0
        with source, open(self.part, "ab" if offset else "wb") as out:
            # an HTTP read returns what has arrived (up to chunk_bytes), so the check runs at least every timeout_s
            while chunk := source.read(self.params.chunk_bytes):
                out.write(chunk)
                self.progress.advance(self.task, len(chunk))
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= window:
                    if window_bytes < limit * elapsed:
                        raise _TooSlow(f"{window_bytes} bytes in {elapsed:.0f} s, below low_speed_bytes_per_s="
                                       f"{limit} over low_speed_s={window:g}")
                    window_start, window_bytes = time.monotonic(), 0
        size = self.part.stat().st_size
        if total is not None and size != total:
            raise _Truncated(f"connection closed after {size} of {total} bytes")


def _describe(error: Exception) -> str:
    return mask(f"{type(error).__name__}: {error}", assignments=True) if str(error) else type(error).__name__


def _total_size(headers, offset: int) -> int | None:
    content_range = headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = headers.get("Content-Length")
    return offset + int(length) if length is not None and length.isdigit() else None


def _verify(spec, path: Path) -> None:
    wanted = {name: value for name, value in (("md5", spec.md5), ("sha256", spec.sha256)) if value}
    if not wanted:
        return
    hashes = {name: hashlib.new(name) for name in wanted}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    for name, expected in wanted.items():
        actual = hashes[name].hexdigest()
        if actual != expected:
            path.unlink()
            raise DataError(f"{mask(spec.url)}: {name} mismatch: expected {expected}, got {actual}; the file was "
                            "discarded")


def download_files(params, out_dir: Path, staging: Path | None = None) -> dict:
    """Download every `params.files` entry into out_dir; raises DataError listing every failed file.

    Partial files live in `staging` (default `<out_dir>/.staging`); the stage passes its persistent work dir so a
    killed or failed run resumes its .part files on the next `vlflow run`."""
    out_dir = Path(out_dir)
    staging = Path(staging) if staging is not None else out_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    filesystems: dict = {}
    lock = threading.Lock()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())

    def fetch(spec, progress) -> dict:
        name = target_name(spec)
        target = out_dir / name
        part = staging / (name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        _Fetcher(spec, part, params, progress, filesystems, lock).run()
        _verify(spec, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        result = {"path": name, "bytes": target.stat().st_size}
        if spec.extract:
            if archive_kind(target) is None:
                raise DataError(f"{mask(spec.url)}: extract is set but {name!r} is not a .zip/.tar/.tar.gz/.tgz "
                                "archive")
            result["extracted"] = len(safe_extract(target, out_dir / spec.extract_to))
            if not spec.keep_archive:
                target.unlink()
        return result

    results, errors = [], []
    with Progress(*columns, disable=not params.progress) as progress, \
            ThreadPoolExecutor(params.parallel) as pool:
        futures = {pool.submit(fetch, spec, progress): spec for spec in params.files}
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except DataError as exc:
                errors.append(exc)
            except Exception as exc:  # noqa: BLE001 - fsspec backends raise anything; report it per file
                errors.append(DataError(f"{mask(futures[future].url)}: {_describe(exc)}"))
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise DataError(f"{len(errors)} downloads failed:\n" + "\n".join(f"  - {e}" for e in errors))
    shutil.rmtree(staging)
    return {"files": len(results), "bytes": sum(r["bytes"] for r in results)}


def download_stage(ctx) -> dict:
    staging = ctx.work_dir / "partial" if ctx.work_dir is not None else None
    return download_files(ctx.params, ctx.output_dir, staging)
