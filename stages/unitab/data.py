"""Grounding arrows -> (image, encoder text, decoder sequence) samples for UniTAB.

Rows come from `f30k_grounding_{split}.arrow` (arrow.grounding; pretraining may add arrow.grounding_mixed's
`mixed_grounding_train.arrow`), one per caption: image bytes, image_id, caption, phrases
(list of {text, start, end, boxes: [[x1,y1,x2,y2] in 0..1]}), width, height, split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from vlflow.stages.data.reader import GroundingArrowDataset

from vlflow.errors import StageError

from .model import TokenLayout

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------
# Reading the arrows

def grounding_files(arrows: Path, split: str, field: str = "inputs.arrows") -> list[Path]:
    """The `*grounding_{split}.arrow` files of an `arrow.grounding` (f30k_...) or `arrow.grounding_mixed` (mixed_...)
    output, or that file itself."""
    path = Path(arrows)
    files = sorted(path.glob(f"*grounding_{split}.arrow")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise StageError(f"grounding arrow for split {split!r} not found (expected f30k_grounding_{split}.arrow or "
                         f"mixed_grounding_{split}.arrow)", file=str(path), field=field)
    return files


def open_split(arrows: Path, split: str) -> GroundingArrowDataset:
    """The `f30k_grounding_{split}.arrow` of an `arrow.grounding` output (or that file itself)."""
    return GroundingArrowDataset(grounding_files(arrows, split))


def open_train_sources(arrows: Path, mixed: Path | None) -> GroundingArrowDataset:
    """The train split of `arrows`, followed by that of MDETR's mixed data when given (UniTAB's combine_datasets
    [flickr, mixed] is a ConcatDataset in this order)."""
    files = grounding_files(arrows, "train")
    if mixed is not None:
        files += grounding_files(mixed, "train", field="inputs.mixed")
    return GroundingArrowDataset(files)


# ---------------------------------------------------------------------------------------------------------------
# Sequences

@dataclass
class PhraseSpan:
    phrase_index: int  # index into the row's phrases
    token_start: int  # first caption token of the phrase (caption tokens without specials)
    token_end: int  # one past the last
    boxes: list


def phrase_token_spans(tokenizer, caption: str, phrases: list[dict]) -> tuple[list[int], list[PhraseSpan]]:
    """Tokenise the caption and map each phrase's character span to caption tokens (via offset mapping).
    Phrases without boxes, without tokens, or overlapping an earlier phrase are dropped."""
    encoded = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans: list[PhraseSpan] = []
    taken_until = 0
    for index in sorted(range(len(phrases)), key=lambda i: phrases[i]["start"]):
        phrase = phrases[index]
        if not phrase.get("boxes"):
            continue
        tokens = [t for t, (s, e) in enumerate(offsets) if s < phrase["end"] and e > phrase["start"]]
        if not tokens or tokens[0] < taken_until:
            continue
        spans.append(PhraseSpan(index, tokens[0], tokens[-1] + 1, phrase["boxes"]))
        taken_until = tokens[-1] + 1
    return ids, spans


def merge_boxes(boxes: list) -> list:
    """MDETR's mergedGT for one phrase: the smallest box enclosing all its boxes (a list of one box)."""
    if len(boxes) <= 1:
        return [list(b) for b in boxes]
    return [[min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]]


def build_sequence(ids: list[int], spans: list[PhraseSpan], layout: TokenLayout, bos: int, eos: int,
                   with_boxes: bool = True) -> list[int]:
    """<s> caption tokens with each grounded phrase as `<obj> phrase x1 y1 x2 y2 [...] </obj>` </s>."""
    starts = {s.token_start: s for s in spans}
    ends = {s.token_end - 1: s for s in spans}
    sequence = [bos]
    for position, token in enumerate(ids):
        if with_boxes and position in starts:
            sequence.append(layout.obj_start)
        sequence.append(token)
        if with_boxes and position in ends:
            for box in ends[position].boxes:
                sequence.extend(layout.box_to_tokens(box))
            sequence.append(layout.obj_end)
    sequence.append(eos)
    return sequence


def encoder_sees_text(seqcrop: str, do_caption: bool, rng: random.Random) -> bool:
    """Whether the text encoder gets the caption (grounding) or nothing (captioning); see spec.py."""
    if seqcrop == "grounding":
        return True
    if seqcrop == "caption":
        return False
    if seqcrop == "mixed":
        return rng.random() < 0.5
    return not do_caption  # "none"


# ---------------------------------------------------------------------------------------------------------------
# Images

def resize_shorter_side(image: Image.Image, size: int, max_size: int | None) -> Image.Image:
    """Shorter side to `size`, the longer side capped at `max_size` (DETR's get_size_with_aspect_ratio), bicubic."""
    width, height = image.size
    scale = size / min(width, height)
    if max_size is not None:
        scale = min(scale, max_size / max(width, height))
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def normalised_tensor(image: Image.Image) -> torch.Tensor:
    """ImageNet-normalised (3, H, W) float tensor."""
    array = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_tensor(image: Image.Image, image_size: int, max_image_size: int) -> torch.Tensor:
    """Resize so the shorter side is image_size (longer <= max_image_size), ImageNet-normalise -> (3, H, W).
    Boxes are relative, so they need no change. (MDETR's evaluation transform: RandomResize([800], 1333).)"""
    return normalised_tensor(resize_shorter_side(image, image_size, max_image_size))


# MDETR/UniTAB training transform (datasets/coco.py make_coco_transforms("train", cautious=True)), with sizes given
# for a shorter side of 800; they scale with image_size so a smaller model sees the same relative augmentation.
MDETR_SCALES = tuple(range(480, 801, 32))
MDETR_CROP_RESIZES = (400, 500, 600)
MDETR_CROP_MIN = 384
CROP_PATIENCE = 100


