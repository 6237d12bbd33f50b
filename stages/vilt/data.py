"""ViLT batches: image-caption pairs (and VQAv2 image-question pairs with soft answer targets) from ViLT arrows,
ViLT's training transforms (`pixelbert`, `pixelbert_randaug`), collation (image padding + pixel mask, tokenisation),
MLM masking and ITM negatives (a false image per item drawn from the dataset, as ViLT, or another image of the batch).
Randomness comes from explicit generators: per step (`torch.Generator`: masks, which positions are negatives) and per
sample (the seed its ResumableSampler drew: RandAugment, the false image), so a resumed run reproduces them. Also how
the evaluation stages read a training stage's output (`load_trained_run`)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase
from vlflow.stages.common.training import load_tokenizer  # noqa: F401  (one loader for every stage)
from vlflow.stages.data.reader import CaptionArrowDataset, VqaArrowDataset
from vlflow.stages.data.transforms import (
    PixelDecoding,
    ViltRandAugment,
    normalize_pixels,
    pixelbert_pixels,
    vilt_max_size,
)

from vlflow.errors import StageError

SPLIT_FILES = {  # ViLT trains on train + restval
    "train": ("train", "restval"),
    "val": ("val",),
    "test": ("test",),
}


def arrow_files(arrows: Path, split: str, prefix: str = "coco_caption_karpathy") -> list[Path]:
    if arrows.is_file():
        return [arrows]
    files = [arrows / f"{prefix}_{name}.arrow" for name in SPLIT_FILES.get(split, (split,))]
    files = [f for f in files if f.is_file()]
    if not files:
        raise StageError(f"no {prefix}_{split}*.arrow in {arrows}", field="inputs.arrows")
    return files


@dataclass
class TrainedRun:
    """A ViLT training stage's output as the evaluation stages read it: the model directory (transformers layout),
    the tokenizer saved beside it and the training params (for the input geometry)."""

    model_dir: Path
    params: dict
    tokenizer: PreTrainedTokenizerBase

    def geometry(self, p) -> tuple[int, int, int]:
        """(image_size, max_image_size, max_text_len): the evaluation params' values, else the training run's."""
        image_size = p.image_size or self.params.get("image_size", 384)
        return (image_size, p.max_image_size or self.params.get("max_image_size") or vilt_max_size(image_size),
                p.max_text_len or self.params.get("max_text_len", 40))


def load_trained_run(run_dir: Path, inputs: dict[str, Path]) -> TrainedRun:
    """`run_dir`: a training stage's output (`model/`, `tokenizer/`, `params.json`) or a bare transformers model dir;
    without a saved tokenizer, the `tokenizer` input or the training params' tokenizer name is used."""
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    if not (model_dir / "config.json").is_file():
        raise StageError(f"no ViLT model in {run_dir} (expected model/config.json)", field="inputs.model")
    params_file = run_dir / "params.json"
    params = json.loads(params_file.read_text()) if params_file.is_file() else {}
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = load_tokenizer({"tokenizer": tokenizer_dir} if tokenizer_dir.is_dir() else inputs,
                               params.get("tokenizer", "bert-base-uncased"))
    return TrainedRun(model_dir, params, tokenizer)


def image_dataset(arrows: Path, split: str, image_size: int, max_image_size: int,
                  decoding: PixelDecoding = PixelDecoding.exact) -> CaptionArrowDataset:
    """Items' images are ViLT's resize as uint8 [3, H, W] (`PairCollator`/`pad_images` normalise them); `decoding`:
    ViLT's pixels exactly, or faster within a stated tolerance (`PixelDecoding`)."""
    return CaptionArrowDataset(arrow_files(arrows, split), pixelbert_pixels(image_size, max_image_size, decoding))


#: ViLT's transform keys: `pixelbert` (resize only: pretraining, evaluation), `pixelbert_randaug` (RandAugment(2, 9)
#: before the resize: its fine-tuning configs)
TRAIN_TRANSFORMS = ("pixelbert", "pixelbert_randaug")


