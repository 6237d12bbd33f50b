"""arrow.f30k_karpathy: Flickr30k + Karpathy splits -> ViLT's f30k_caption_karpathy_{train,val,test}.arrow files."""
from __future__ import annotations

from pathlib import Path

from .arrow_coco import CAPTION_SCHEMA, karpathy_rows
from .arrow_common import ConversionReport, convert

F30K_SPLITS = ("train", "val", "test")


def convert_f30k_karpathy(root: Path, out_dir: Path, params) -> ConversionReport:
    root = Path(root)
    json_path = root / "karpathy" / "dataset_flickr30k.json"
    rows = karpathy_rows(root, json_path, F30K_SPLITS,
                         lambda entry, filename, where: root / "flickr30k-images" / filename)
    return convert(root, out_dir, json_path, rows, lambda split: f"f30k_caption_karpathy_{split}.arrow",
                   CAPTION_SCHEMA, params)


def f30k_karpathy_stage(ctx) -> dict:
    return convert_f30k_karpathy(ctx.inputs["root"], ctx.output_dir, ctx.params).metrics()
