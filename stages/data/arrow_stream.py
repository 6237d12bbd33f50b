"""Streaming pieces for the large pretraining corpora (arrow.vg, arrow.sbu, arrow.gcc): annotation files read
element by element (ijson), image folders listed one folder at a time, and rows written to numbered shards as they
arrive, so memory holds a few record batches of images whatever the corpus size.

The image checks, bad-image reports and atomic renames are those of `arrow_common.write_split`; what differs is that
rows come from an iterator (not a list held whole) and that one stream can fill several shard files.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import ijson
import numpy as np
import pyarrow as pa

from .arrow_common import ConversionReport, ImageCheck, ImageRow, _bad_image, check_image, log
from .errors import DataError


def iter_json_array(path: Path) -> Iterator[Any]:
    """The elements of a JSON file whose top level is an array, parsed one at a time (numbers: int or float)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("annotation file not found", file=str(path))
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip()
        if start and not start.startswith(b"["):
            raise DataError("expected a JSON list at the top level", file=str(path))
        handle.seek(0)
        try:
            yield from ijson.items(handle, "item", use_float=True)
        except ijson.JSONError as exc:
            detail = exc.args[0] if exc.args else exc
            detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
            raise DataError(f"invalid JSON: {detail.strip().splitlines()[0]}", file=str(path)) from None


def checked_rows(rows: Iterable[ImageRow], pool: ThreadPoolExecutor, batch_rows: int,
                 decode: bool | str) -> Iterator[tuple[ImageRow, ImageCheck]]:
    """(row, check) in order; the images of the next `batch_rows` rows are read and checked while these are used."""
    rows = iter(rows)

    def submit(chunk: list[ImageRow]) -> list:
        return [pool.submit(check_image, row.image_path, row.expected_size, decode) for row in chunk]

    chunk = list(islice(rows, batch_rows))
    pending = submit(chunk)
    while chunk:
        checks = [future.result() for future in pending]
        next_chunk = list(islice(rows, batch_rows))
        pending = submit(next_chunk)  # prefetch
        yield from zip(chunk, checks)
        del checks
        chunk = next_chunk


def binary_array(values: list[bytes]) -> pa.Array:
    """An Arrow binary array of `values` built from one joined buffer: one copy of the bytes, into memory allocated
    once (pa.array copies each value into a growing buffer: ~3x slower for a batch of images)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    if offsets[-1] >= 2**31:  # binary's int32 offsets
        return pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets.astype(np.int32)),
                                                            pa.py_buffer(b"".join(values))])


class ShardWriter:
    """Writes rows to `name_of(0)`, `name_of(1)`, ... with `shard_rows` rows each (None: one file), in record
    batches of `batch_rows`; `close()` also writes empty (typed) shards up to `min_shards`. Each file is written as
    `<name>.tmp` and renamed when complete."""

    def __init__(self, out_dir: Path, name_of: Callable[[int], str], schema: pa.Schema, *, batch_rows: int,
                 shard_rows: int | None = None, min_shards: int = 1):
        self.out_dir, self.name_of, self.schema = Path(out_dir), name_of, schema
        self.batch_rows, self.shard_rows, self.min_shards = batch_rows, shard_rows, min_shards
        self.files: list[dict] = []  # {"file", "rows"} of every finished shard
        self.rows = 0
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._sink = self._writer = None
        self._shard_rows_written = 0

    def _open(self) -> None:
        path = self.out_dir / self.name_of(len(self.files))
        self._tmp = path.with_name(path.name + ".tmp")
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._shard_rows_written = 0

    def _finish_shard(self) -> None:
        if self._writer is None:
            self._open()
        self._flush()
        self._writer.close()
        self._sink.close()
        path = self._tmp.with_name(self._tmp.name[:-len(".tmp")])
        os.replace(self._tmp, path)
        self.files.append({"file": path.name, "rows": self._shard_rows_written, "bytes": path.stat().st_size})
        self._sink = self._writer = None

    def _flush(self) -> None:
        if self._columns["image"]:
            images = self._columns["image"]
            columns = {**self._columns, "image": binary_array(images)}
            self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=self.schema))
            self._shard_rows_written += len(self._columns["image"])
            self._columns = {name: [] for name in self.schema.names}

    def add(self, image: bytes, values: dict) -> None:
        if self._writer is None:
            self._open()
        self._columns["image"].append(image)
        for name, value in values.items():
            self._columns[name].append(value)
        self.rows += 1
        if self.shard_rows is not None and self._shard_rows_written + len(self._columns["image"]) == self.shard_rows:
            self._finish_shard()
        elif len(self._columns["image"]) >= self.batch_rows:
            self._flush()

    def close(self) -> list[dict]:
        """Finish the open shard (ViLT's writers also write one, empty, after an exact multiple of shard_rows) and
        the empty shards up to min_shards."""
        self._finish_shard()  # the partial last shard, or an empty one: rows // shard_rows + 1 files in all
        while len(self.files) < self.min_shards:
            self._finish_shard()
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
                self._sink.close()
            finally:
                self._tmp.unlink(missing_ok=True)


def write_shards(out_dir: Path, name_of: Callable[[int], str], schema: pa.Schema, rows: Iterable[ImageRow], *,
                 split: str, root: Path, report: ConversionReport, params, pool: ThreadPoolExecutor,
                 shard_rows: int | None = None, min_shards: int = 1, source: Path | None = None) -> int:
    """Stream `rows` (bad images dropped or fatal, as `params.on_bad_image` says) into shard files; records the split
    in `report` and returns the rows written. A split that had rows but whose every image is bad is an error."""
    writer = ShardWriter(out_dir, name_of, schema, batch_rows=params.batch_rows, shard_rows=shard_rows,
                         min_shards=min_shards)
    candidates = skipped = 0
    try:
        for row, check in checked_rows(rows, pool, params.batch_rows, params.image_check):
            candidates += 1
            if check.data is None:
                _bad_image(report, row, check.reason, split, Path(root), params.on_bad_image)
                skipped += 1
                continue
            writer.add(check.data, row.values)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    if candidates and not writer.rows:  # empty arrows would "succeed" and fail much later, in training
        first = next(b for b in report.bad_images if b["split"] == split)
        raise DataError(f"every image of split {split!r} is bad ({candidates} of {candidates}; first: "
                        f"{first['path']}: {first['reason']}); nothing to convert", file=str(source or root))
    report.splits[split] = {"files": [f["file"] for f in files], "rows": writer.rows, "skipped": skipped,
                            "shard_rows": [f["rows"] for f in files], "bytes": sum(f["bytes"] for f in files)}
    log.info("%s: %d rows in %d file(s) (%d bad images skipped)", split, writer.rows, len(files), skipped)
    return writer.rows


def list_images(folder: Path, accept: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Files directly in `folder` whose name `accept`s, in name order (hidden files skipped, as glob's `*` does)."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".") and accept(e.name)
                       and e.is_file())
    for name in names:
        yield folder / name


def list_nested_images(folder: Path) -> Iterator[Path]:
    """Files of `folder/*/*` (ViLT's glob for SBU and GCC), one subfolder at a time, subfolders and files in name
    order."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        subfolders = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    for sub in subfolders:
        yield from list_images(folder / sub)
