"""Streaming Arrow IPC writer shared by the arrow.* stages, plus strict JSON helpers for the annotation files.

Memory stays bounded: rows are written in record batches of `batch_rows`; a thread pool reads the images of the
next batch straight into one of two reused buffers and verifies them while a writer thread copies the current batch
(Arrow's view of the other buffer, no copy) into the file, so at most two batches of image bytes are held.
Each split is written to `<name>.arrow.tmp` and renamed when complete.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import DataError

log = logging.getLogger("vlflow.stages.data")


@dataclass
class ImageRow:
    """One output row: the image file to embed and the values of the other columns."""

    image_path: Path | str  # a str spares building a Path per image (pathlib costs ~20 us each)
    values: dict[str, Any]
    expected_size: tuple[int, int] | None = None  # (width, height) from the annotations, checked when given


@dataclass
class ImageCheck:
    data: bytes | None
    reason: str | None = None


@dataclass
class ConversionReport:
    source: str
    splits: dict[str, dict] = field(default_factory=dict)
    bad_images: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"source": self.source, "splits": self.splits, "bad_images": self.bad_images,
                "bad_image_count": len(self.bad_images)}

    def metrics(self) -> dict:
        return {"rows": {name: s["rows"] for name, s in self.splits.items()}, "bad_images": len(self.bad_images)}

    def write(self, out_dir: Path) -> None:
        (Path(out_dir) / "report.json").write_text(json.dumps(self.to_json(), indent=2))


JPEG_END = b"\xff\xd9"  # EOI marker
JPEG_TAIL = 1024  # bytes at the end of a JPEG searched for its EOI (some writers append padding or metadata)


def check_image(path: Path, expected_size: tuple[int, int] | None = None, decode: bool | str = True) -> ImageCheck:
    """Read the raw bytes and check them with PIL. `decode` (True or "decode"): the pixels are decoded (JPEGs at 1/8
    scale: the whole entropy-coded stream is still read, the inverse DCT is cheaper), which catches any stream PIL
    cannot decode. "structure": PIL parses the headers (`verify()`; for PNG that checks every chunk's CRC up to
    IEND) and a JPEG must end in its end-of-image marker: a truncated JPEG, which passes `verify()` and would crash
    training, is caught at ~0.1 ms instead of ~4 ms per JPEG (a JPEG whose middle is corrupted but whose end is intact
    is not). "headers" (or False): `verify()` only."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader
            return ImageCheck(None, "not a regular file")
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return ImageCheck(None, "missing file")
    except OSError as exc:  # permissions, a name too long, ...
        return ImageCheck(None, f"unreadable: {exc.strerror or exc}")
    reason = verify_image(data, expected_size, decode)
    return ImageCheck(data if reason is None else None, reason)


def verify_image(data: bytes | memoryview, expected_size: tuple[int, int] | None = None,
                 decode: bool | str = True) -> str | None:
    """check_image's checks of bytes already read (`decode` as there): None when the image is good, else the
    reason."""
    mode = {True: "decode", False: "headers"}.get(decode, decode)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide PIL switch some libraries turn on
        return "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; cannot tell truncated images apart"
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if mode == "decode":
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
            else:
                is_jpeg = image.format == "JPEG"
                image.verify()
                if mode == "structure" and is_jpeg and not _ends_with_jpeg_eoi(data):
                    return "corrupt image: the JPEG has no end-of-image marker (truncated)"
    except UnidentifiedImageError:
        return "corrupt image: not in an image format PIL can read"
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "not an image we can use"
        return f"corrupt image: {exc}"
    if expected_size is not None and tuple(size) != tuple(expected_size):
        return (f"image is {size[0]}x{size[1]} but the annotations say "
                f"{expected_size[0]}x{expected_size[1]}")
    return None


def _ends_with_jpeg_eoi(data: bytes | memoryview) -> bool:
    return bytes(data[max(0, len(data) - JPEG_TAIL):]).rfind(JPEG_END) >= 0


# Why images go into reused buffers rather than one bytes object each: on a virtual machine, memory the process has
# not touched lately costs a page fault per 4 KiB (~15 us each here, ~300 MB/s), and both Python's allocator and
# Arrow's pool hand such pages back to the system between batches. Reading each batch's files straight into one of
# two long-lived buffers, and handing that buffer to Arrow without a copy, touches fresh memory once per conversion.
_ROWS_PER_TASK = 16  # rows one pool task reads and checks (one Future per image costs more than a small JPEG check)
_MAX_BATCH_BYTES = 2**31 - 1  # Arrow binary offsets are int32: a record batch's image bytes stay below this