def _crop_box(box, left: int, top: int, width: int, height: int, image_width: int, image_height: int) -> list:
    """A relative box of the full image -> relative to the crop region, clipped to it."""
    x1, y1, x2, y2 = (box[0] * image_width - left, box[1] * image_height - top,
                      box[2] * image_width - left, box[3] * image_height - top)
    return [min(max(x1, 0.0), width) / width, min(max(y1, 0.0), height) / height,
            min(max(x2, 0.0), width) / width, min(max(y2, 0.0), height) / height]


def mdetr_augment(image: Image.Image, boxes: list[list], image_size: int, max_image_size: int,
                  rng: random.Random) -> tuple[torch.Tensor, list[list]]:
    """MDETR's `cautious` training augmentation (no horizontal flip: captions say left/right). With probability 0.5
    a random multi-scale resize (shorter side from 480..800 step 32, longer <= 1333); otherwise resize to 400/500/600,
    crop a random region of at least 384 px per side that cuts no box out entirely (boxes are clipped; after 100
    tries that each cut one out, MDETR keeps the last try without that box: here the image stays uncropped), then
    the multi-scale resize. `boxes`: relative x1,y1,x2,y2 boxes per phrase; returned in the output image's frame."""
    scale = image_size / 800
    scales = [max(1, round(s * scale)) for s in MDETR_SCALES]
    if rng.random() < 0.5:
        return normalised_tensor(resize_shorter_side(image, rng.choice(scales), max_image_size)), boxes
    image = resize_shorter_side(image, max(1, round(rng.choice(MDETR_CROP_RESIZES) * scale)), None)
    width, height = image.size
    smallest = max(1, round(MDETR_CROP_MIN * scale))
    for _ in range(CROP_PATIENCE):
        crop_width = rng.randint(min(smallest, width), min(width, max_image_size))
        crop_height = rng.randint(min(smallest, height), min(height, max_image_size))
        left, top = rng.randint(0, width - crop_width), rng.randint(0, height - crop_height)
        cropped = [[_crop_box(b, left, top, crop_width, crop_height, width, height) for b in phrase]
                   for phrase in boxes]
        if all(b[2] > b[0] and b[3] > b[1] for phrase in cropped for b in phrase):
            image, boxes = image.crop((left, top, left + crop_width, top + crop_height)), cropped
            break
    return normalised_tensor(resize_shorter_side(image, rng.choice(scales), max_image_size)), boxes


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to the batch max size; mask True on padding (DETR's NestedTensor)."""
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[1], : image.shape[2]] = image
        mask[k, : image.shape[1], : image.shape[2]] = False
    return batch, mask


def pad_ids(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for k, r in enumerate(rows):
        out[k, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training dataset

class GroundingSequenceDataset(torch.utils.data.Dataset):
    """One sample per caption: image, encoder text ids (caption or empty), decoder input/target sequence."""

    def __init__(self, source: GroundingArrowDataset, tokenizer, layout: TokenLayout, *, image_size: int,
                 max_image_size: int,
                 max_decoding_step: int, seqcrop: str = "mixed", do_caption: bool = False,
                 box_targets: str = "merged", augment: str = "none", seed: int = 0):
        self.source = source
        self.tokenizer = tokenizer
        self.layout = layout
        self.image_size = image_size
        self.max_image_size = max_image_size
        self.max_decoding_step = max_decoding_step
        self.seqcrop = seqcrop
        self.do_caption = do_caption
        self.box_targets = box_targets
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """key: index, or (index, epoch); the epoch varies the sequence crop between epochs, reproducibly."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        tok = self.tokenizer
        ids, spans = phrase_token_spans(tok, self.source.caption(index), self.source.phrases(index))
        if self.box_targets == "merged":  # UniTAB trains on MDETR's mergedGT: one box per phrase
            spans = [replace(span, boxes=merge_boxes(span.boxes)) for span in spans]
        image = self.source.image(index)
        if self.augment == "mdetr":
            augment_rng = random.Random(f"{self.seed}/{epoch}/{index}/augment")
            pixels, boxes = mdetr_augment(image, [span.boxes for span in spans], self.image_size,
                                          self.max_image_size, augment_rng)
            spans = [replace(span, boxes=b) for span, b in zip(spans, boxes)]
        else:
            pixels = image_tensor(image, self.image_size, self.max_image_size)
        sequence = build_sequence(ids, spans, self.layout, tok.bos_token_id, tok.eos_token_id)
        sequence = sequence[: self.max_decoding_step + 1]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        text = ids[: self.max_decoding_step - 2] if encoder_sees_text(self.seqcrop, self.do_caption, rng) else []
        return {
            "image": pixels,
            "text_ids": [tok.bos_token_id, *text, tok.eos_token_id],
            "prev_tokens": sequence[:-1],
            "targets": sequence[1:],
            "epoch": epoch,
        }


def collate(samples: list[dict], pad_token_id: int) -> dict:
    images, image_mask = pad_images([s["image"] for s in samples])
    text_ids = pad_ids([s["text_ids"] for s in samples], pad_token_id)
    prev = pad_ids([s["prev_tokens"] for s in samples], pad_token_id)
    return {
        "images": images,
        "image_mask": image_mask,
        "text_ids": text_ids,
        "text_mask": (pad_ids([[1] * len(s["text_ids"]) for s in samples], 0)),
        "prev_tokens": prev,
        "token_padding": pad_ids([[0] * len(s["prev_tokens"]) for s in samples], 1).bool(),
        "targets": pad_ids([s["targets"] for s in samples], IGNORE),
        "epoch": samples[0]["epoch"],
    }
