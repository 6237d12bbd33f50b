"""The ViLT recipe as the stages and coco_vilt.yaml say it: run length in epochs or steps, fine-tuning with every
patch, the paper's retrieval fine-tune (10 epochs at batch 256), ViLT's RandAugment for fine-tuning and ITM false
images drawn from the dataset (both reproducible from the sampler's per-sample seeds)."""
import io
import random

import numpy as np
import pyarrow as pa
import pydantic
import pytest
import torch
from PIL import Image
from vlflow.stages.common.fit import training_steps
from vlflow.stages.common.training import ResumableSampler
from vlflow.stages.data.transforms import VILT_RANDAUG_OPS, ViltRandAugment, normalize_pixels
from vlflow.stages.text.tokenizer import train_wordpiece
from vlflow.stages.vilt.data import (
    CaptionPairs,
    PairCollator,
    false_image_itm_pixels,
    image_dataset,
    itm_labels_for_false_images,
    train_augment,
)
from vlflow.stages.vilt.spec import ViltFinetuneRetrievalParams, ViltFinetuneVqaParams, ViltPretrainParams

from tests.conftest import REPO_ROOT
from vlflow.errors import StageError
from vlflow.workflow import load_workflow

ROOT = REPO_ROOT
COCO_TRAIN_PAIRS = 566_747  # Karpathy train + restval captions (113,287 images), ViLT's irtr training pairs


def test_training_steps_from_epochs_or_steps():
    assert training_steps(1000, 10, 50, 2) == 1000  # max_steps wins
    assert training_steps(None, 10, 50, 2) == 250  # 10 epochs of 50 micro-batches, 2 per optimizer step
    assert training_steps(None, 1, 3, 4) == 1  # at least one step
    # ViLT's COCO irtr fine-tune on 8 ranks x 4 per device at global batch 256: 8 micro-batches per step
    per_rank = ResumableSampler(COCO_TRAIN_PAIRS, 4, 0, 8).batches_per_epoch
    assert training_steps(None, 10, per_rank, 8) == 22_137  # the paper's ~22.1k steps


def test_params_need_a_length_and_fine_tuning_defaults_are_vilts():
    with pytest.raises(pydantic.ValidationError, match="max_steps or max_epochs"):
        ViltPretrainParams(max_steps=None)
    assert ViltPretrainParams().max_steps == 200_000 and ViltPretrainParams().max_image_len == 200
    assert ViltPretrainParams().warmup_steps == 2500  # ViLT's config default (not 10% of 200k)
    for params in (ViltFinetuneRetrievalParams(), ViltFinetuneVqaParams()):
        assert (params.max_steps, params.max_epochs, params.batch_size, params.max_image_len) == (None, 10, 256, -1)
    assert ViltFinetuneRetrievalParams().false_texts == 15
    assert ViltPretrainParams().layer_norm_eps == 1e-6  # timm's ViT (ViLT); transformers' ViltConfig has 1e-12


def test_coco_vilt_workflow_fine_tunes_as_the_paper():
    workflow = load_workflow(ROOT / "workflows" / "coco_vilt.yaml")
    pretrain = workflow.stages["pretrain"].params
    assert (pretrain["max_steps"], pretrain["batch_size"], pretrain["max_image_len"]) == (200_000, 4096, 200)
    assert pretrain["warmup_steps"] == 2500 and pretrain["whole_word_masking"] and pretrain["itm_wpa"]
    for name in ("finetune", "finetune_vqa"):
        params = workflow.stages[name].params
        assert (params["max_steps"], params["max_epochs"], params["batch_size"], params["max_image_len"]) == \
            (None, 10, 256, -1), name
    assert workflow.stages["finetune"].params["false_texts"] == 15


# ---------------------------------------------------------------------------------------------------------------
# ViLT's training transforms (pixelbert_randaug) and ITM false images drawn from the dataset


