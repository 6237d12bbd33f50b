"""`unitab.pretrain`: UniTAB sequence pretraining under the Colossal-AI booster, with EMA, resumable.

Read top to bottom: tokenizer -> model (+EMA copy) -> optimizer groups -> schedule -> data -> boost -> resume ->
loop (accumulate micro-batches, clip, step, EMA) -> checkpoints -> outputs.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from vlflow.errors import StageError
from vlflow.stage import StageContext
from vlflow.stages.common.training import (
    MetricsLogger, ResumableSampler, accumulation_steps, latest_checkpoint, load_checkpoint, save_checkpoint,
    seed_everything, step_seed,
)

from .data import GroundingSequenceDataset, collate, open_split
from .model import UniTAB, UniTABConfig, ema_update, sequence_loss


def load_tokenizer(ctx: StageContext):
    source = ctx.inputs.get("tokenizer") or ctx.params.text_encoder
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load tokenizer from {source}: {exc}", field="inputs.tokenizer") from None


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


def parameter_groups(model: UniTAB, params) -> list[dict]:
    """UniTAB/MDETR: backbone and text encoder get their own learning rates; lr 0 freezes them."""
    for module, lr in ((model.backbone, params.lr_backbone), (model.text_encoder, params.text_encoder_lr)):
        if lr == 0:
            module.requires_grad_(False)
    groups = {"backbone": [], "text_encoder": [], "rest": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[name.split(".")[0] if name.split(".")[0] in groups else "rest"].append(param)
    return [{"params": groups["rest"], "lr": params.lr},
            {"params": groups["backbone"], "lr": params.lr_backbone},
            {"params": groups["text_encoder"], "lr": params.text_encoder_lr}]


def linear_warmup_decay(total_steps: int, warmup: float):
    warmup_steps = int(warmup) if warmup >= 1 else int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


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
    world, rank = ctx.world_size, ctx.rank
    seed_everything(p.seed, rank)
    if world > 1:  # ranks share the machine's cores (CPU/gloo runs)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    tokenizer = load_tokenizer(ctx)
    config = model_config(p, tokenizer)
    model = UniTAB(config, backbone_weights=p.backbone_weights)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if p.ema else None
    optimizer = torch.optim.AdamW(parameter_groups(model, p), lr=p.lr, weight_decay=p.weight_decay)

    # data: global batch = per_device x world x accumulation; the order is a function of (seed, batch index)
    accumulation = accumulation_steps(p.batch_size, p.per_device_batch_size, world)
    dataset = GroundingSequenceDataset(
        open_split(ctx.inputs["arrows"], "train"), tokenizer, config.layout, image_size=p.image_size,
        max_image_size=p.max_image_size, max_decoding_step=p.max_decoding_step, seqcrop=p.pretrain_seqcrop,
        do_caption=p.do_caption, no_detection=p.no_detection, seed=p.seed)
    sampler = ResumableSampler(len(dataset), p.per_device_batch_size, rank, world, seed=p.seed)
    total_steps = p.max_steps or max(1, p.epochs * sampler.batches_per_epoch // accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total_steps, p.warmup))

    if ctx.booster is not None:
        model, optimizer, _, _, scheduler = ctx.booster.boost(model, optimizer, lr_scheduler=scheduler)
    raw_model = model.unwrap() if hasattr(model, "unwrap") else model

    step = 0
    resumed = load_checkpoint(ctx, model, optimizer, scheduler) if ctx.booster is not None else None
    if resumed is not None:
        step = resumed[0]
        ema_file = latest_checkpoint(ctx) / "ema.pt"
        if ema_model is not None and ema_file.is_file():
            ema_model.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True))
        elif ema_model is not None:  # as UniTAB does when a checkpoint has no EMA
            ctx.log.warning("checkpoint has no ema.pt: EMA restarts from the current weights")
            ema_model.load_state_dict(raw_model.state_dict())

    sampler.start_batch = step * accumulation
    loader = iter(DataLoader(dataset, batch_sampler=EpochTagged(sampler), num_workers=p.num_workers,
                             collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id)))
    logger = MetricsLogger(ctx)
    model.train()
    loss_value, epoch, started = float("nan"), 0, time.time()
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros(())
        for micro in range(accumulation):
            batch = next(loader)
            torch.manual_seed(step_seed(p.seed, step, micro, rank))  # dropout: the same after a resume
            epoch = batch["epoch"]
            logits = model(batch["images"], batch["image_mask"], batch["text_ids"], batch["text_mask"],
                           batch["prev_tokens"], batch["token_padding"])
            loss = sequence_loss(logits, batch["targets"]) / accumulation
            if ctx.booster is None:
                loss.backward()
            elif micro < accumulation - 1:  # no gradient all-reduce until the last micro-batch
                with ctx.booster.no_sync(model, optimizer):
                    ctx.booster.backward(loss, optimizer)
            else:
                ctx.booster.backward(loss, optimizer)
            step_loss += loss.detach()
        if p.clip_max_norm > 0:
            if hasattr(optimizer, "clip_grad_by_norm"):
                optimizer.clip_grad_by_norm(p.clip_max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), p.clip_max_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        if ema_model is not None:
            ema_update(ema_model, raw_model, p.ema_decay)

        if step % p.log_every == 0 or step == total_steps:
            if dist.is_initialized():
                dist.all_reduce(step_loss)
                step_loss /= world
            loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                raise StageError(f"loss became {loss_value} at step {step}; lower lr or check the data")
            logger.log(step, loss=loss_value, lr=scheduler.get_last_lr()[0], epoch=epoch,
                       elapsed_s=round(time.time() - started, 2))
            ctx.log.info("step %d/%d loss %.4f", step, total_steps, loss_value)
        if ctx.booster is not None and step % p.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(ctx, model, optimizer, scheduler, step, write_files=None if ema_model is None else
                            lambda directory: torch.save(ema_model.state_dict(), directory / "ema.pt"))
    logger.close()

    if ctx.is_main:
        save_outputs(ctx.output_dir, raw_model, ema_model, config, tokenizer, p)
    return {"steps": step, "final_loss": loss_value, "global_batch": p.batch_size, "accumulation": accumulation,
            "train_captions": len(dataset), "train_seconds": round(time.time() - started, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Outputs

def save_outputs(output_dir: Path, model: UniTAB, ema_model, config: UniTABConfig, tokenizer, params) -> None:
    """model.pt / ema.pt (state dicts), config.json (rebuilds the network without the hub), tokenizer/."""
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output_dir / "model.pt")
    if ema_model is not None:
        torch.save(ema_model.state_dict(), output_dir / "ema.pt")
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

