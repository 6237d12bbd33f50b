"""`unitab.pretrain` and `unitab.finetune_grounding`: UniTAB sequence training with EMA, by the shared `fit` loop
(stages/common/fit.py).

Read top to bottom: tokenizer -> model (same initial weights on every rank: a fresh/MDETR-initialised one for
pretraining, the pretrained one for fine-tuning) + EMA -> optimizer groups -> schedule -> data -> fit (accumulation,
clipping, EMA after each step, checkpoints with ema.pt, resume) -> outputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from colossalai.accelerator import get_accelerator
from torch.utils.data import DataLoader
from transformers import AutoTokenizer
from vlflow.stages.common.export import trained_module
from vlflow.stages.common.fit import Ema, FitSettings, TrainTask, cpu_state_dict, fit, make_adamw
from vlflow.stages.common.training import (
    ResumableSampler,
    accumulation_steps,
    configure_determinism,
    load_tokenizer,
    seed_everything,
)

from vlflow.errors import StageError
from vlflow.stage import StageContext

from .data import GroundingSequenceDataset, collate, open_train_sources
from .model import BackboneWeightsError, CheckpointError, UniTAB, UniTABConfig, load_checkpoint, sequence_loss

MODEL_INPUTS = ("images", "image_mask", "text_ids", "text_mask", "prev_tokens", "token_padding")


def model_config(params, tokenizer) -> UniTABConfig:
    text_encoder_config = None
    if params.text_encoder_config is not None:  # a fresh small RoBERTa sized to the (local) tokenizer
        text_encoder_config = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                               **params.text_encoder_config}
    return UniTABConfig(
        text_vocab=len(tokenizer), backbone=params.backbone, backbone_feature_level=params.backbone_feature_level,
        backbone_norm=params.backbone_norm, text_encoder=params.text_encoder,
        text_encoder_config=text_encoder_config, d_model=params.d_model, enc_layers=params.enc_layers,
        dec_layers=params.dec_layers, nheads=params.nheads, dim_feedforward=params.dim_feedforward,
        dropout=params.dropout, num_queries=params.num_queries, max_decoding_step=params.max_decoding_step,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def parameter_groups(model: UniTAB, params, freeze_backbone_stem: bool) -> list[dict]:
    """UniTAB/MDETR: backbone and text encoder get their own learning rates; lr 0 freezes them; the backbone's stem
    and layer1 are frozen (freeze_backbone_stem)."""
    if freeze_backbone_stem:
        model.backbone.freeze_stem_and_layer1()
    for module, lr in ((model.backbone, params.lr_backbone), (model.text_encoder, params.text_encoder_lr)):
        if lr == 0:
            module.requires_grad_(False)
    groups = {"backbone": [], "text_encoder": [], "rest": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[name.split(".")[0] if name.split(".")[0] in groups else "rest"].append(param)
    return [{"params": groups["rest"], "lr": params.lr, "name": "transformer"},
            {"params": groups["backbone"], "lr": params.lr_backbone, "name": "backbone"},
            {"params": groups["text_encoder"], "lr": params.text_encoder_lr, "name": "text_encoder"}]


class UnitabLrFactor:
    """UniTAB's `adjust_learning_rate` (util/optim.py) for one parameter group, as a LambdaLR factor of the optimizer
    step: the text encoder warms up linearly from 0 over round(warmup * total) steps, then decays linearly to 0;
    transformer and backbone get 0.1 ** (epoch // lr_drop) (linear_with_warmup) or the text encoder's factor too
    (all_linear_with_warmup). A callable object, so the schedule's checkpointed state names it."""

    def __init__(self, group: str, schedule: str, total_steps: int, warmup: float, lr_drop: int,
                 batches_per_epoch: int, accumulation: int):
        self.group, self.schedule, self.total_steps = group, schedule, total_steps
        self.warmup_steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
        self.lr_drop, self.batches_per_epoch, self.accumulation = lr_drop, batches_per_epoch, accumulation

    def linear(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def __call__(self, step: int) -> float:
        if self.group == "text_encoder" or self.schedule == "all_linear_with_warmup":
            return self.linear(step)
        epoch = step * self.accumulation // max(1, self.batches_per_epoch)  # the epoch this step's batches are in
        return 0.1 ** (epoch // self.lr_drop)


def unitab_schedule(optimizer, params, total_steps: int, batches_per_epoch: int, accumulation: int):
    """One LambdaLR factor per parameter group (rest = transformer, backbone, text_encoder; see parameter_groups)."""
    factors = [UnitabLrFactor(group["name"], params.lr_schedule, total_steps, params.warmup, params.lr_drop,
                              batches_per_epoch, accumulation) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class EpochTagged:
    """Batches of (index, epoch) from a ResumableSampler: the epoch seeds the per-sample sequence crop, so a
    resumed run makes the same choices as an uninterrupted one."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self):
        for batch_index, indices in enumerate(self.sampler, start=self.sampler.start_batch):
            epoch = self.sampler.epoch_of(batch_index)
            yield [(i, epoch) for i in indices]


def pretrain(ctx: StageContext) -> dict:
    p = ctx.params
    configure_determinism(ctx.world_size)
    seed_everything(p.seed)  # the same initial weights on every rank: ZeRO/Gemini do not broadcast them

    tokenizer = load_tokenizer(ctx.inputs, p.text_encoder, field="inputs.tokenizer")
    config = model_config(p, tokenizer)
    try:
        model = UniTAB(config, backbone_weights=p.backbone_weights)
    except BackboneWeightsError as exc:
        raise StageError(str(exc), file=p.backbone_weights, field="with.backbone_weights") from None
    extra = {}
    if p.init_checkpoint:
        extra["init_checkpoint"] = initialise_from_checkpoint(ctx, model, p)
    sources = open_train_sources(ctx.inputs["arrows"], ctx.inputs.get("mixed"))
    result = train_sequences(ctx, p, model, config, tokenizer, sources, seqcrop=p.pretrain_seqcrop,
                             do_caption=p.do_caption, freeze_backbone_stem=p.freeze_backbone_stem)
    return {**result, **extra}


def initialise_from_checkpoint(ctx: StageContext, model: UniTAB, p) -> dict:
    """UniTAB's --load from an MDETR/UniTAB checkpoint; logs (and keeps in init_checkpoint.json) what loaded and what
    not. A frozen-BN backbone must come from the file in full (frozen random statistics normalise nothing)."""
    try:
        report = load_checkpoint(model, p.init_checkpoint)
    except CheckpointError as exc:
        raise StageError(str(exc), file=p.init_checkpoint, field="with.init_checkpoint") from None
    if ctx.is_main:
        report.log_to(ctx.log)
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        (ctx.output_dir / "init_checkpoint.json").write_text(json.dumps(report.as_dict(), indent=1))
    if (p.backbone_norm == "frozen_bn" or p.freeze_backbone_stem) and not report.covers("backbone."):
        missing = next(name for name in report.not_initialised if name.startswith("backbone."))
        raise StageError(f"init_checkpoint {p.init_checkpoint} does not hold the whole backbone (e.g. {missing}): "
                         "frozen BatchNorm / a frozen stem need pretrained weights; add backbone_weights or train the "
                         "backbone from scratch (backbone_norm: batch_norm, freeze_backbone_stem: false)",
                         file=p.init_checkpoint, field="with.init_checkpoint")
    return {"loaded": len(report.loaded), "skipped": len(report.skipped),
            "not_initialised": len(report.not_initialised)}


def finetune_grounding(ctx: StageContext) -> dict:
    """UniTAB's Flickr30k grounding fine-tuning (--do_flickrgrounding, configs/flickr.json): the pretrained model
    (its EMA weights, as UniTAB's --load) learns to copy the caption and insert each phrase's box."""
    p = ctx.params
    configure_determinism(ctx.world_size)
    seed_everything(p.seed)
    model, tokenizer, config, used_ema = load_trained(ctx.inputs["model"], p.start_from_ema)
    model.train()
    if p.freeze_backbone_stem is None:  # as the pretrained model was trained (saved with the model)
        pretrained = json.loads((Path(ctx.inputs["model"]) / "config.json").read_text())["train_params"]
        p = p.model_copy(update={"freeze_backbone_stem": bool(pretrained.get("freeze_backbone_stem", True))})
    sources = open_train_sources(ctx.inputs["arrows"], None)
    result = train_sequences(ctx, p, model, config, tokenizer, sources, seqcrop="grounding", do_caption=False,
                             freeze_backbone_stem=p.freeze_backbone_stem)
    return {**result, "started_from": "ema.pt" if used_ema else "model.pt"}


def train_sequences(ctx: StageContext, p, model: UniTAB, config: UniTABConfig, tokenizer, sources, *, seqcrop: str,
                    do_caption: bool, freeze_backbone_stem: bool) -> dict:
    """The one UniTAB training loop: EMA, parameter groups, UniTAB's schedule, the grounded sequences of `sources`
    (grounding arrows, concatenated), fit, outputs (`p`: the stage's training params, saved with the model)."""
    world, rank = ctx.world_size, ctx.rank
    hooks = [Ema(model, p.ema_decay)] if p.ema else []
    optimizer = make_adamw(ctx, parameter_groups(model, p, freeze_backbone_stem), lr=p.lr, betas=(0.9, 0.999),
                           weight_decay=p.weight_decay)
    seed_everything(p.seed, rank)  # from here on each rank draws its own stream

    # data: global batch = per_device x world x accumulation; the order is a function of (seed, batch index)
    accumulation = accumulation_steps(p.batch_size, p.per_device_batch_size, world)
    dataset = GroundingSequenceDataset(
        sources, tokenizer, config.layout, image_size=p.image_size,
        max_image_size=p.max_image_size, max_decoding_step=config.max_decoding_step, seqcrop=seqcrop,
        do_caption=do_caption, box_targets=p.box_targets, augment=p.augment, seed=p.seed)
    batches_per_epoch = ResumableSampler(len(dataset), p.per_device_batch_size, rank, world).batches_per_epoch
    total_steps = p.max_steps or max(1, p.epochs * batches_per_epoch // accumulation)
    scheduler = unitab_schedule(optimizer, p, total_steps, batches_per_epoch, accumulation)
    pin_memory = get_accelerator().name == "cuda"

    def batches(start_batch: int):
        sampler = ResumableSampler(len(dataset), p.per_device_batch_size, rank, world, seed=p.seed,
                                   start_batch=start_batch)
        return DataLoader(dataset, batch_sampler=EpochTagged(sampler), num_workers=p.num_workers,
                          collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id), pin_memory=pin_memory)

    settings = FitSettings(max_steps=total_steps, accumulation=accumulation, seed=p.seed, grad_clip=p.grad_clip,
                           log_every=p.log_every, checkpoint_every=p.checkpoint_every)
    result = fit(ctx, model, optimizer, scheduler, sequence_task(), batches, settings, hooks)

    trained = trained_module(result.model, result.optimizer, ctx.is_main)  # full fp32 weights, on rank 0
    if ctx.is_main:
        save_outputs(ctx.output_dir, trained, hooks[0].model if hooks else None, config, tokenizer, p)
    return {"steps": result.step, "final_loss": result.metrics.get("loss", float("nan")),
            "global_batch": p.batch_size, "accumulation": accumulation, "train_captions": len(dataset)}


def sequence_task() -> TrainTask:
    """Teacher-forced token cross-entropy over the grounded sequence."""

    def losses(model, batch: dict) -> dict:
        logits = model(*(batch[key] for key in MODEL_INPUTS))
        return {"loss": sequence_loss(logits, batch["targets"])}

    return TrainTask(losses=losses, prepare=lambda batch, generator: {k: batch[k] for k in (*MODEL_INPUTS, "targets")})


# ---------------------------------------------------------------------------------------------------------------
# Outputs

def save_outputs(output_dir: Path, model: UniTAB, ema_model, config: UniTABConfig, tokenizer, params) -> None:
    """model.pt / ema.pt (state dicts), config.json (rebuilds the network without the hub), tokenizer/."""
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(cpu_state_dict(model), output_dir / "model.pt")
    if ema_model is not None:
        torch.save(cpu_state_dict(ema_model), output_dir / "ema.pt")
    saved = asdict(config)
    # the text encoder is rebuilt from its config, its weights come from model.pt
    saved["text_encoder_config"] = model.text_encoder.config.to_dict()
    (output_dir / "config.json").write_text(json.dumps(
        {"model": saved, "train_params": params.model_dump(mode="json")}, indent=1))
    tokenizer.save_pretrained(str(output_dir / "tokenizer"))


def load_trained(model_dir: Path, use_ema: bool = True) -> tuple[UniTAB, object, UniTABConfig, bool]:
    """Rebuild a saved model for inference. Returns (model, tokenizer, config, whether EMA weights were used)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise StageError("no config.json: not a unitab.pretrain output", file=str(model_dir), field="inputs.model")
    config = UniTABConfig(**json.loads(config_path.read_text())["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    model = UniTAB(config)
    weights = model_dir / ("ema.pt" if use_ema and (model_dir / "ema.pt").is_file() else "model.pt")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), tokenizer, config, weights.name == "ema.pt"

