"""Readers of the arrows written by the arrow.* stages (memory-mapped; used by the training stages).

Datasets pickle as their file paths (the table is re-opened, i.e. re-mapped, in each DataLoader worker).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch
from PIL import Image

from .errors import DataError


def open_arrow(path) -> pa.Table:
    """Memory-map an Arrow IPC file; the image bytes are not read until used."""
    path = Path(path)
    if not path.is_file():
        raise DataError("arrow file not found", file=str(path))
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except pa.ArrowInvalid as exc:
        raise DataError(f"not an Arrow IPC file: {exc}", file=str(path)) from None


def _open_all(paths: list, required: tuple[str, ...]) -> pa.Table:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no arrow files given")
    tables = []
    for path in paths:
        table = open_arrow(path)
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise DataError(f"missing column(s) {missing}; has {table.column_names}", file=str(path))
        tables.append(table.select(list(required)))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() of an RGB image only copies


class _ArrowDataset(torch.utils.data.Dataset):
    columns: tuple[str, ...] = ()

    def __init__(self, arrow_paths: list, image_transform: Callable | None = None):
        self.arrow_paths = [str(p) for p in ([arrow_paths] if isinstance(arrow_paths, (str, Path)) else arrow_paths)]
        self.image_transform = image_transform
        self.table = _open_all(self.arrow_paths, self.columns)

    def __len__(self) -> int:
        return self.table.num_rows

    def _value(self, column: str, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        return self.table.column(column)[i].as_py()

    def image(self, i: int) -> Image.Image:
        return _decode(self._value("image", i))

    def image_id(self, i: int) -> str:
        return self._value("image_id", i)

    def _transformed_image(self, i: int):
        if getattr(self.image_transform, "takes_bytes", False):  # decodes itself (e.g. transforms.PixelBertPixels)
            return self.image_transform(self._value("image", i))
        image = self.image(i)
        return self.image_transform(image) if self.image_transform is not None else image

    def __getstate__(self):
        return {"arrow_paths": self.arrow_paths, "image_transform": self.image_transform}

    def __setstate__(self, state):
        self.__init__(state["arrow_paths"], state["image_transform"])


class CaptionArrowDataset(_ArrowDataset):
    """ViLT caption arrows (one row per image); several files are concatenated in order (e.g. train + restval)."""

    columns = ("image", "caption", "image_id")

    def captions(self, i: int) -> list[str]:
        return self._value("caption", i)

    def __getitem__(self, i: int) -> dict:
        return {"image": self._transformed_image(i), "captions": self.captions(i), "image_id": self.image_id(i),
                "index": i}


class GroundingArrowDataset(_ArrowDataset):
    """Grounding arrows (one row per caption); boxes are x1,y1,x2,y2 in [0,1]."""

    columns = ("image", "image_id", "caption", "phrases", "width", "height")

    def caption(self, i: int) -> str:
        return self._value("caption", i)

    def phrases(self, i: int) -> list[dict]:
        return self._value("phrases", i)

    def __getitem__(self, i: int) -> dict:
        return {"image": self._transformed_image(i), "caption": self.caption(i), "phrases": self.phrases(i),
                "image_id": self.image_id(i), "width": self._value("width", i), "height": self._value("height", i),
                "index": i}


class VqaArrowDataset(_ArrowDataset):
    """ViLT VQAv2 arrows (one row per image with its questions); several files are concatenated in order."""

    columns = ("image", "questions", "answer_labels", "answer_scores", "image_id", "question_id")

    def questions(self, i: int) -> list[str]:
        return self._value("questions", i)

    def targets(self, i: int) -> tuple[list[list[int]], list[list[float]]]:
        """(labels, scores) per question; empty lists on test splits (no answers)."""
        return self._value("answer_labels", i), self._value("answer_scores", i)

    def question_ids(self, i: int) -> list[int]:
        return self._value("question_id", i)

    def __getitem__(self, i: int) -> dict:
        labels, scores = self.targets(i)
        return {"image": self._transformed_image(i), "questions": self.questions(i), "answer_labels": labels,
                "answer_scores": scores, "question_id": self.question_ids(i), "image_id": self.image_id(i),
                "index": i}
