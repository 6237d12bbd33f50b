"""Stage specs of the ViLT package (no torch/transformers imports here: validate/plan stay fast)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from vlflow.stage import LocalFileParam, Params, StageSpec


class ViltModelParams(Params):
    """Model size and input geometry (defaults: ViLT-B/32 as in the paper)."""

    hidden_size: int = Field(768, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    patch_size: int = Field(32, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    image_size: int = Field(384, ge=8, description="shorter image side after resize")
    max_image_size: int = Field(639, ge=8, description="longer image side is capped at this (ViLT: "
                                                       "int(1333 / 800 * 384) = 639)")
    max_text_len: int = Field(40, ge=4)
    max_image_len: int = Field(200, description="sampled patches per image; -1 keeps all (ViLT: 200 in "
                                                "pretraining, -1 in fine-tuning and evaluation)")
    initializer_range: float = Field(
        0.02, gt=0, description="std of the initial weights (BERT/ViT: 0.02; small models learn cross-modal "
                                "attention much sooner with ~1/sqrt(hidden_size))")
    layer_norm_eps: float = Field(
        1e-6, gt=0, description="LayerNorm epsilon: ViLT's timm ViT uses 1e-6 (its BERT text embeddings and MLM "
                                "transform 1e-12); transformers' ViltConfig defaults to 1e-12 everywhere")

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class ViltTrainParams(ViltModelParams):
    """Optimisation, batching and bookkeeping shared by pretraining and fine-tuning."""

    tokenizer: Annotated[str, LocalFileParam()] = Field("bert-base-uncased",
                           description="AutoTokenizer name or local path; the `tokenizer` input wins when given")
    max_steps: int | None = Field(200_000, ge=1, description="optimizer steps; overrides max_epochs")
    max_epochs: int | None = Field(None, ge=1, description="passes over the training pairs (ViLT's max_epoch), "
                                                           "converted to optimizer steps at the global batch")
    batch_size: int = Field(4096, ge=1, description="global batch, reached by gradient accumulation")
    per_device_batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int | float = Field(0.1, ge=0, description="steps (int) or a fraction of the run's steps "
                                                             "(float < 1)")
    grad_clip: float = Field(0.0, ge=0, description="0 disables clipping (ViLT does not clip)")
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # torch and numpy take seeds in this range
    num_workers: int = Field(2, ge=0)
    image_decoding: Literal["exact", "fast"] = Field(
        "exact", description="training images: exact = PIL decode + bicubic resize, ViLT's pixels bit for bit; fast = "
                             "libjpeg-turbo + torch's uint8 antialiased bicubic, ~2x faster decode + resize, pixels "
                             "within 2 levels of ViLT's (mean <= 0.02; transforms.FAST_PIXEL_TOLERANCE)")
    train_transform: Literal["pixelbert", "pixelbert_randaug"] = Field(
        "pixelbert", description="ViLT's train_transform_keys: pixelbert = resize only; pixelbert_randaug = ViLT's "
                                 "RandAugment(2, 9) on the decoded image, then the resize (ViLT's fine-tuning "
                                 "recipe). Evaluation always uses pixelbert")

    @model_validator(mode="after")
    def _a_length(self):
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("give max_steps or max_epochs (max_steps wins when both are given)")
        return self


class ViltPretrainParams(ViltTrainParams):
    warmup_steps: int | float = Field(2500, ge=0, description="steps (int) or a fraction of the run's steps "
                                                              "(float < 1); ViLT pretrains with 2,500")
    tasks: list[Literal["mlm", "itm"]] = Field(default_factory=lambda: ["mlm", "itm"], min_length=1)
    itm_negatives: Literal["dataset", "batch"] = Field(
        "dataset", description="ITM negative images: dataset = a false image per item drawn from the whole training "
                               "set (ViLT's draw_false_image=1; two decoded images per item); batch = another image "
                               "of the same batch (one decode per item, negatives limited to the batch's images)")
    whole_word_masking: bool = False
    mlm_prob: float = Field(0.15, gt=0, lt=1)
    itm_wpa: bool = Field(False, description="add ViLT's word-patch alignment (IPOT) loss to ITM")
    wpa_weight: float = Field(0.1, ge=0)
    init_from: Annotated[str | None, LocalFileParam()] = Field(
        None, description="transformers ViLT checkpoint (dir or hub name) to start from")
    vit_init: Annotated[str | None, LocalFileParam()] = Field(
        None, description="timm ViT name or local weights file (.pth/.safetensors, timm layout) for the patch "
                          "embedding and encoder. ViLT started from the original jx ViT-B/32 384 weights "
                          "(jx_vit_base_p32_384-830016f5.pth, ImageNet-21k + 1k); timm's current "
                          "vit_base_patch32_384 resolves to other (augreg) weights, so give that file to match")


class ViltFinetuneRetrievalParams(ViltTrainParams):
    """ViLT's irtr fine-tuning defaults: 10 epochs at batch 256 (~22.1k steps on COCO train+restval), all patches."""

    false_texts: int = Field(15, ge=1, description="negative captions scored with each image")
    lr: float = Field(1e-4, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides max_epochs")
    max_epochs: int | None = Field(10, ge=1, description="passes over the training pairs (ViLT: 10)")
    batch_size: int = Field(256, ge=1, description="global batch, reached by gradient accumulation")
    max_image_len: int = Field(-1, description="sampled patches per image; -1 keeps all (as ViLT fine-tunes)")
    train_transform: Literal["pixelbert", "pixelbert_randaug"] = Field(
        "pixelbert_randaug", description="pixelbert_randaug: ViLT's RandAugment(2, 9) before the resize, as its "
                                         "*_randaug fine-tuning configs; pixelbert: resize only")


class ViltFinetuneVqaParams(ViltTrainParams):
    """ViLT's vqa fine-tuning defaults: 10 epochs of VQAv2 train + trainable_val at batch 256, head at 10x lr."""

    train_splits: list[str] = Field(default_factory=lambda: ["train", "trainable_val"], min_length=1,
                                    description="vqav2_<split>.arrow files to train on")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides max_epochs")
    max_epochs: int | None = Field(10, ge=1, description="passes over the training questions (ViLT: 10)")
    batch_size: int = Field(256, ge=1)
    max_image_len: int = Field(-1, description="sampled patches per image; -1 keeps all (as ViLT fine-tunes)")
    train_transform: Literal["pixelbert", "pixelbert_randaug"] = Field(
        "pixelbert_randaug", description="pixelbert_randaug: ViLT's RandAugment(2, 9) before the resize, as its "
                                         "*_randaug fine-tuning configs; pixelbert: resize only")
    head_lr_mult: float = Field(10.0, gt=0, description="lr multiplier of the new answer classifier (ViLT lr_mult)")


class ViltEvaluateRetrievalParams(Params):
    split: str = "test"
    subsets: list[Literal["all", "1k", "5k"]] = Field(
        default_factory=lambda: ["1k", "5k"],
        description="1k: mean over 5 folds of 1000 images, 5k: first 5000 images; both need enough images, "
                    "smaller splits are evaluated whole ('all')")
    max_images: int | None = Field(None, ge=1, description="evaluate only the first N images of the split")
    text_batch_size: int = Field(256, ge=1)
    image_batch_size: int = Field(4, ge=1, description="images per forward, each paired with text_batch_size texts")
    image_size: int | None = Field(None, description="defaults to the trained model's")
    max_image_size: int | None = None
    max_text_len: int | None = None
    num_threads: int = Field(0, ge=0, description="torch threads per rank on a CPU; 0: OMP_NUM_THREADS, else the "
                                                   "cores divided among the machine's ranks")


class ViltEvaluateVqaParams(Params):
    split: str = Field("rest_val", description="vqav2_<split>.arrow; test/test-dev have no answers: predictions only")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes decoding images (on a GPU: 4-8)")
    max_questions: int | None = Field(None, ge=1, description="evaluate only the first N questions")
    image_size: int | None = Field(None, description="defaults to the trained model's")
    max_image_size: int | None = None
    max_text_len: int | None = None


PRETRAIN = StageSpec(
    name="vilt.pretrain",
    entry="vlflow.stages.vilt.train:pretrain",
    params=ViltPretrainParams,
    inputs=("arrows",),
    optional_inputs=("tokenizer", "vg", "sbu", "gcc"),  # ViLT's mix: COCO + arrow.vg / arrow.sbu / arrow.gcc
    distributed=True,
    resumable=True,
    description="ViLT pretraining with masked language modelling and image-text matching",
)

FINETUNE_RETRIEVAL = StageSpec(
    name="vilt.finetune_retrieval",
    entry="vlflow.stages.vilt.train:finetune_retrieval",
    params=ViltFinetuneRetrievalParams,
    inputs=("arrows", "pretrained"),
    optional_inputs=("tokenizer",),
    distributed=True,
    resumable=True,
    description="ViLT image-text retrieval fine-tuning (rank head from ITM, contrast over false texts)",
)

EVALUATE_RETRIEVAL = StageSpec(
    name="vilt.evaluate_retrieval",
    entry="vlflow.stages.vilt.evaluate:evaluate_retrieval",
    params=ViltEvaluateRetrievalParams,
    inputs=("arrows", "model"),
    distributed=True,  # ranks share the images; no training, so the booster goes unused
    description="Text->image and image->text recall@1/5/10 over all pairs of a split",
)

FINETUNE_VQA = StageSpec(
    name="vilt.finetune_vqa",
    entry="vlflow.stages.vilt.train:finetune_vqa",
    params=ViltFinetuneVqaParams,
    inputs=("arrows", "pretrained"),
    optional_inputs=("tokenizer",),
    distributed=True,
    resumable=True,
    description="ViLT VQAv2 fine-tuning (answer classifier, binary cross-entropy on soft scores)",
)

EVALUATE_VQA = StageSpec(
    name="vilt.evaluate_vqa",
    entry="vlflow.stages.vilt.evaluate_vqa:evaluate_vqa",
    params=ViltEvaluateVqaParams,
    inputs=("arrows", "model"),
    distributed=True,  # ranks share the questions; no training, so the booster goes unused
    description="VQA score of a fine-tuned model on a split (+ predictions in the VQA submission format)",
)

STAGES = [PRETRAIN, FINETUNE_RETRIEVAL, EVALUATE_RETRIEVAL, FINETUNE_VQA, EVALUATE_VQA]
