"""arrow.sbu and arrow.gcc: SBU Captions and Google Conceptual Captions -> ViLT's sharded caption arrows.

What ViLT's write_sbu.py and write_conceptual_caption.py write, from the layout of its DATA.md: images downloaded into
`images_<split>/<subfolder>/<name>` and a list of `[image path, caption]` pairs (`annot.json` for SBU,
`<split>_annot.json` for GCC). Rows are the files of `images_<split>/*/*` whose name (the last part of an
annotation's path) has a caption: dead URLs are simply absent, as in ViLT. Columns image (raw bytes), caption (a
one-caption list), image_id (the file name), split; `shard_rows` (ViLT: 100,000) rows per file
`sbu_<i>.arrow` / `conceptual_caption_<split>_<i>.arrow`.

ViLT shuffles the listing without a seed and holds a whole shard of images in memory; here the rows follow the
listing in name order and are streamed. ViLT's dataset classes open a fixed list of shards (`sbu_0..8`,
`conceptual_caption_train_0..29`, `conceptual_caption_val_0`) and fail on a missing one, so those are always written,
with 0 rows where the corpus is smaller than ViLT's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from .arrow_coco import CAPTION_SCHEMA
from .arrow_common import ConversionReport, ImageRow, log
from .arrow_stream import iter_json_array, list_nested_images, write_shards
from .errors import DataError

# The shards ViLT's SBUCaptionDataset / ConceptualCaptionDataset open (and need) for each split.
VILT_SHARDS = {"sbu": {"train": 9}, "gcc": {"train": 30, "val": 1}}


def caption_index(json_path: Path) -> dict[str, str]:
    """File name -> caption from a list of [image path, caption] pairs (ViLT keys by the path's last part)."""
    captions: dict[str, str] = {}
    for index, pair in enumerate(iter_json_array(json_path)):
        if (not isinstance(pair, list) or len(pair) < 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], str)):
            raise DataError(f"expected an [image path, caption] pair of strings, got {str(pair)[:80]}",
                            file=str(json_path), field=f"[{index}]")
        name = pair[0].split("/")[-1]
        if name in captions:
            first = next(i for i, p in enumerate(iter_json_array(json_path)) if p[0].split("/")[-1] == name)
            raise DataError(f"image name {name!r} repeats entry [{first}] (ViLT keys captions by the file name: one "
                            "of the two captions would be lost)", file=str(json_path), field=f"[{index}]")
        captions[name] = pair[1]  # the index of first entries is only looked for on error: it would double memory
    return captions


def caption_rows(image_folder: Path, captions: dict[str, str], split: str, counts: dict) -> Iterator[ImageRow]:
    matched = unannotated = 0
    for path in list_nested_images(image_folder):
        caption = captions.get(path.name)
        if caption is None:
            unannotated += 1
            continue
        matched += 1
        yield ImageRow(path, {"caption": [caption], "image_id": path.name, "split": split})
    counts.update(images_without_caption=unannotated, annotated_images_missing=len(captions) - matched)


def convert_captions(root: Path, out_dir: Path, params, corpus: str, annotation_of: dict[str, str],
                     shard_name: str) -> ConversionReport:
    """`annotation_of`: split -> annotation file (relative to root), converted in this order; `shard_name` is
    formatted with split and index."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(source=", ".join(annotation_of.values()))
    with ThreadPoolExecutor(params.read_threads) as pool:
        for split, annotation in annotation_of.items():
            json_path = root / annotation
            if not json_path.is_file():
                hint = "; `splits` names the splits to convert" if corpus == "gcc" else ""
                raise DataError(f"annotation file not found (ViLT's layout: {annotation} beside images_{split}/"
                                f"<subfolder>/<image>{hint})", file=str(json_path))
            captions = caption_index(json_path)
            image_folder = root / f"images_{split}"
            if not image_folder.is_dir():
                raise DataError(f"no images_{split}/ folder beside {annotation} (ViLT's layout: "
                                f"images_{split}/<subfolder>/<image>)", file=str(image_folder))
            counts: dict = {}
            rows = write_shards(out_dir, lambda i, split=split: shard_name.format(split=split, index=i),
                                CAPTION_SCHEMA, caption_rows(image_folder, captions, split, counts), split=split,
                                root=root, report=report, params=params, pool=pool,
                                shard_rows=params.shard_rows, min_shards=VILT_SHARDS[corpus][split], source=json_path)
            report.splits[split].update(counts)
            if not rows and not any(b["split"] == split for b in report.bad_images):
                raise DataError(f"no file in images_{split}/*/ is named in {annotation} ({len(captions)} "
                                "captions); the names must be the last part of the annotations' paths",
                                file=str(json_path))
            vilt_reads = VILT_SHARDS[corpus][split]
            if len(report.splits[split]["files"]) > vilt_reads:
                log.warning("%s %s: %d shards; ViLT's dataset class reads only the first %d", corpus, split,
                            len(report.splits[split]["files"]), vilt_reads)
        for split, shards in VILT_SHARDS[corpus].items():  # ViLT's data module opens these even when not converted
            if split not in annotation_of:
                write_shards(out_dir, lambda i, split=split: shard_name.format(split=split, index=i),
                             CAPTION_SCHEMA, [], split=split, root=root, report=report, params=params, pool=pool,
                             min_shards=shards)
    report.write(out_dir)
    return report


def convert_sbu(root: Path, out_dir: Path, params) -> ConversionReport:
    return convert_captions(root, out_dir, params, "sbu", {"train": "annot.json"}, "sbu_{index}.arrow")


def convert_gcc(root: Path, out_dir: Path, params) -> ConversionReport:
    splits = [s for s in ("val", "train") if s in params.splits]  # ViLT's order
    return convert_captions(root, out_dir, params, "gcc", {s: f"{s}_annot.json" for s in splits},
                            "conceptual_caption_{split}_{index}.arrow")


def sbu_stage(ctx) -> dict:
    return convert_sbu(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()


def gcc_stage(ctx) -> dict:
    return convert_gcc(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
