"""Streaming Arrow IPC writer shared by the arrow.* stages, plus strict JSON helpers for the annotation files.

Memory stays bounded: rows are written in record batches of `batch_rows`; a thread pool reads and verifies the
images of the next batch while the current one is written, so at most two batches of image bytes are held.
Each split is written to `<name>.arrow.tmp` and renamed when complete.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import DataError

log = logging.getLogger("vlflow.stages.data")


@dataclass
class ImageRow:
    """One output row: the image file to embed and the values of the other columns."""

    image_path: Path
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
    mode = {True: "decode", False: "headers"}.get(decode, decode)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader
            return ImageCheck(None, "not a regular file")
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return ImageCheck(None, "missing file")
    except OSError as exc:  # permissions, a name too long, ...
        return ImageCheck(None, f"unreadable: {exc.strerror or exc}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide PIL switch some libraries turn on
        return ImageCheck(None, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; cannot tell truncated images apart")
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if mode == "decode":
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
            else:
                is_jpeg = image.format == "JPEG"
                image.verify()
                if mode == "structure" and is_jpeg and data.rfind(JPEG_END, max(0, len(data) - JPEG_TAIL)) < 0:
                    return ImageCheck(None, "corrupt image: the JPEG has no end-of-image marker (truncated)")
    except UnidentifiedImageError:
        return ImageCheck(None, "corrupt image: not in an image format PIL can read")
    except Exception as exc:  # PIL raises many types for corrupt files; all mean "not an image we can use"
        return ImageCheck(None, f"corrupt image: {exc}")
    if expected_size is not None and tuple(size) != tuple(expected_size):
        return ImageCheck(None, f"image is {size[0]}x{size[1]} but the annotations say "
                                f"{expected_size[0]}x{expected_size[1]}")
    return ImageCheck(data)


def write_split(out_path: Path, schema: pa.Schema, rows: list[ImageRow], *, split: str, root: Path,
                report: ConversionReport, on_bad_image: str, batch_rows: int, pool: ThreadPoolExecutor,
                decode: bool | str = True) -> int:
    """Write `rows` (in order, bad images dropped or fatal) as one Arrow IPC file; returns the rows written."""
    out_path = Path(out_path)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    chunks = [rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)]

    def submit(chunk: list[ImageRow]) -> list[Future]:
        return [pool.submit(check_image, row.image_path, row.expected_size, decode) for row in chunk]

    written = skipped = 0
    try:
        with pa.OSFile(str(tmp_path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            pending = submit(chunks[0]) if chunks else []
            for index, chunk in enumerate(chunks):
                checks = [f.result() for f in pending]
                pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []  # prefetch the next batch
                columns: dict[str, list] = {name: [] for name in schema.names}
                for row, check in zip(chunk, checks):
                    if check.data is None:
                        _bad_image(report, row, check.reason, split, root, on_bad_image)
                        skipped += 1
                        continue
                    columns["image"].append(check.data)
                    for name, value in row.values.items():
                        columns[name].append(value)
                if columns["image"]:
                    writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
                    written += len(columns["image"])
                del checks, columns
    except BaseException:
        tmp_path.unlink(missing_ok=True)  # leave no half-written file behind
        raise
    os.replace(tmp_path, out_path)
    report.splits[split] = {"file": out_path.name, "rows": written, "skipped": skipped,
                            "bytes": out_path.stat().st_size}
    log.info("%s: %d rows (%d bad images skipped)", out_path.name, written, skipped)
    return written


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
            schema: pa.Schema, params) -> ConversionReport:
    """Write one arrow per split (name_of(split) -> file name) and report.json; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(source=str(Path(source).relative_to(root)) if Path(source).is_relative_to(root)
                              else str(source))
    with ThreadPoolExecutor(params.read_threads) as pool:
        for split, rows in rows_by_split.items():
            written = write_split(out_dir / name_of(split), schema, rows, split=split, root=Path(root),
                                  report=report, on_bad_image=params.on_bad_image, batch_rows=params.batch_rows,
                                  pool=pool, decode=params.image_check)
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
