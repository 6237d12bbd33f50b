"""arrow.grounding: MDETR-style Flickr30k annotations -> f30k_grounding_{split}.arrow, one row per caption.
arrow.grounding_mixed: MDETR's "mixed" annotations (final_mixed_train.json / final_mixed_train_no_coco.json: COCO
RefCOCO/+/g and GQA/VG captions, each image entry naming its image source in `data_source`) ->
mixed_grounding_train.arrow, the same columns (UniTAB pretrains on flickr + mixed).

Columns: image (raw JPEG bytes), image_id (file name), caption, phrases (text, start, end, boxes as x1,y1,x2,y2
normalised to [0,1]; one entry per annotated text span, sorted by position in the caption), width, height, split.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

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


def grounding_rows(root: Path, json_path: Path, split: str,
                   image_dir: Callable[[dict, str], Path] | None = None, unique: bool = True) -> list[ImageRow]:
    """image_dir(entry, where): the folder of an image entry's file (default: root/flickr30k-images). unique: refuse
    repeated annotations and repeated (image, caption) pairs (Flickr30k has none; MDETR's mixed data is taken as
    it is, exact duplicate boxes of a phrase dropped)."""
    image_dir = image_dir or (lambda entry, where: root / "flickr30k-images")
    data = load_json(json_path)
    images = require(data, "images", json_path, "", list)
    annotations = require(data, "annotations", json_path, "", list)
    by_image: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    seen_annotations: dict = {}
    for i, ann in enumerate(annotations):
        image_id = require(ann, "image_id", json_path, f"annotations[{i}]", (int, str))
        if unique:
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
        image_file = member_path(image_dir(entry, where), file_name, json_path, f"{where}.file_name")
        check_unique(seen_ids, json.dumps(image_id), json_path, f"{where}.id", f"{where} (id {image_id!r})")
        if unique:
            check_unique(seen_pairs, (str(image_file), caption), json_path, where,
                         f"{where} (same image and caption)")
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
            box = _normalised_box(bbox, width, height)
            if unique or box not in phrase["boxes"]:
                phrase["boxes"].append(box)
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


def mixed_image_dir(root: Path, json_path: Path, image_dirs: dict[str, str], default_source: str):
    """MDETR/UniTAB's CustomCocoDetection: an entry's `data_source` (absent: coco) picks its image folder."""
    def image_dir(entry: dict, where: str) -> Path:
        source = entry.get("data_source", default_source)
        if source not in image_dirs:
            raise DataError(f"data_source {source!r} has no image folder (image_dirs knows {sorted(image_dirs)})",
                            file=str(json_path), field=f"{where}.data_source")
        return root / image_dirs[source]
    return image_dir


def convert_grounding_mixed(root: Path, out_dir: Path, params) -> ConversionReport:
    root = Path(root)
    json_path = member_path(root, params.annotation_file, root / params.annotation_file, "with.annotation_file")
    image_dir = mixed_image_dir(root, json_path, params.image_dirs, params.default_source)
    rows = {"train": grounding_rows(root, json_path, "train", image_dir, unique=False)}
    return convert(root, out_dir, json_path.parent, rows, lambda split: f"mixed_grounding_{split}.arrow",
                   GROUNDING_SCHEMA, params)


def grounding_mixed_stage(ctx) -> dict:
    return convert_grounding_mixed(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
