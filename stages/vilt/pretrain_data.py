"""The pretraining corpus of `vilt.pretrain`: COCO train + restval (input `arrows`), and when given, the other
datasets of ViLT's mix (`task_mlm_itm`: datasets coco, vg, sbu, gcc, concatenated): inputs `vg` (arrow.vg), `sbu`
(arrow.sbu) and `gcc` (arrow.gcc), each one arrow directory.

Their rows are concatenated in that order into one caption dataset, so every image has one index (ITM's false
images and in-batch negatives tell images apart by it). As ViLT's BaseDataset (`remove_duplicate=True`), an image's
repeated captions count once in the added datasets (Visual Genome repeats region phrases); COCO's pairs are left as
they are without the mix.
"""
from __future__ import annotations

import re
from pathlib import Path

from vlflow.stages.data.reader import CaptionArrowDataset, open_arrow
from vlflow.stages.data.transforms import PixelDecoding, pixelbert_pixels
from vlflow.stages.vilt.data import arrow_files, image_dataset

from vlflow.errors import StageError

# input name -> the arrow files ViLT's training split reads: a fixed name, or a family of numbered shards
PRETRAIN_SOURCES = {"vg": re.compile(r"vg\.arrow"), "sbu": re.compile(r"sbu_([0-9]+)\.arrow"),
                    "gcc": re.compile(r"conceptual_caption_train_([0-9]+)\.arrow")}


def source_files(directory: Path, name: str) -> list[Path]:
    """The training arrows of one added dataset (shards in index order); a directory without any is an error."""
    pattern = PRETRAIN_SOURCES[name]
    found = [p for p in Path(directory).iterdir() if pattern.fullmatch(p.name)] if Path(directory).is_dir() else []
    if not found:
        raise StageError(f"no {pattern.pattern.replace(chr(92), '')} in {directory} (is it an arrow.{name} output?)",
                         field=f"inputs.{name}")
    return sorted(found, key=lambda p: int(pattern.fullmatch(p.name).group(1)) if pattern.groups else 0)


class MixedCaptionDataset(CaptionArrowDataset):
    """Caption arrows concatenated; rows from `unique_from_row` on give each distinct caption once (first
    occurrence order; ViLT keeps `list(set(texts))`, the same captions in an arbitrary order)."""

    def __init__(self, arrow_paths: list, image_transform=None, unique_from_row: int = 0):
        super().__init__(arrow_paths, image_transform)
        self.unique_from_row = unique_from_row

    def captions(self, i: int) -> list[str]:
        captions = super().captions(i)
        if (i if i >= 0 else i + len(self)) >= self.unique_from_row:
            captions = list(dict.fromkeys(captions))
        return captions

    def __getstate__(self):
        return {**super().__getstate__(), "unique_from_row": self.unique_from_row}

    def __setstate__(self, state):
        self.__init__(state["arrow_paths"], state["image_transform"], state["unique_from_row"])


def pretraining_images(inputs: dict[str, Path], image_size: int, max_image_size: int,
                       decoding: PixelDecoding = PixelDecoding.exact) -> CaptionArrowDataset:
    """COCO train + restval alone (exactly the fine-tuning stages' training images) unless vg/sbu/gcc are given."""
    added = [name for name in PRETRAIN_SOURCES if name in inputs]
    if not added:
        return image_dataset(inputs["arrows"], "train", image_size, max_image_size, decoding)
    coco = arrow_files(inputs["arrows"], "train")
    coco_rows = sum(open_arrow(path).num_rows for path in coco)
    files = coco + [path for name in added for path in source_files(inputs[name], name)]
    return MixedCaptionDataset(files, pixelbert_pixels(image_size, max_image_size, decoding),
                               unique_from_row=coco_rows)