def train_augment(transform: str) -> ViltRandAugment | None:
    if transform not in TRAIN_TRANSFORMS:
        raise StageError(f"unknown image transform {transform!r}; one of {', '.join(TRAIN_TRANSFORMS)}",
                         field="with.train_transform")
    return ViltRandAugment(2, 9) if transform == "pixelbert_randaug" else None


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset key: an index, or (index, item_seed) from `ResumableSampler(item_seeds=True)`."""
    return key if isinstance(key, tuple) else (key, None)


def item_rng(item_seed: int | None, needed_for: str) -> random.Random | None:
    """The sample's own random stream (RandAugment, false image), from the seed its sampler drew for it."""
    if item_seed is None:
        raise ValueError(f"{needed_for} needs a seed per sample: index the dataset with (index, item_seed) pairs "
                         f"(ResumableSampler(item_seeds=True))")
    return random.Random(item_seed)


def train_pixels(images, image_index: int, augment: ViltRandAugment | None, rng: random.Random | None):
    """An image as training sees it: the dataset's resize, after ViLT's RandAugment on the decoded image when
    `augment` is given."""
    if augment is None:
        return images[image_index]["image"]
    return images.image_transform.pixels(augment(images.image(image_index), rng))


class CaptionPairs(Dataset):
    """One item per (image, caption) pair, like ViLT's index mapper: an epoch sees every caption once.

    `augment`: ViLT's RandAugment before the resize. `false_images`: each item also carries a false image for ITM,
    ViLT's `get_false_image` (`draw_false_image=1`): the image of a pair drawn uniformly from the whole dataset, so
    images weigh by their caption count, as in ViLT; ours redraws when it is the item's own image (ViLT keeps it,
    a wrong negative with probability ~1/images). Both draw from the item's seed (keys are (index, item_seed))."""

    def __init__(self, images: CaptionArrowDataset, augment: ViltRandAugment | None = None,
                 false_images: bool = False):
        self.images = images
        self.pairs = [(i, j) for i in range(len(images)) for j in range(len(images.captions(i)))]
        self.augment = augment
        self.false_images = false_images
        if false_images and len({i for i, _ in self.pairs}) < 2:
            raise StageError("ITM false images need at least 2 captioned images in the training split",
                             field="inputs.arrows")

    def __len__(self) -> int:
        return len(self.pairs)

    def false_image_index(self, image_index: int, rng: random.Random) -> int:
        """ViLT's false-image draw (a random pair's image), redrawn until it is another image."""
        while True:
            other = self.pairs[rng.randrange(len(self.pairs))][0]
            if other != image_index:
                return other

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, item_seed = split_key(key)
        image_index, caption_index = self.pairs[index]
        rng = None
        if self.augment is not None or self.false_images:
            rng = item_rng(item_seed, "RandAugment" if self.augment is not None else "an ITM false image")
        if self.augment is None:
            row = self.images[image_index]
            pixels, caption = row["image"], row["captions"][caption_index]
        else:
            pixels = train_pixels(self.images, image_index, self.augment, rng)
            caption = self.images.captions(image_index)[caption_index]
        item = {"pixel_values": pixels, "text": caption, "image_index": image_index}
        if self.false_images:
            false_index = self.false_image_index(image_index, rng)
            item.update(false_pixel_values=train_pixels(self.images, false_index, self.augment, rng),
                        false_image_index=false_index)
        return item


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated in shared memory (as torch's default_collate does),
    so sending the batch to the main process does not copy it there first."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def collate_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """CHW images (uint8 or float) -> (pixel_values [B, C, H, W] of their dtype, pixel_mask bool [B, H, W]), padded
    to the batch's largest height and width. One allocation each; every image is written in place and only the
    padding strips are zeroed (ViLT's collate zero-fills the whole float batch, then overwrites it).

    pixel_values is stored channels-last (a [B, H, W, C] buffer seen as [B, C, H, W]): the decoded images are
    height x width x channel arrays (PixelBertTransform.pixels' CHW is a view of them), so each image is copied row
    by row instead of element by element. `normalize_pixels` returns ordinary contiguous floats."""
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    channels = images[0].shape[0]
    buffer = _batch_tensor((len(images), height, width, channels), images[0].dtype)
    pixel_mask = _batch_tensor((len(images), height, width), torch.bool)
    for i, img in enumerate(images):
        h, w = img.shape[1], img.shape[2]
        buffer[i, :h, :w] = img.permute(1, 2, 0)
        buffer[i, h:] = 0
        buffer[i, :h, w:] = 0
        pixel_mask[i, :h, :w] = True
        pixel_mask[i, h:] = False
        pixel_mask[i, :h, w:] = False
    return buffer.permute(0, 3, 1, 2), pixel_mask


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`collate_images`, then uint8 pixels normalised on the host as ViLT's (float pixels as they are): model-ready
    float pixel_values [B, 3, H, W] (0 on padding) and the bool pixel_mask (True on real pixels)."""
    pixel_values, pixel_mask = collate_images(images)
    return normalize_pixels(pixel_values, pixel_mask), pixel_mask


def device_pixels(batch: dict) -> dict:
    """The batch with uint8 `pixel_values` normalised where they are (the training step calls it on the device
    batch): ViLT's float pixels, bit-identical to normalising on the host. Float pixel values are left as they are."""
    if batch["pixel_values"].dtype != torch.uint8:
        return batch
    return {**batch, "pixel_values": normalize_pixels(batch["pixel_values"], batch["pixel_mask"])}


def tokenize(tokenizer, texts: list[str], max_text_len: int, pad_to_max_length: bool = False) -> dict:
    """Batch tokenisation; padded to the longest text, or to max_text_len as ViLT's datasets pad."""
    # no offset mapping: nothing reads it, and its nested lists cost transformers' tensor conversion ~1 ms a batch
    return tokenizer(texts, padding="max_length" if pad_to_max_length else "longest", truncation=True,
                     max_length=max_text_len, return_tensors="pt", return_special_tokens_mask=True)


class PairCollator:
    """Collates CaptionPairs items into pixel_values/pixel_mask + tokenised text (picklable for worker processes).

    `normalize`: True gives model-ready float pixels (normalised here, on the host); False keeps the items' uint8
    pixels, for a training step that normalises on the device (`device_pixels`): 4x fewer bytes through the
    workers' shared memory, pinned memory and the host->device copy. `pad_to_max_length`: text padded to
    max_text_len as ViLT's datasets do (default: to the batch's longest text, same model outputs, shorter batches)."""

    def __init__(self, tokenizer, max_text_len: int, normalize: bool = True, pad_to_max_length: bool = False):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.normalize = normalize
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, samples: list[dict]) -> dict:
        images = [s["pixel_values"] for s in samples]
        # ITM false images (CaptionPairs(false_images=True)) are padded with the images to one size, as ViLT's collate
        false_images = [s["false_pixel_values"] for s in samples if "false_pixel_values" in s]
        images += false_images
        pixel_values, pixel_mask = pad_images(images) if self.normalize else collate_images(images)
        texts = [s["text"] for s in samples]
        batch = dict(tokenize(self.tokenizer, texts, self.max_text_len, self.pad_to_max_length))
        if false_images:
            size = len(samples)
            batch.update(false_pixel_values=pixel_values[size:], false_pixel_mask=pixel_mask[size:],
                         false_image_index=torch.tensor([s["false_image_index"] for s in samples]))
            pixel_values, pixel_mask = pixel_values[:size], pixel_mask[:size]
        batch.update(pixel_values=pixel_values, pixel_mask=pixel_mask, text=texts,
                     image_index=torch.tensor([s["image_index"] for s in samples]))
        return batch


class MlmMasker:
    """BERT masking of a collated batch (labels -100 where nothing is predicted), as ViLT's collators did.

    Token level (`whole_word=False`): transformers' DataCollatorForLanguageModeling, each token chosen with
    probability `mlm_prob`, then 80% [MASK], 10% a random token, 10% kept.

    Whole words (`whole_word=True`): transformers 4.2's DataCollatorForWholeWordMask, which ViLT used (4.57 only
    masks whole words with [MASK]). Per row: the candidates are the words (a token and the `##` pieces after it;
    [CLS]/[SEP] excluded, every [PAD] of the row padded to `padded_length` a candidate of its own, as ViLT pads to
    max_text_len), shuffled; words are taken in that order while they fit a budget of max(1, round(padded_length x
    mlm_prob)) tokens (a word that would overflow it is skipped); chosen special tokens and pads predict nothing.
    Then, per chosen token (not per word): 80% [MASK], 10% a random token of the vocabulary, 10% kept.
    """

    def __init__(self, tokenizer, mlm_prob: float, whole_word: bool, padded_length: int | None = None):
        if tokenizer.mask_token is None:
            raise StageError(f"tokenizer {tokenizer.name_or_path!r} has no mask token, needed for MLM",
                             field="with.tokenizer")
        self.tokenizer = tokenizer
        self.mlm_prob = mlm_prob
        self.whole_word = whole_word
        self.padded_length = padded_length
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_prob)
        self.not_candidates = {tokenizer.cls_token_id, tokenizer.sep_token_id} - {None}

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        if self.whole_word:
            input_ids, labels = self.mask_whole_words(batch["input_ids"], batch["special_tokens_mask"],
                                                      batch["attention_mask"], generator)
        else:
            self.collator.generator = generator
            input_ids, labels = self.collator.torch_mask_tokens(
                batch["input_ids"].clone(), special_tokens_mask=batch["special_tokens_mask"])
        labels[batch["attention_mask"] == 0] = -100
        return {**batch, "input_ids": input_ids, "labels": labels}

    def chosen_words(self, tokens: list[str], ids: list[int], padded_length: int,
                     generator: torch.Generator) -> list[int]:
        """Positions chosen for prediction in one row (transformers 4.2 `_whole_word_mask`); positions at or past
        len(tokens) are the virtual pads up to `padded_length`."""
        words: list[list[int]] = []
        for position, (token, token_id) in enumerate(zip(tokens, ids)):
            if token_id in self.not_candidates:
                continue
            if words and token.startswith("##"):
                words[-1].append(position)
            else:
                words.append([position])
        words += [[position] for position in range(len(tokens), padded_length)]
        budget = max(1, int(round(padded_length * self.mlm_prob)))
        chosen: list[int] = []
        for index in torch.randperm(len(words), generator=generator).tolist():
            if len(chosen) >= budget:
                break
            if len(chosen) + len(words[index]) <= budget:
                chosen += words[index]
        return chosen

    def mask_whole_words(self, input_ids: torch.Tensor, special_tokens_mask: torch.Tensor,
                         attention_mask: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows, length = input_ids.shape
        padded_length = max(length, self.padded_length or length)
        chosen = torch.zeros(rows, length, dtype=torch.bool)
        for row in range(rows):
            ids = input_ids[row].tolist()
            for position in self.chosen_words(self.tokenizer.convert_ids_to_tokens(ids), ids, padded_length,
                                              generator):
                if position < length:
                    chosen[row, position] = True
        chosen &= ~special_tokens_mask.bool() & attention_mask.bool()
        labels = input_ids.clone()
        labels[~chosen] = -100
        inputs = input_ids.clone()
        replaced = torch.bernoulli(torch.full((rows, length), 0.8), generator=generator).bool() & chosen
        inputs[replaced] = self.tokenizer.mask_token_id
        randomised = torch.bernoulli(torch.full((rows, length), 0.5), generator=generator).bool() & chosen & ~replaced
        random_words = torch.randint(len(self.tokenizer), (rows, length), generator=generator)
        inputs[randomised] = random_words[randomised]
        return inputs, labels


def itm_negatives(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM pairs from the batch alone (`itm_negatives: batch`): half of the positions (chosen at random) get another
    image of the batch.
    Returns (image_order, itm_labels): the ITM image of position i is image image_order[i]; itm_labels 1 = matching.

    Where the work happens: only these two small index tensors are drawn on the host (with the step's CPU generator,
    so a resumed run draws the same; microseconds for a batch of 32); the images themselves are gathered on the
    device, in the training step (`pretrain_task`'s losses: `index_select` on the device batch), never copied on the
    host. Both are fixed-size, so the gather has no data-dependent shapes. One decoded image per item; the default
    (`itm_negatives: dataset`, ViLT's `draw_false_image=1`) decodes a second, false image per item in the dataset."""
    size = len(batch["input_ids"])
    if size < 2:
        raise StageError("ITM needs at least 2 samples per device batch", field="with.per_device_batch_size")
    negatives = torch.randperm(size, generator=generator)[: size // 2]
    # a random other position for each negative: shift by 1..size-1 (never itself)
    others = (negatives + torch.randint(1, size, (len(negatives),), generator=generator)) % size
    # only swap where the other position shows a different image (duplicates possible in small datasets)
    image_index = batch["image_index"].cpu()
    different = image_index[others] != image_index[negatives]
    negatives, others = negatives[different], others[different]
    image_order = torch.arange(size)
    image_order[negatives] = others
    itm_labels = torch.ones(size, dtype=torch.long)
    itm_labels[negatives] = 0
    return image_order, itm_labels


def swap_images_for_itm(batch: dict, generator: torch.Generator) -> dict:
    """The ITM batch itself (`itm_negatives` applied to the images): pixel_values/pixel_mask reordered, itm_labels,
    on the batch's device (the training step does the same gather inline on the device batch)."""
    image_order, itm_labels = itm_negatives(batch, generator)
    image_order = image_order.to(batch["pixel_values"].device)
    return {**batch, "pixel_values": batch["pixel_values"].index_select(0, image_order),
            "pixel_mask": batch["pixel_mask"].index_select(0, image_order),
            "itm_labels": itm_labels.to(batch["pixel_values"].device)}


def itm_labels_for_false_images(batch: dict, generator: torch.Generator) -> torch.Tensor:
    """ITM with false images from the dataset (CaptionPairs(false_images=True)), as ViLT's `compute_itm_wpa`: of a
    batch of B, B // 2 positions keep their own image (label 1) and the other B - B // 2 take their false image
    (label 0), in an order drawn with `generator` on the host."""
    size = len(batch["input_ids"])
    labels = torch.zeros(size, dtype=torch.long)
    labels[: size // 2] = 1
    return labels[torch.randperm(size, generator=generator)]


def false_image_itm_pixels(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The ITM images of a batch with false images and `itm_labels`, where the batch is (the training step: on the
    device): each position's own image where its label is 1, its false image where 0; model-ready floats (uint8
    pixels are normalised after the choice) and the matching pixel_mask."""
    matching = batch["itm_labels"].bool()
    pixel_mask = torch.where(matching[:, None, None], batch["pixel_mask"], batch["false_pixel_mask"])
    pixel_values = torch.where(matching[:, None, None, None], batch["pixel_values"], batch["false_pixel_values"])
    return normalize_pixels(pixel_values, pixel_mask), pixel_mask


# ---------------------------------------------------------------------------------------------------------------
# VQAv2: one item per (image, question), soft-score targets over the answer vocabulary.

def vqa_dataset(arrows: Path, splits: list[str], image_size: int, max_image_size: int,
                decoding: PixelDecoding = PixelDecoding.exact) -> VqaArrowDataset:
    files = []
    for split in splits:
        path = arrows / f"vqav2_{split}.arrow"
        if not path.is_file():
            raise StageError(f"no vqav2_{split}.arrow in {arrows}", field="inputs.arrows")
        files.append(path)
    return VqaArrowDataset(files, pixelbert_pixels(image_size, max_image_size, decoding))


def load_answers(arrows: Path) -> list[str]:
    """The answer vocabulary (label -> answer) written by arrow.vqav2."""
    path = arrows / "vqa_answers.json"
    if not path.is_file():
        raise StageError(f"no vqa_answers.json in {arrows} (is it an arrow.vqav2 output?)", field="inputs.arrows")
    return json.loads(path.read_text())["label2answer"]


class QuestionPairs(Dataset):
    """One item per (image, question), like ViLT's VQA index mapper: an epoch sees every question once.
    `augment`: ViLT's RandAugment before the resize, drawn from the item's seed (keys are (index, item_seed))."""

    def __init__(self, images: VqaArrowDataset, augment: ViltRandAugment | None = None):
        self.images = images
        self.pairs = [(i, j) for i in range(len(images)) for j in range(len(images.questions(i)))]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, item_seed = split_key(key)
        image_index, question_index = self.pairs[index]
        if self.augment is None:
            row = self.images[image_index]
            pixels, questions, question_ids = row["image"], row["questions"], row["question_id"]
            labels, scores = row["answer_labels"], row["answer_scores"]
        else:
            pixels = train_pixels(self.images, image_index, self.augment, item_rng(item_seed, "RandAugment"))
            questions, question_ids = self.images.questions(image_index), self.images.question_ids(image_index)
            labels, scores = self.images.targets(image_index)
        return {"pixel_values": pixels, "text": questions[question_index],
                "answer_labels": labels[question_index] if labels else [],
                "answer_scores": scores[question_index] if scores else [],
                "question_id": question_ids[question_index], "image_index": image_index}


class QuestionCollator(PairCollator):
    """PairCollator + `targets` [B, num_answers]: each question's soft answer scores (ViLT's vqa_targets)."""

    def __init__(self, tokenizer, max_text_len: int, num_answers: int, normalize: bool = True,
                 pad_to_max_length: bool = False):
        super().__init__(tokenizer, max_text_len, normalize, pad_to_max_length)
        self.num_answers = num_answers

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        targets = torch.zeros(len(samples), self.num_answers)
        for row, sample in enumerate(samples):
            for label, score in zip(sample["answer_labels"], sample["answer_scores"]):
                targets[row, label] = score
        batch.update(targets=targets, question_id=torch.tensor([s["question_id"] for s in samples]))
        return batch