VILT_AUGMENT_LIST = [  # vilt/transforms/randaug.py augment_list() at 762fd39: (op, min, max); Invert, Cutout off
    ("AutoContrast", 0, 1), ("Equalize", 0, 1), ("Rotate", 0, 30), ("Posterize", 0, 4), ("Solarize", 0, 256),
    ("SolarizeAdd", 0, 110), ("Color", 0.1, 1.9), ("Contrast", 0.1, 1.9), ("Brightness", 0.1, 1.9),
    ("Sharpness", 0.1, 1.9), ("ShearX", 0.0, 0.3), ("ShearY", 0.0, 0.3), ("TranslateXabs", 0.0, 100),
    ("TranslateYabs", 0.0, 100),
]
SIZES = [(96, 64), (64, 64), (64, 96), (72, 64), (64, 64)]  # (width, height): one portrait, one landscape


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def arrows(tmp_path_factory):
    """A ViLT caption arrow of 5 textured JPEGs of different sizes, 2 captions each (image 4: one caption)."""
    directory = tmp_path_factory.mktemp("arrows")
    images = []
    for i, (width, height) in enumerate(SIZES):
        buffer = io.BytesIO()
        noise_image(width, height, i).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    captions = [[f"image {i} caption {j}" for j in range(1 if i == 4 else 2)] for i in range(len(SIZES))]
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.list_(pa.string())),
                      "image_id": [f"img{i}.jpg" for i in range(len(SIZES))], "split": ["train"] * len(SIZES)})
    with pa.OSFile(str(directory / "coco_caption_karpathy_train.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return directory


def test_randaugment_is_vilts_op_list_at_its_magnitudes():
    assert [(name, low, high) for name, _, low, high in VILT_RANDAUG_OPS] == VILT_AUGMENT_LIST
    augment = ViltRandAugment(2, 9)  # ViLT's pixelbert_transform_randaug
    values = {name: augment.value(low, high) for name, _, low, high in VILT_RANDAUG_OPS}
    assert values["Rotate"] == pytest.approx(9) and values["ShearX"] == pytest.approx(0.09)
    assert values["TranslateXabs"] == pytest.approx(30) and values["Color"] == pytest.approx(0.64)
    assert values["Solarize"] == pytest.approx(76.8) and values["SolarizeAdd"] == pytest.approx(33)
    ops = {name: op for name, op, _, _ in VILT_RANDAUG_OPS}
    image = noise_image(64, 48, 0)
    # ViLT's int(1.2) = 1: posterize keeps one bit
    assert set(np.unique(np.asarray(ops["Posterize"](image, values["Posterize"], random.Random(0))))) <= {0, 128}
    # translation by 30 pixels (absolute), one way or the other, black fill
    moved = np.asarray(ops["TranslateXabs"](image, values["TranslateXabs"], random.Random(0)))
    source = np.asarray(image)
    assert (np.array_equal(moved[:, :34], source[:, 30:]) and not moved[:, 34:].any()) or \
        (np.array_equal(moved[:, 30:], source[:, :34]) and not moved[:, :30].any())


def test_randaugment_draws_only_from_its_rng():
    image, augment = noise_image(64, 48, 1), ViltRandAugment(2, 9)
    first = np.asarray(augment(image, random.Random(5)))
    random.seed(123)  # the global stream plays no part
    assert np.array_equal(first, np.asarray(augment(image, random.Random(5))))
    outputs = {np.asarray(augment(image, random.Random(seed))).tobytes() for seed in range(20)}
    assert len(outputs) > 10  # different ops/signs for different seeds


def test_sampler_item_seeds_keep_the_order_and_resume():
    plain = ResumableSampler(50, 4, rank=1, world_size=2, seed=3)
    seeded = ResumableSampler(50, 4, rank=1, world_size=2, seed=3, item_seeds=True)
    batches = [seeded.batch(b) for b in range(12)]  # two epochs (6 global batches each)
    assert [[i for i, _ in batch] for batch in batches] == [plain.batch(b) for b in range(12)]
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every position of every epoch its own seed
    resumed = ResumableSampler(50, 4, rank=1, world_size=2, seed=3, start_batch=7, item_seeds=True)
    assert next(iter(resumed)) == batches[7]


def test_randaug_pairs_are_reproducible_from_their_seed(arrows):
    images = image_dataset(arrows, "train", 64, 96)
    pairs = CaptionPairs(images, augment=train_augment("pixelbert_randaug"))
    plain = CaptionPairs(images, augment=train_augment("pixelbert"))
    assert plain.augment is None
    item = pairs[(0, 11)]
    assert torch.equal(item["pixel_values"], pairs[(0, 11)]["pixel_values"])
    assert item["text"] == "image 0 caption 0" and item["image_index"] == 0
    # augmented before the resize: the resize's shape, other pixels for some seeds
    assert item["pixel_values"].shape == plain[0]["pixel_values"].shape == (3, 64, 96)
    assert any(not torch.equal(pairs[(0, seed)]["pixel_values"], plain[0]["pixel_values"]) for seed in range(5))
    with pytest.raises(ValueError, match="item_seed"):
        pairs[0]
    with pytest.raises(StageError, match="unknown image transform"):
        train_augment("randaug")


def test_false_images_come_from_the_dataset_never_the_item_image(arrows):
    images = image_dataset(arrows, "train", 64, 96)
    pairs = CaptionPairs(images, false_images=True)
    drawn = []
    for seed in range(200):
        item = pairs[(seed % len(pairs), seed)]
        assert item["false_image_index"] != item["image_index"]
        drawn.append(item["false_image_index"])
    assert set(drawn) == set(range(len(SIZES)))  # any image of the dataset, not only those of a batch
    item = pairs[(3, 99)]
    again = pairs[(3, 99)]  # a resumed run loads the same key: the same false image
    assert item["false_image_index"] == again["false_image_index"]
    assert torch.equal(item["false_pixel_values"], again["false_pixel_values"])
    assert torch.equal(item["false_pixel_values"], images[item["false_image_index"]]["image"])


def test_false_image_itm_batch_is_half_negatives_with_their_false_images(arrows, tokenizer_for_pairs):
    pairs = CaptionPairs(image_dataset(arrows, "train", 64, 96), false_images=True)
    samples = [pairs[(i, 1000 + i)] for i in range(len(pairs))]
    batch = PairCollator(tokenizer_for_pairs, 16, normalize=False)(samples)
    size = len(samples)
    # images and false images padded to one size (as ViLT's collate), each with its own mask
    assert batch["pixel_values"].shape == batch["false_pixel_values"].shape == (size, 3, 96, 96)
    for row, sample in enumerate(samples):
        _, height, width = sample["false_pixel_values"].shape
        assert torch.equal(batch["false_pixel_values"][row, :, :height, :width], sample["false_pixel_values"])
        assert batch["false_pixel_mask"][row].sum() == height * width
    labels = itm_labels_for_false_images(batch, torch.Generator().manual_seed(0))
    assert int(labels.sum()) == size // 2  # ViLT: B // 2 positives, the rest negatives
    assert torch.equal(labels, itm_labels_for_false_images(batch, torch.Generator().manual_seed(0)))
    pixel_values, pixel_mask = false_image_itm_pixels({**batch, "itm_labels": labels})
    own = normalize_pixels(batch["pixel_values"], batch["pixel_mask"])
    false = normalize_pixels(batch["false_pixel_values"], batch["false_pixel_mask"])
    for row in range(size):
        expected = own[row] if labels[row] else false[row]
        assert torch.equal(pixel_values[row], expected)
        assert torch.equal(pixel_mask[row], (batch["pixel_mask"] if labels[row] else batch["false_pixel_mask"])[row])


@pytest.fixture(scope="module")
def tokenizer_for_pairs():
    texts = [f"image {i} caption {j}" for i in range(len(SIZES)) for j in range(2)] * 3
    return train_wordpiece(iter(texts), vocab_size=40, lowercase=True, min_frequency=1)


def test_stage_defaults_are_vilts_transforms_and_negatives():
    assert ViltPretrainParams().train_transform == "pixelbert"  # ViLT's task_mlm_itm
    assert ViltPretrainParams().itm_negatives == "dataset"  # draw_false_image = 1
    for params in (ViltFinetuneRetrievalParams(), ViltFinetuneVqaParams()):
        assert params.train_transform == "pixelbert_randaug"  # the *_randaug fine-tunes
    workflow = load_workflow(ROOT / "workflows" / "coco_vilt.yaml")
    for name in ("finetune", "finetune_vqa"):
        assert workflow.stages[name].params.get("train_transform", "pixelbert_randaug") == "pixelbert_randaug"
    assert workflow.stages["pretrain"].params.get("itm_negatives", "dataset") == "dataset"
