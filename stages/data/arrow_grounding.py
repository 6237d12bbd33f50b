"""arrow.grounding: MDETR-style Flickr30k annotations -> f30k_grounding_{split}.arrow, one row per caption.

Columns: image (raw JPEG bytes), image_id (file name), caption, phrases (text, start, end, boxes as x1,y1,x2,y2
normalised to [0,1]; one entry per annotated text span, sorted by position in the caption), width, height, split.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from .arrow_common import ConversionReport, ImageRow, check_unique, convert, load_json, member_path, require
from .errors import DataError

PHRASE_TYPE = pa.struct([
    ("text", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
])
GROUNDING_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("image_id", pa.string()),
    ("caption", pa.string()),
    ("phrases", pa.list_(PHRASE_TYPE)),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("split", pa.string()),
])


def _normalised_box(bbox: list, width: int, height: int) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731 - boxes touching the border may overshoot by rounding
    return [clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def grounding_rows(root: Path, json_path: Path, split: str) -> list[ImageRow]:
    data = load_json(json_path)
    images = require(data, "images", json_path, "", list)
    annotations = require(data, "annotations", json_path, "", list)
    by_image: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    seen_annotations: dict = {}
    for i, ann in enumerate(annotations):
        image_id = require(ann, "image_id", json_path, f"annotations[{i}]", (int, str))
        content = json.dumps([image_id, ann.get("bbox"), ann.get("tokens_positive")], sort_keys=True)
        check_unique(seen_annotations, content, json_path, f"annotations[{i}]", f"annotations[{i}]")
        by_image[image_id].append((i, ann))
    seen_ids: dict = {}
    seen_pairs: dict = {}

    rows = []
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        file_name = require(entry, "file_name", json_path, where, str)
        caption = require(entry, "caption", json_path, where, str)
        width = require(entry, "width", json_path, where, int)
        height = require(entry, "height", json_path, where, int)
        image_id = require(entry, "id", json_path, where, (int, str))
        if not (_is_int(width) and _is_int(height)) or width <= 0 or height <= 0:
            raise DataError(f"width and height must be positive integers, got {width!r} x {height!r}",
                            file=str(json_path), field=where)
        image_file = member_path(root / "flickr30k-images", file_name, json_path, f"{where}.file_name")
        check_unique(seen_ids, json.dumps(image_id), json_path, f"{where}.id", f"{where} (id {image_id!r})")
        check_unique(seen_pairs, (file_name, caption), json_path, where, f"{where} (same image and caption)")
        phrases: dict = {}
        for j, ann in by_image.get(image_id, []):
            ann_where = f"annotations[{j}]"
            bbox = require(ann, "bbox", json_path, ann_where, list)
            spans = require(ann, "tokens_positive", json_path, ann_where, list)
            if (len(bbox) != 4 or not all(_is_number(v) for v in bbox) or not spans
                    or not all(isinstance(s, list) and len(s) == 2 and all(_is_int(v) for v in s) for s in spans)):
                raise DataError("expected bbox [x, y, w, h] (finite numbers) and tokens_positive [[start, end], ...] "
                                "(integers)", file=str(json_path), field=ann_where)
            start, end = min(s[0] for s in spans), max(s[1] for s in spans)
            if not 0 <= start < end <= len(caption):
                raise DataError(f"tokens_positive [{start}, {end}] lies outside the caption ({len(caption)} chars)",
                                file=str(json_path), field=ann_where)
            # A phrase is identified by its text span: boxes of one span are grouped (separateGT lists one
            # annotation per box), while an entity mentioned twice yields two phrases (same phrase_ids).
            phrase = phrases.setdefault((start, end), {"start": start, "end": end, "boxes": []})
            phrase["boxes"].append(_normalised_box(bbox, width, height))
        ordered = sorted(phrases.values(), key=lambda p: (p["start"], p["end"]))
        for phrase in ordered:
            phrase["text"] = caption[phrase["start"]:phrase["end"]]
        rows.append(ImageRow(image_file,
                             {"image_id": file_name, "caption": caption, "phrases": ordered, "width": width,
                              "height": height, "split": split},
                             expected_size=(width, height)))
    return rows


def convert_grounding(root: Path, out_dir: Path, params) -> ConversionReport:
    root = Path(root)
    annotation_dir = root / "mdetr_annotations"
    rows = {split: grounding_rows(root, annotation_dir / f"final_flickr_{params.annotations}_{split}.json", split)
            for split in params.splits}
    return convert(root, out_dir, annotation_dir, rows, lambda split: f"f30k_grounding_{split}.arrow",
                   GROUNDING_SCHEMA, params)


def grounding_stage(ctx) -> dict:
    return convert_grounding(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
