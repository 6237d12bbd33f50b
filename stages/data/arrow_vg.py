"""arrow.vg: Visual Genome region descriptions -> ViLT's vg.arrow (the captions of ViLT's pretraining mix).

What ViLT's write_vg.py writes, read from the layout its DATA.md gives (`images/VG_100K/<id>.jpg`,
`images/VG_100K_2/<id>.jpg`, `annotations/region_descriptions.json`): one row per image that is on disk and has region
descriptions, columns image (raw JPEG bytes), caption (every region's `phrase`), width, height, x, y (each region's
box, in the order of the captions) and image_id (the image id as a string). ViLT groups the regions by their
`image_id` and takes the rows in an unseeded shuffle of the folder listing, holding every image in memory; here the
rows follow the annotation file and are streamed (two passes over the file: the first finds where each image's last
region is, so regions of one image spread over several entries are still merged into one row, as ViLT's
defaultdict does).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .arrow_common import ConversionReport, ImageRow, require
from .arrow_stream import iter_json_array, list_images, write_shards
from .errors import DataError

VG_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("caption", pa.list_(pa.string())),
    ("width", pa.list_(pa.int64())),
    ("height", pa.list_(pa.int64())),
    ("x", pa.list_(pa.int64())),
    ("y", pa.list_(pa.int64())),
    ("image_id", pa.string()),
])
VG_IMAGE_FOLDERS = ("images/VG_100K", "images/VG_100K_2")
VG_ANNOTATIONS = "annotations/region_descriptions.json"
BOX_FIELDS = ("width", "height", "x", "y")
IMAGE_NAME = re.compile(r"([0-9]+)\.jpg")


def vg_images(root: Path) -> dict[int, Path]:
    """Image id -> file, from ViLT's globs `images/VG_100K/*.jpg` + `images/VG_100K_2/*.jpg` (name = `<id>.jpg`)."""
    images: dict[int, Path] = {}
    for folder in VG_IMAGE_FOLDERS:
        for path in list_images(root / folder, lambda name: name.endswith(".jpg")):
            match = IMAGE_NAME.fullmatch(path.name)
            if not match:
                raise DataError("a Visual Genome image must be named <image id>.jpg (ViLT reads the id from the "
                                "name)", file=str(path))
            image_id = int(match.group(1))
            if image_id in images:
                raise DataError(f"image id {image_id} is also {images[image_id].relative_to(root)} (it would become "
                                "two rows; remove one)", file=str(path))
            images[image_id] = path
    return images


def _integer(region: dict, key: str, json_path: Path, where: str) -> int:
    value = require(region, key, json_path, where, int)
    if isinstance(value, bool):
        raise DataError("expected int, got bool", file=str(json_path), field=f"{where}.{key}")
    return value


def _checked_region(region, json_path: Path, where: str) -> tuple[int, str, tuple[int, ...]]:
    phrase = require(region, "phrase", json_path, where, str)
    return (_integer(region, "image_id", json_path, where), phrase,
            tuple(_integer(region, key, json_path, where) for key in BOX_FIELDS))


def entry_regions(entry, index: int, json_path: Path) -> Iterator[tuple[int, str, tuple[int, ...]]]:
    """(image id, phrase, (width, height, x, y)) of each region of the file's `index`-th entry, type-checked (a
    wrong one is an error naming the file and the field)."""
    regions = require(entry, "regions", json_path, f"[{index}]", list)
    for j, region in enumerate(regions):
        try:  # the common case in one step; any surprise goes through the checks that name the field
            image_id, phrase = region["image_id"], region["phrase"]
            box = (region["width"], region["height"], region["x"], region["y"])
            valid = type(image_id) is int and type(phrase) is str and all(type(v) is int for v in box)
        except (KeyError, TypeError):
            valid = False
        yield (image_id, phrase, box) if valid else _checked_region(region, json_path, f"[{index}].regions[{j}]")


def vg_rows(json_path: Path, images: dict[int, Path], counts: dict) -> Iterator[ImageRow]:
    """One row per image id with regions and a file, merging every region of the id in file order; rows come out
    when the id's last region has been read."""
    last_entry: dict[int, int] = {}
    for index, entry in enumerate(iter_json_array(json_path)):  # pass 1: checks every entry, finds each id's end
        for image_id, _phrase, _box in entry_regions(entry, index, json_path):
            last_entry[image_id] = index
    counts["annotated_images_missing"] = sum(1 for image_id in last_entry if image_id not in images)
    counts["images_without_regions"] = sum(1 for image_id in images if image_id not in last_entry)
    pending: dict[int, dict] = {}  # ids whose regions are still being read, in order of first appearance
    for index, entry in enumerate(iter_json_array(json_path)):
        for image_id, phrase, box in entry_regions(entry, index, json_path):
            values = pending.setdefault(image_id, {"caption": [], **{key: [] for key in BOX_FIELDS}})
            values["caption"].append(phrase)
            for key, value in zip(BOX_FIELDS, box):
                values[key].append(value)
        for image_id in [i for i in pending if last_entry[i] == index]:
            values = pending.pop(image_id)
            if image_id in images:
                yield ImageRow(images[image_id], {**values, "image_id": str(image_id)})


def convert_vg(root: Path, out_dir: Path, params) -> ConversionReport:
    root, out_dir = Path(root), Path(out_dir)
    json_path = root / VG_ANNOTATIONS
    if not json_path.is_file():
        raise DataError("annotation file not found (expected ViLT's Visual Genome layout: images/VG_100K/, "
                        "images/VG_100K_2/, annotations/region_descriptions.json)", file=str(json_path))
    images = vg_images(root)
    if not images:
        raise DataError(f"no <image id>.jpg files in {' or '.join(VG_IMAGE_FOLDERS)}", file=str(root))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(source=VG_ANNOTATIONS)
    counts: dict = {}
    with ThreadPoolExecutor(params.read_threads) as pool:
        write_shards(out_dir, lambda i: "vg.arrow", VG_SCHEMA, vg_rows(json_path, images, counts), split="train",
                     root=root, report=report, params=params, pool=pool, source=json_path)
    report.splits["train"].update(counts)
    if not report.splits["train"]["rows"] and not report.bad_images:
        raise DataError(f"none of the {len(images)} images has region descriptions (their ids are not the regions' "
                        "image_id values)", file=str(json_path))
    report.write(out_dir)
    return report


def vg_stage(ctx) -> dict:
    return convert_vg(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