class _ImageBatch:
    """The images of one chunk of rows, read into `buffer` at `offsets` and checked by the pool; `reasons[i]` is
    None for a good image."""

    def __init__(self, rows: list[ImageRow], buffer: np.ndarray, pool: ThreadPoolExecutor, decode: bool | str):
        self.rows = rows
        self.reasons: list[str | None] = [None] * len(rows)
        self.sizes = [0] * len(rows)
        for i, row in enumerate(rows):  # sizes first (a stat is ~3 us), so every image has its place in the buffer
            try:
                info = os.stat(row.image_path)
            except (FileNotFoundError, NotADirectoryError):
                self.reasons[i] = "missing file"
                continue
            except OSError as exc:
                self.reasons[i] = f"unreadable: {exc.strerror or exc}"
                continue
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader
                self.reasons[i] = "not a regular file"
            elif info.st_size > _MAX_BATCH_BYTES:
                self.reasons[i] = "unreadable: larger than 2 GiB, the most an Arrow binary value holds"
            else:
                self.sizes[i] = info.st_size
        self.offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        total = int(self.offsets[-1])
        if len(buffer) < total:
            buffer = np.empty(total + total // 4, dtype=np.uint8)
        self.buffer = buffer
        view = memoryview(buffer)
        self._tasks = [pool.submit(self._read_and_check, range(start, min(start + _ROWS_PER_TASK, len(rows))), view,
                                   decode) for start in range(0, len(rows), _ROWS_PER_TASK)]

    def _read_and_check(self, indexes: range, view: memoryview, decode: bool | str) -> None:
        for i in indexes:
            if self.reasons[i] is not None:
                continue
            start, size = int(self.offsets[i]), self.sizes[i]
            target = view[start:start + size]
            try:
                self.reasons[i] = _read_into(self.rows[i].image_path, target)
            except (FileNotFoundError, NotADirectoryError):
                self.reasons[i] = "missing file"
            except OSError as exc:
                self.reasons[i] = f"unreadable: {exc.strerror or exc}"
            if self.reasons[i] is None:
                self.reasons[i] = verify_image(target, self.rows[i].expected_size, decode)

    def wait(self) -> None:
        for task in self._tasks:
            task.result()

    def record_batches(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """The good rows as record batches (one, unless the images pass 2 GiB); the bad ones' bytes are squeezed
        out of the buffer first."""
        good = [i for i, reason in enumerate(self.reasons) if reason is None]
        sizes = np.array([self.sizes[i] for i in good], dtype=np.int64)
        if len(good) < len(self.rows):
            position = 0
            for i, size in zip(good, sizes):
                start = int(self.offsets[i])
                if start != position:  # moves left within one array: numpy copes with the overlap
                    self.buffer[position:position + size] = self.buffer[start:start + size]
                position += int(size)
        ends = np.cumsum(sizes)
        first = 0
        while first < len(good):
            base = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(np.searchsorted(ends, base + _MAX_BATCH_BYTES, side="right")))
            offsets = np.zeros(last - first + 1, dtype=np.int32)
            offsets[1:] = ends[first:last] - base
            data = pa.py_buffer(self.buffer[base:int(ends[last - 1])])
            columns = [pa.Array.from_buffers(pa.binary(), last - first, [None, pa.py_buffer(offsets), data])
                       if field_.name == "image" else
                       pa.array([self.rows[i].values[field_.name] for i in good[first:last]], type=field_.type)
                       for field_ in schema]
            yield pa.RecordBatch.from_arrays(columns, schema=schema)
            first = last


def _read_into(path: Path, target: memoryview) -> str | None:
    """Fill `target` with the file's bytes; a reason when the file is no longer the size stat gave."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a file swapped for a FIFO must not block
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size != len(target):
            return "unreadable: the file changed size while being converted"
        done = 0
        while done < len(target):
            read = os.readv(fd, [target[done:]])
            if read == 0:
                return "unreadable: the file changed size while being converted"
            done += read
    finally:
        os.close(fd)
    return None


def write_split(out_path: Path, schema: pa.Schema, rows: list[ImageRow], *, split: str, root: Path,
                report: ConversionReport, on_bad_image: str, batch_rows: int, pool: ThreadPoolExecutor,
                decode: bool | str = True, copies: dict[str, tuple[Path, int, int]] | None = None) -> int:
    """Write `rows` (in order, bad images dropped or fatal) as one Arrow IPC file; returns the rows written.

    `copies` (split -> (path, start, stop)): also write rows [start, stop) of the written file to `path`, as
    write_rows_of would, without reading it back. Only kept if no image was dropped (the written row numbers are
    then the input's); each copy kept is recorded in `report.splits`, so a caller sees which ones it must make."""
    out_path = Path(out_path)
    chunks = [rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)]
    buffers = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]  # one being written, one being filled
    written = skipped = 0
    output = _ArrowFile(out_path, schema)
    kept_copies: dict[str, tuple[_ArrowFile, int, int]] = {}
    try:
        for name, (path, start, stop) in (copies or {}).items():
            kept_copies[name] = (_ArrowFile(path, schema), start, stop)
        pending = _ImageBatch(chunks[0], buffers[0], pool, decode) if chunks else None
        for index in range(len(chunks)):
            batch, pending = pending, None
            batch.wait()
            buffers[index % 2] = batch.buffer  # kept for the batch after next, grown if it had to be
            for file in [output] + [file for file, _, _ in kept_copies.values()]:
                file.flush()  # the previous batch's writes: its buffer is the one the next chunk is read into
            if index + 1 < len(chunks):  # prefetch the next chunk into the other buffer
                pending = _ImageBatch(chunks[index + 1], buffers[(index + 1) % 2], pool, decode)
            for row, reason in zip(batch.rows, batch.reasons):
                if reason is not None:
                    _bad_image(report, row, reason, split, root, on_bad_image)
                    skipped += 1
            if skipped and kept_copies:  # row numbers moved: the caller makes the copies from the written file
                for file, _, _ in kept_copies.values():
                    file.abort()
                kept_copies = {}
            for record_batch in batch.record_batches(schema):
                output.write(record_batch)
                for file, start, stop in kept_copies.values():
                    first, last = max(start, written), min(stop, written + record_batch.num_rows)
                    if first < last:
                        file.write(record_batch.slice(first - written, last - first))
                written += record_batch.num_rows
            del batch
        output.commit()
        for file, _, _ in kept_copies.values():
            file.commit()
    except BaseException:  # (reads still in flight keep their batch, and so its buffer, alive)
        for file in [output] + [file for file, _, _ in kept_copies.values()]:
            file.abort()  # leave no half-written file behind
        raise
    report.splits[split] = {"file": out_path.name, "rows": written, "skipped": skipped,
                            "bytes": out_path.stat().st_size}
    log.info("%s: %d rows (%d bad images skipped)", out_path.name, written, skipped)
    for name, (file, _, _) in kept_copies.items():
        report.splits[name] = {"file": file.path.name, "rows": file.rows, "skipped": 0,
                               "bytes": file.path.stat().st_size}
        log.info("%s: %d rows of %s", file.path.name, file.rows, out_path.name)
    return written


