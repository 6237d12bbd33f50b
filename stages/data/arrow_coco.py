"""arrow.coco_karpathy: COCO 2014 + Karpathy splits -> ViLT's coco_caption_karpathy_{split}.arrow files.

Rows and order follow ViLT's write_coco_karpathy.py (images in json order, grouped by split; images without sentences
are left out), columns image (raw JPEG bytes), caption (every sentences[].raw), image_id (the file name), split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from .arrow_common import ConversionReport, ImageRow, check_unique, convert, load_json, member_path, require
from .errors import DataError

CAPTION_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("caption", pa.list_(pa.string())),
    ("image_id", pa.string()),
    ("split", pa.string()),
])
COCO_SPLITS = ("train", "val", "restval", "test")


def karpathy_rows(root: Path, json_path: Path, splits: tuple[str, ...],
                  image_path_of: Callable[[dict, str, str], Path]) -> dict[str, list[ImageRow]]:
    """Parse a Karpathy json into per-split rows; image_path_of(entry, filename, where) locates each image.

    An entry naming the same image file as an earlier one is an error (it would be a duplicate row)."""
    data = load_json(json_path)
    images = require(data, "images", json_path, "", list)
    rows: dict[str, list[ImageRow]] = {split: [] for split in splits}
    seen: dict = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        filename = require(entry, "filename", json_path, where, str)
        member_path(root, filename, json_path, f"{where}.filename")
        split = require(entry, "split", json_path, where, str)
        sentences = require(entry, "sentences", json_path, where, list)
        captions = [require(s, "raw", json_path, f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
        if split not in rows:
            raise DataError(f"unknown split {split!r} (expected one of {', '.join(splits)})", file=str(json_path),
                            field=f"{where}.split")
        path = image_path_of(entry, filename, where)
        check_unique(seen, str(path), json_path, where, f"{where} ({filename})")
        if not captions:  # ViLT's writer only keeps images that have captions
            continue
        rows[split].append(ImageRow(path,
                                    {"caption": captions, "image_id": filename, "split": split}))
    return rows


def convert_coco_karpathy(root: Path, out_dir: Path, params) -> ConversionReport:
    root = Path(root)
    json_path = root / "karpathy" / "dataset_coco.json"

    def image_path(entry: dict, filename: str, where: str) -> Path:
        # Karpathy's json names the folder in `filepath`; fall back to the COCO file-name prefix.
        folder = entry.get("filepath") or ("train2014" if filename.startswith("COCO_train2014_") else "val2014")
        if not isinstance(folder, str):
            raise DataError(f"expected str, got {type(folder).__name__}", file=str(json_path),
                            field=f"{where}.filepath")
        return member_path(root, folder, json_path, f"{where}.filepath") / filename

    rows = karpathy_rows(root, json_path, COCO_SPLITS, image_path)
    return convert(root, out_dir, json_path, rows, lambda split: f"coco_caption_karpathy_{split}.arrow",
                   CAPTION_SCHEMA, params)


def coco_karpathy_stage(ctx) -> dict:
    return convert_coco_karpathy(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
