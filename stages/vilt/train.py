"""`vilt.pretrain`, `vilt.finetune_retrieval` and `vilt.finetune_vqa`: one training loop, read top to bottom.

Runs under the distributed worker (ctx.booster is a Colossal-AI Booster). The global batch is reached by gradient
accumulation; checkpoints go to ctx.work_dir every `checkpoint_every` steps, and a restarted run continues at the
saved step with the same data order, masks and negatives (all drawn from generators seeded by seed/step/rank).
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Callable

import torch
from colossalai.accelerator import get_accelerator
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from vlflow.errors import StageError
from vlflow.stage import StageContext
from vlflow.stages.common.training import (MetricsLogger, ResumableSampler, accumulation_steps, load_checkpoint,
                                           save_checkpoint, step_seed)
from vlflow.stages.vilt.data import (CaptionPairs, MlmMasker, PairCollator, QuestionCollator, QuestionPairs,
                                     image_dataset, load_answers, load_tokenizer, swap_images_for_itm, tokenize,
                                     vqa_dataset)
from vlflow.stages.vilt.model import (ViltPretrainingModel, ViltRetrievalTrainingModel, ViltVqaTrainingModel,
                                      build_config, load_vit_weights, retrieval_model_from_pretraining,
                                      vqa_model_from_pretraining)


# ---------------------------------------------------------------------------------------------------------------
# Stage entry points

def pretrain(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)  # same initial weights on every rank
    tokenizer = load_tokenizer(ctx.inputs, p.tokenizer)
    if p.init_from:
        model = ViltPretrainingModel.from_pretrained(p.init_from, p.tasks)
        if model.config.vocab_size < len(tokenizer):
            raise StageError(f"{p.init_from} has {model.config.vocab_size} word embeddings, the tokenizer "
                             f"{len(tokenizer)} tokens", field="with.init_from")
    else:
        model = ViltPretrainingModel(build_config(p, len(tokenizer), tokenizer.pad_token_id), p.tasks)
        if p.vit_init:
            load_vit_weights(model.vilt, p.vit_init)
    masker = MlmMasker(tokenizer, p.mlm_prob, p.whole_word_masking) if "mlm" in p.tasks else None
    wpa_weight = p.wpa_weight if p.itm_wpa else 0.0

    def step_losses(model, batch: dict, generator: torch.Generator) -> dict:
        mlm_batch = masker(batch, generator) if masker is not None else None
        itm_batch = swap_images_for_itm(batch, generator) if "itm" in p.tasks else None
        return model(mlm_batch=mlm_batch, itm_batch=itm_batch, wpa_weight=wpa_weight)

    return train(ctx, model, tokenizer, step_losses, save_model=lambda m, out: m.save(out))


def finetune_retrieval(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)
    pretrained_dir = ctx.inputs["pretrained"]
    tokenizer = load_tokenizer({"tokenizer": pretrained_dir / "tokenizer", **ctx.inputs}, p.tokenizer)
    model = ViltRetrievalTrainingModel(retrieval_model_from_pretraining(pretrained_dir / "model"))
    dataset = CaptionPairs(image_dataset(ctx.inputs["arrows"], "train", p.image_size, p.max_image_size))
    all_captions = [(i, dataset.images.captions(i)[j]) for i, j in dataset.pairs]  # (image index, caption)

    def step_losses(model, batch: dict, generator: torch.Generator) -> dict:
        texts = []
        for image_index, text in zip(batch["image_index"].tolist(), batch["text"]):
            texts.append(text)
            while len(texts) % (1 + p.false_texts):  # ViLT's draw_false_text: captions of other images
                other_image, caption = all_captions[int(torch.randint(len(all_captions), (1,), generator=generator))]
                if other_image != image_index:
                    texts.append(caption)
        tokens = tokenize(tokenizer, texts, p.max_text_len)
        device = batch["pixel_values"].device
        return model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"],
                     input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))

    return train(ctx, model, tokenizer, step_losses, save_model=lambda m, out: m.retrieval.save_pretrained(out),
                 dataset=dataset)


def finetune_vqa(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)
    pretrained_dir = ctx.inputs["pretrained"]
    tokenizer = load_tokenizer({"tokenizer": pretrained_dir / "tokenizer", **ctx.inputs}, p.tokenizer)
    answers = load_answers(ctx.inputs["arrows"])
    model = ViltVqaTrainingModel(vqa_model_from_pretraining(pretrained_dir / "model", answers))
    dataset = QuestionPairs(vqa_dataset(ctx.inputs["arrows"], p.train_splits, p.image_size, p.max_image_size))

    def step_losses(model, batch: dict, generator: torch.Generator) -> dict:
        return model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], targets=batch["targets"])

    return train(ctx, model, tokenizer, step_losses, save_model=lambda m, out: m.vqa.save_pretrained(out),
                 dataset=dataset, collate=QuestionCollator(tokenizer, p.max_text_len, len(answers)),
                 head_lr_mult={"vqa.classifier.": p.head_lr_mult})


# ---------------------------------------------------------------------------------------------------------------
# The shared loop

def decay_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 head_lr_mult: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups as ViLT: no weight decay on biases and LayerNorm weights; parameters whose name starts with a
    `head_lr_mult` prefix train at lr x its multiplier (ViLT's lr_mult for new task heads)."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            mult = next((m for prefix, m in (head_lr_mult or {}).items() if name.startswith(prefix)), 1.0)
            decays = not (name.endswith("bias") or id(param) in no_decay)
            groups.setdefault((decays, mult), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * mult}
            for (decays, mult), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))]


def warmup_steps(warmup: int | float, max_steps: int) -> int:
    """`warmup_steps` param: a float below 1 is a fraction of max_steps (ViLT's warmup ratio), else a step count."""
    return int(warmup * max_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)


def train(ctx: StageContext, model: torch.nn.Module, tokenizer, step_losses: Callable, save_model: Callable,
          dataset: torch.utils.data.Dataset | None = None, collate: Callable | None = None,
          head_lr_mult: dict[str, float] | None = None) -> dict:
    p = ctx.params
    booster = ctx.booster
    if booster is None:
        raise StageError(f"{ctx.stage} is a distributed stage; run it through the launcher (vlflow run)")
    device = get_accelerator().get_current_device()
    accum = accumulation_steps(p.batch_size, p.per_device_batch_size, ctx.world_size)
    if dataset is None:
        dataset = CaptionPairs(image_dataset(ctx.inputs["arrows"], "train", p.image_size, p.max_image_size))

    optimizer = torch.optim.AdamW(decay_groups(model, p.weight_decay, p.lr, head_lr_mult), lr=p.lr,
                                  betas=tuple(p.betas))
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(p.warmup_steps, p.max_steps), p.max_steps)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    resumed = load_checkpoint(ctx, model, optimizer, scheduler)
    step = resumed[0] if resumed else 0

    # the data order is a function of (seed, batch index): resuming continues with the batches a full run would see
    sampler = ResumableSampler(len(dataset), p.per_device_batch_size, ctx.rank, ctx.world_size, p.seed,
                               start_batch=step * accum)
    loader = iter(DataLoader(dataset, batch_sampler=sampler,
                             collate_fn=collate or PairCollator(tokenizer, p.max_text_len), num_workers=p.num_workers))
    ctx.log.info("training %s: %.1fM params, steps %d..%d, global batch %d = %d per device x %d ranks x %d accum",
                 ctx.stage, sum(x.numel() for x in model.parameters()) / 1e6, step, p.max_steps,
                 p.per_device_batch_size * ctx.world_size * accum, p.per_device_batch_size, ctx.world_size, accum)

    model.train()
    window: dict[str, list[float]] = {}
    window_start, window_samples = time.perf_counter(), 0
    last: dict = {}
    with MetricsLogger(ctx) as metrics:
        while step < p.max_steps:
            for micro in range(accum):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(loader).items()}
                # masks, negatives, patch sampling and dropout depend only on (seed, step, micro-batch, rank), so a
                # resumed run draws the same ones as an uninterrupted run
                seed = step_seed(p.seed, step, micro, ctx.rank)
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                last_micro = micro == accum - 1  # gradients are all-reduced on the last micro-batch only
                with nullcontext() if last_micro else booster.no_sync(model, optimizer):
                    out = step_losses(model, batch, generator)
                    booster.backward(out["loss"] / accum, optimizer)
                for key, value in out.items():
                    window.setdefault(key, []).append(float(value))
                window_samples += len(batch["pixel_values"]) * ctx.world_size
            if p.grad_clip > 0:
                optimizer.clip_grad_by_norm(p.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1

            if step % p.log_every == 0 or step == p.max_steps:
                elapsed = time.perf_counter() - window_start
                last = {k: sum(v) / len(v) for k, v in window.items()}  # rank 0's values
                last.update(lr=scheduler.get_last_lr()[0], samples_per_s=window_samples / max(elapsed, 1e-9))
                metrics.log(step, **last)
                ctx.log.info("step %d/%d %s", step, p.max_steps, " ".join(f"{k}={v:.4g}" for k, v in last.items()))
                window, window_start, window_samples = {}, time.perf_counter(), 0
            if step % p.checkpoint_every == 0 and step < p.max_steps:
                save_checkpoint(ctx, model, optimizer, scheduler, step)

    if ctx.is_main:
        save_model(model.unwrap(), ctx.output_dir / "model")
        tokenizer.save_pretrained(str(ctx.output_dir / "tokenizer"))
        params = p.model_dump(mode="json")
        params["tokenizer"] = "tokenizer"  # the copy saved beside the model
        (ctx.output_dir / "params.json").write_text(json.dumps(params, indent=2))
    return {"step": step, **last}