class _ArrowFile:
    """An Arrow IPC file written as `<name>.tmp` by a thread of its own, renamed by commit(). Arrow's writes release
    the GIL, so copying the images into the file overlaps the reading and checking of the next ones (and the files
    of one split are written side by side)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.rows = 0
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="arrow-write")
        self._pending: list = []

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(self._thread.submit(self._writer.write_batch, batch))
        self.rows += batch.num_rows

    def flush(self) -> None:
        """Wait for the writes submitted so far (raising the first one's error)."""
        pending, self._pending = self._pending, []
        for write in pending:
            write.result()

    def commit(self) -> None:
        self.flush()
        self._writer.close()
        self._sink.close()
        self._thread.shutdown()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._thread.shutdown()  # waits for the writes in flight: the writer is not closed under them
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # closing a half-written file may fail too; it is deleted either way
            pass
        self.tmp.unlink(missing_ok=True)


def write_rows_of(source: Path, out_path: Path, start: int, stop: int, *, split: str,
                  report: ConversionReport) -> int:
    """Rows [start, stop) of an arrow this conversion wrote, as another split's file (as ViLT cuts rest_val out of
    val): the images are not read or checked again. One record batch at a time is read (not memory-mapped: mapped
    pages would count as resident), so memory stays bounded by batch_rows."""
    out_path = Path(out_path)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    written = 0
    try:
        with pa.OSFile(str(source)) as source_file:
            reader = pa.ipc.open_file(source_file)
            with pa.OSFile(str(tmp_path), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
                offset = 0
                for index in range(reader.num_record_batches):
                    batch = reader.get_batch(index)
                    first, last = max(start, offset), min(stop, offset + batch.num_rows)
                    if first < last:
                        writer.write_batch(batch.slice(first - offset, last - first))
                        written += last - first
                    offset += batch.num_rows
                    del batch
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    os.replace(tmp_path, out_path)
    report.splits[split] = {"file": out_path.name, "rows": written, "skipped": 0, "bytes": out_path.stat().st_size}
    log.info("%s: %d rows of %s", out_path.name, written, Path(source).name)
    return written


def _bad_image(report: ConversionReport, row: ImageRow, reason: str, split: str, root: Path, on_bad_image: str):
    try:
        shown = str(Path(row.image_path).relative_to(root))
    except ValueError:
        shown = str(row.image_path)
    report.bad_images.append({"path": shown, "split": split, "reason": reason})
    if on_bad_image == "fail":
        raise DataError(f"bad image in split {split!r}: {reason} (set on_bad_image: skip to drop bad images)",
                        file=str(row.image_path))


def convert(root: Path, out_dir: Path, source: Path, rows_by_split: dict[str, list[ImageRow]], name_of: Callable,
            schema: pa.Schema, params, copies: dict[str, dict[str, tuple[int, int]]] | None = None
            ) -> ConversionReport:
    """Write one arrow per split (name_of(split) -> file name) and report.json; returns the report.

    `copies` (split -> {other split: (start, stop)}): rows [start, stop) of a split's file also written as the other
    split's (see write_split: kept only where no image of the split was dropped; report.splits says which)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(source=str(Path(source).relative_to(root)) if Path(source).is_relative_to(root)
                              else str(source))
    with ThreadPoolExecutor(params.read_threads) as pool:
        for split, rows in rows_by_split.items():
            written = write_split(out_dir / name_of(split), schema, rows, split=split, root=Path(root),
                                  report=report, on_bad_image=params.on_bad_image, batch_rows=params.batch_rows,
                                  pool=pool, decode=params.image_check,
                                  copies={name: (out_dir / name_of(name), start, stop)
                                          for name, (start, stop) in (copies or {}).get(split, {}).items()})
            if rows and not written:  # an empty arrow would "succeed" and fail much later, in training
                first = next(b for b in report.bad_images if b["split"] == split)
                raise DataError(f"every image of split {split!r} is bad ({len(rows)} of {len(rows)}; first: "
                                f"{first['path']}: {first['reason']}); nothing to convert", file=str(source))
    report.write(out_dir)
    return report


def member_path(root: Path, relative: str, json_path: Path, field_name: str) -> Path:
    """`root / relative` for a path written in an annotation file; absolute paths, `..`, NUL bytes and backslashes
    are errors: they would pull files from outside the dataset (and outside the cache key) into the arrows."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or "\x00" in relative or ".." in parts
            or (len(relative) > 1 and relative[1] == ":")):
        raise DataError(f"{relative!r} is not a relative path inside the dataset (no leading '/', no '..')",
                        file=str(json_path), field=field_name)
    return Path(root) / relative


def check_unique(seen: dict, key, json_path: Path, field_name: str, what: str) -> None:
    """Record `key` (from entry `field_name`); an entry repeating an earlier one is an error naming both, since it
    would become a duplicate row (duplicate training pairs, double-counted evaluation)."""
    if key in seen:
        raise DataError(f"{what} repeats {seen[key]} (duplicate entries would become duplicate rows; remove one)",
                        file=str(json_path), field=field_name)
    seen[key] = field_name


# ---------------------------------------------------------------------------------------------------------------
# Strict JSON access: missing keys and wrong types become DataErrors naming the file and the field path.


def load_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError("annotation file not found", file=str(path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc}", file=str(path)) from None


def require(obj: Any, key: str, path: Path, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """obj[key], or a DataError naming the JSON file and the field (e.g. images[3].sentences)."""
    field_name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise DataError(f"expected an object at {where or 'top level'}, got {type(obj).__name__}", file=str(path))
    if key not in obj:
        raise DataError(f"missing key {key!r}", file=str(path), field=field_name)
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"expected {expected}, got {type(value).__name__}", file=str(path), field=field_name)
    return value
