"""Stage specs for UniTAB (light: pydantic + StageSpec only, no torch).

Sequence format (what the decoder learns), following microsoft/UniTAB:
    <s> a <obj> red circle x1 y1 x2 y2 </obj> next to <obj> a square x1 y1 x2 y2 </obj> </s>
where x1..y2 are coordinate-bin tokens `int(v * (num_queries - 1))` appended after the text vocabulary, `<obj>` and
`</obj>` the two ids right after the text vocabulary. A phrase with several boxes carries all of them, in order.

`pretrain_seqcrop` (UniTAB's `--pretrain_seqcrop`): what the *text encoder* sees while the decoder always emits the
full grounded sequence:
    grounding - the full caption (phrase grounding: copy the text, insert boxes),
    caption   - nothing (grounded captioning from the image alone; UniTAB's "first" crop),
    mixed     - per sample, 50/50 between the two (UniTAB's default),
    none      - no cropping: the caption if not `do_caption`, else nothing (UniTAB's fine-tuning behaviour).
`no_detection` means what it means in UniTAB: the run's evaluation skips the box (detection/grounding) metrics.
Training is unchanged by it (the targets keep their boxes, as with the seed's `--do_caption --no_detection`
pretraining command); `unitab.evaluate` takes it from the trained model unless its own `no_detection` is set.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from vlflow.stage import LocalFileParam, Params, StageSpec


class ModelParams(Params):
    """Architecture fields shared by training and the saved config (defaults: the UniTAB paper model)."""

    backbone: str = Field("resnet101", description="timm ResNet name (features_only; torchvision's tensor names)")
    backbone_weights: Annotated[str | None, LocalFileParam()] = Field(
        None, description="local file: a torchvision/timm ResNet state dict or an MDETR/UniTAB checkpoint (its "
        "backbone.0.body.* tensors, e.g. MDETR's pretrained_resnet101_checkpoint.pth); never downloaded")
    backbone_feature_level: int = Field(
        -1, description="which ResNet feature map to use (-1: stride 32, -2: stride 16, -3: stride 8)")
    backbone_norm: Literal["frozen_bn", "batch_norm", "group_norm"] = Field(
        "frozen_bn", description="frozen_bn: FrozenBatchNorm2d as UniTAB/MDETR (needs backbone_weights); group_norm: "
        "GroupNorm(8); batch_norm: trainable BatchNorm, for backbones trained from scratch (torch_ddp on GPUs makes it "
        "SyncBatchNorm; on CPU/gloo each rank keeps its own statistics)")
    text_encoder: Annotated[str, LocalFileParam()] = Field(
        "roberta-base", description="hub name or local path of a RoBERTa model/tokenizer")
    text_encoder_config: dict | None = Field(
        None, description="build a fresh RobertaModel from these RobertaConfig fields instead of from_pretrained")
    d_model: int = Field(256, ge=8)
    enc_layers: int = Field(6, ge=1)
    dec_layers: int = Field(6, ge=1)
    nheads: int = Field(8, ge=1)
    dim_feedforward: int = Field(2048, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_queries: int = Field(200, ge=2, description="number of coordinate bins")
    max_decoding_step: int = Field(256, ge=8, description="max decoder sequence length")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.nheads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nheads ({self.nheads})")
        return self


class SequenceTrainingParams(Params):
    """Training fields shared by pretraining and grounding fine-tuning (defaults: UniTAB pretraining)."""

    batch_size: int = Field(128, ge=1, description="global batch (UniTAB: 64 GPUs x 2); accumulation = batch_size // "
                            "(per_device * world)")
    per_device_batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_backbone: float = Field(2e-5, ge=0, description="0 freezes the backbone")
    text_encoder_lr: float = Field(2e-5, ge=0, description="0 freezes the text encoder")
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(0.1, ge=0, description="max global L2 norm of the gradients; 0 disables clipping")
    box_targets: Literal["merged", "separate"] = Field(
        "merged", description="merged: one box per phrase, the smallest enclosing all its gold boxes (UniTAB trains "
        "on MDETR's final_flickr_mergedGT annotations); separate: every gold box of the phrase inside its <obj>")
    augment: Literal["mdetr", "none"] = Field(
        "mdetr", description="mdetr: MDETR's training transform (multi-scale resize, or resize + random crop that "
        "keeps every box, then multi-scale resize; sizes scale with image_size, 800 = MDETR's); none: one fixed resize")
    ema: bool = True
    ema_decay: float = Field(0.9998, gt=0, lt=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: int = Field(20, ge=1, description="UniTAB pretraining: 20 (configs/pretrain.json)")
    lr_schedule: Literal["linear_with_warmup", "all_linear_with_warmup"] = Field(
        "linear_with_warmup", description="UniTAB/MDETR util/optim.py: linear_with_warmup = the text encoder warms "
        "up linearly then decays linearly to 0, transformer and backbone stay constant and drop x0.1 every lr_drop "
        "epochs; all_linear_with_warmup = every group warms up and decays linearly")
    lr_drop: int = Field(15, ge=1, description="epochs between x0.1 drops of the transformer/backbone lr "
                         "(linear_with_warmup; UniTAB pretraining: 15 of 20)")
    warmup: float = Field(0.01, ge=0, description="warmup steps (>=1) or fraction of all steps (<1, rounded: "
                          "UniTAB's fraction_warmup_steps)")
    image_size: int = Field(800, ge=32, description="shorter image side")
    max_image_size: int = Field(1333, ge=32, description="cap on the longer side")
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between resumable checkpoints")
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # torch and numpy take seeds in this range


class PretrainParams(ModelParams, SequenceTrainingParams):
    init_checkpoint: Annotated[str | None, LocalFileParam()] = Field(
        None, description="UniTAB's --load: a local MDETR/UniTAB checkpoint (e.g. MDETR's "
        "pretrained_resnet101_checkpoint.pth; its model_ema if present, else model). Every tensor whose MDETR name "
        "maps onto this model with the same shape is loaded (backbone, input_proj, text encoder, resizer, encoder and "
        "decoder layers); the stage log and init_checkpoint.json list what was loaded and what skipped, and why")
    freeze_backbone_stem: bool = Field(
        True, description="conv1/bn1 and layer1 get no gradient, as UniTAB/MDETR (only layer2..4 train); needs "
        "backbone_weights or init_checkpoint")
    do_caption: bool = False
    no_detection: bool = Field(False, description="UniTAB's flag: evaluation of this model skips the grounding "
                               "metrics (unitab.evaluate reads it); training targets keep their boxes")
    pretrain_seqcrop: Literal["none", "mixed", "grounding", "caption"] = "mixed"

    @model_validator(mode="after")
    def _frozen_backbone_needs_weights(self):
        # a frozen random layer never learns: frozen BN without weights is no normalisation at all
        if self.backbone_weights and self.init_checkpoint:
            raise ValueError("give backbone_weights or init_checkpoint, not both (init_checkpoint also holds the "
                             "backbone: which file's backbone would win is not obvious)")
        if not (self.backbone_weights or self.init_checkpoint):
            if self.backbone_norm == "frozen_bn":
                raise ValueError("backbone_norm frozen_bn needs backbone_weights (a local ResNet or MDETR checkpoint "
                                 "file) or init_checkpoint: frozen BatchNorm of a randomly initialised ResNet "
                                 "normalises nothing. For a backbone trained from scratch set backbone_norm: "
                                 "batch_norm (or group_norm)")
            if self.freeze_backbone_stem and self.lr_backbone > 0:
                raise ValueError("freeze_backbone_stem needs backbone_weights: a frozen random stem never learns; "
                                 "set freeze_backbone_stem: false to train a backbone from scratch")
        return self


class FinetuneGroundingParams(SequenceTrainingParams):
    """UniTAB's Flickr30k grounding fine-tuning (README "Flickr30k grounding", configs/flickr.json,
    --do_flickrgrounding): mergedGT targets, the caption always in the encoder, 20 epochs with the transformer's lr
    x0.1 at epoch 15, 8 GPUs x 2 = batch 16, lr 1e-4 / backbone 1e-5 / text encoder 5e-5, EMA."""

    batch_size: int = Field(16, ge=1, description="global batch (UniTAB fine-tuning: 8 GPUs x 2)")
    per_device_batch_size: int = Field(2, ge=1)
    lr_backbone: float = Field(1e-5, ge=0, description="0 freezes the backbone")
    text_encoder_lr: float = Field(5e-5, ge=0, description="0 freezes the text encoder")
    epochs: int = Field(20, ge=1, description="UniTAB grounding fine-tuning: 20 (configs/flickr.json)")
    start_from_ema: bool = Field(True, description="start from the pretrained EMA weights when saved (UniTAB's "
                                 "--load takes a checkpoint's model_ema); false: the raw weights")
    freeze_backbone_stem: bool | None = Field(None, description="default: as the pretrained model was trained")


class EvaluateParams(Params):
    split: Literal["train", "val", "test"] = "test"
    use_ema: bool = True
    batch_size: int = Field(16, ge=1)
    max_decoding_step: int | None = Field(None, ge=8, description="caption decoding cap; default: the model's")
    max_samples: int | None = Field(None, ge=1, description="evaluate only the first N captions")
    no_detection: bool | None = Field(
        None, description="skip the grounding (box) metrics, as UniTAB's --no_detection switches its evaluator; "
        "default: the trained model's own no_detection")
    captioning: bool = True
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the random-box baseline")


STAGES = [
    StageSpec(
        name="unitab.pretrain",
        entry="vlflow.stages.unitab.train:pretrain",
        params=PretrainParams,
        inputs=("arrows",),
        # mixed: grounding arrows of MDETR's mixed COCO/VG data (arrow.grounding_mixed), whose train split is added
        # to the Flickr30k train split (UniTAB's combine_datasets [flickr, mixed])
        optional_inputs=("tokenizer", "mixed"),
        distributed=True,
        resumable=True,
        description="UniTAB pretraining (text+box sequence, token CE, EMA) on grounding arrows",
    ),
    StageSpec(
        name="unitab.finetune_grounding",
        entry="vlflow.stages.unitab.train:finetune_grounding",
        params=FinetuneGroundingParams,
        inputs=("arrows", "model"),
        distributed=True,
        resumable=True,
        description="UniTAB Flickr30k grounding fine-tuning (caption in the encoder, grounded sequence out) from a "
                    "unitab.pretrain model",
    ),
    StageSpec(
        name="unitab.evaluate",
        entry="vlflow.stages.unitab.evaluate:evaluate",
        params=EvaluateParams,
        inputs=("arrows", "model"),
        distributed=True,  # ranks share the captions and images; no training, so the booster goes unused
        description="phrase grounding R@1: the paper's MERGED protocol with free decoding, and the ANY-BOX "
                    "recall with oracle phrases (+ random/centre baselines); caption BLEU-4/CIDEr-D",
    ),
]
