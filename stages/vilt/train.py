"""`vilt.pretrain`, `vilt.finetune_retrieval` and `vilt.finetune_vqa`: each builds its model and a `TrainTask`
(host-side random choices + device-side losses) and trains it with the shared `fit` loop (stages/common/fit.py):
gradient accumulation to the global batch, clipping, checkpoints in ctx.work_dir every `checkpoint_every` steps, and a
restarted run continues at the saved step with the same data order, masks and negatives (drawn from generators seeded
by seed/step/micro-batch/rank) and the same per-sample draws (RandAugment, ITM false images: seeded by the sampler's
per-position seeds).
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from colossalai.accelerator import get_accelerator
from torch.utils.data import DataLoader
from vlflow.stages.common.export import trained_module
from vlflow.stages.common.fit import FitSettings, TrainTask, fit, make_adamw, training_steps, warmup_linear_schedule
from vlflow.stages.common.training import ResumableSampler, accumulation_steps, configure_determinism
from vlflow.stages.data.transforms import PixelDecoding
from vlflow.stages.vilt.data import (
    CaptionPairs,
    MlmMasker,
    PairCollator,
    QuestionCollator,
    QuestionPairs,
    device_pixels,
    false_image_itm_pixels,
    image_dataset,
    itm_labels_for_false_images,
    itm_negatives,
    load_answers,
    load_tokenizer,
    tokenize,
    train_augment,
    vqa_dataset,
)
from vlflow.stages.vilt.model import (
    ViltPretrainingModel,
    ViltRetrievalTrainingModel,
    ViltVqaTrainingModel,
    build_config,
    load_vit_weights,
    retrieval_model_from_pretraining,
    vqa_model_from_pretraining,
)
from vlflow.stages.vilt.pretrain_data import pretraining_images

from vlflow.errors import StageError
from vlflow.stage import StageContext

IMAGE_KEYS = ("pixel_values", "pixel_mask")


# ---------------------------------------------------------------------------------------------------------------
# Stage entry points

def pretrain(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)  # same initial weights on every rank (ZeRO/Gemini do not broadcast them)
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
    task = pretrain_task(tokenizer, p.tasks, p.mlm_prob, p.whole_word_masking, p.wpa_weight if p.itm_wpa else 0.0,
                         max_text_len=p.max_text_len)
    false_images = "itm" in p.tasks and p.itm_negatives == "dataset"
    dataset = CaptionPairs(pretraining_images(ctx.inputs, p.image_size, p.max_image_size,
                                              PixelDecoding(p.image_decoding)),
                           augment=train_augment(p.train_transform), false_images=false_images)
    return train(ctx, model, tokenizer, task, save_model=lambda m, out: m.save(out), dataset=dataset)


def pretrain_task(tokenizer, tasks, mlm_prob: float, whole_word: bool, wpa_weight: float,
                  max_text_len: int | None = None) -> TrainTask:
    """MLM (masks drawn on the host) and ITM (which positions are negatives drawn on the host; their images are the
    items' false images when the batch has them (CaptionPairs(false_images=True), ViLT's way), else other images of
    the batch, gathered on the device). `max_text_len`: the length ViLT pads every caption to, which sets its
    whole-word masking budget."""
    masker = MlmMasker(tokenizer, mlm_prob, whole_word, padded_length=max_text_len) if "mlm" in tasks else None
    itm = "itm" in tasks

    def prepare(batch: dict, generator: torch.Generator) -> dict:
        prepared = {k: batch[k] for k in (*IMAGE_KEYS, "input_ids", "attention_mask")}
        if masker is not None:
            masked = masker(batch, generator)
            prepared.update(mlm_input_ids=masked["input_ids"], mlm_labels=masked["labels"])
        if itm and "false_pixel_values" in batch:
            prepared.update(itm_labels=itm_labels_for_false_images(batch, generator),
                            false_pixel_values=batch["false_pixel_values"], false_pixel_mask=batch["false_pixel_mask"])
        elif itm:
            prepared["itm_image_order"], prepared["itm_labels"] = itm_negatives(batch, generator)
        return prepared

    def losses(model, batch: dict) -> dict:
        itm_batch = None
        if itm and "false_pixel_values" in batch:  # chosen among the uint8 images, then normalised
            pixel_values, pixel_mask = false_image_itm_pixels(batch)
        batch = device_pixels(batch)
        if itm:
            if "false_pixel_values" not in batch:
                order = batch["itm_image_order"]
                pixel_values = batch["pixel_values"].index_select(0, order)
                pixel_mask = batch["pixel_mask"].index_select(0, order)
            itm_batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "input_ids": batch["input_ids"],
                         "attention_mask": batch["attention_mask"], "itm_labels": batch["itm_labels"]}
        mlm_batch = None
        if masker is not None:
            mlm_batch = {**{k: batch[k] for k in (*IMAGE_KEYS, "attention_mask")},
                         "input_ids": batch["mlm_input_ids"], "labels": batch["mlm_labels"]}
        return model(mlm_batch=mlm_batch, itm_batch=itm_batch, wpa_weight=wpa_weight)

    return TrainTask(losses=losses, prepare=prepare)


def finetune_retrieval(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)
    pretrained_dir = ctx.inputs["pretrained"]
    tokenizer = load_tokenizer({"tokenizer": pretrained_dir / "tokenizer", **ctx.inputs}, p.tokenizer)
    model = ViltRetrievalTrainingModel(retrieval_model_from_pretraining(pretrained_dir / "model",
                                                                        max_image_len=p.max_image_len))
    dataset = CaptionPairs(image_dataset(ctx.inputs["arrows"], "train", p.image_size, p.max_image_size,
                                         PixelDecoding(p.image_decoding)),
                           augment=train_augment(p.train_transform))
    task = retrieval_task(tokenizer, dataset, p.false_texts, p.max_text_len)
    return train(ctx, model, tokenizer, task, save_model=lambda m, out: m.retrieval.save_pretrained(out),
                 dataset=dataset)


def retrieval_task(tokenizer, dataset: CaptionPairs, false_texts: int, max_text_len: int) -> TrainTask:
    """Each image with its caption and `false_texts` captions of other images (drawn and tokenised on the host)."""
    all_captions = [(i, dataset.images.captions(i)[j]) for i, j in dataset.pairs]  # (image index, caption)

    def prepare(batch: dict, generator: torch.Generator) -> dict:
        texts = []
        for image_index, text in zip(batch["image_index"].tolist(), batch["text"]):
            texts.append(text)
            while len(texts) % (1 + false_texts):  # ViLT's draw_false_text: captions of other images
                other_image, caption = all_captions[int(torch.randint(len(all_captions), (1,), generator=generator))]
                if other_image != image_index:
                    texts.append(caption)
        tokens = tokenize(tokenizer, texts, max_text_len)
        return {**{k: batch[k] for k in IMAGE_KEYS}, "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"]}

    return TrainTask(losses=lambda model, batch: model(**device_pixels(batch)), prepare=prepare)


def finetune_vqa(ctx: StageContext) -> dict:
    p = ctx.params
    torch.manual_seed(p.seed)
    pretrained_dir = ctx.inputs["pretrained"]
    tokenizer = load_tokenizer({"tokenizer": pretrained_dir / "tokenizer", **ctx.inputs}, p.tokenizer)
    answers = load_answers(ctx.inputs["arrows"])
    model = ViltVqaTrainingModel(vqa_model_from_pretraining(pretrained_dir / "model", answers,
                                                            max_image_len=p.max_image_len))
    dataset = QuestionPairs(vqa_dataset(ctx.inputs["arrows"], p.train_splits, p.image_size, p.max_image_size,
                                        PixelDecoding(p.image_decoding)),
                            augment=train_augment(p.train_transform))
    return train(ctx, model, tokenizer, vqa_task(), save_model=lambda m, out: m.vqa.save_pretrained(out),
                 dataset=dataset, collate=QuestionCollator(tokenizer, p.max_text_len, len(answers), normalize=False),
                 head_lr_mult={"vqa.classifier.": p.head_lr_mult})


def vqa_task() -> TrainTask:
    keys = (*IMAGE_KEYS, "input_ids", "attention_mask", "targets")
    return TrainTask(losses=lambda model, batch: model(**device_pixels(batch)),
                     prepare=lambda batch, generator: {k: batch[k] for k in keys})


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


def train(ctx: StageContext, model: torch.nn.Module, tokenizer, task: TrainTask, save_model: Callable,
          dataset: torch.utils.data.Dataset, collate: Callable | None = None,
          head_lr_mult: dict[str, float] | None = None) -> dict:
    p = ctx.params
    configure_determinism(ctx.world_size)
    accum = accumulation_steps(p.batch_size, p.per_device_batch_size, ctx.world_size)
    optimizer = make_adamw(ctx, decay_groups(model, p.weight_decay, p.lr, head_lr_mult), lr=p.lr, betas=p.betas,
                           weight_decay=p.weight_decay)
    batches_per_epoch = ResumableSampler(len(dataset), p.per_device_batch_size, ctx.rank,
                                         ctx.world_size).batches_per_epoch
    max_steps = training_steps(p.max_steps, p.max_epochs, batches_per_epoch, accum)
    if p.max_steps is None:
        ctx.log.info("%d epochs of %d pairs at batch %d: %d optimizer steps", p.max_epochs, len(dataset),
                     p.batch_size, max_steps)
    scheduler = warmup_linear_schedule(optimizer, p.warmup_steps, max_steps)
    # uint8 pixels through the workers and the host->device copy; the tasks' losses normalise them on the device
    collate = collate or PairCollator(tokenizer, p.max_text_len, normalize=False)
    pin_memory = get_accelerator().name == "cuda"

    def batches(start_batch: int):
        # the data order and each sample's own seed (RandAugment, false image) are functions of (seed, batch
        # index): resuming continues with the batches a full run sees
        sampler = ResumableSampler(len(dataset), p.per_device_batch_size, ctx.rank, ctx.world_size, p.seed,
                                   start_batch=start_batch, item_seeds=True)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=p.num_workers,
                          pin_memory=pin_memory)

    settings = FitSettings(max_steps=max_steps, accumulation=accum, seed=p.seed, grad_clip=p.grad_clip,
                           log_every=p.log_every, checkpoint_every=p.checkpoint_every)
    result = fit(ctx, model, optimizer, scheduler, task, batches, settings)
    trained = trained_module(result.model, result.optimizer, ctx.is_main)  # full fp32 weights, on rank 0
    if ctx.is_main:
        save_model(trained, ctx.output_dir / "model")
        tokenizer.save_pretrained(str(ctx.output_dir / "tokenizer"))
        params = p.model_dump(mode="json")
        params["tokenizer"] = "tokenizer"  # the copy saved beside the model
        (ctx.output_dir / "params.json").write_text(json.dumps(params, indent=2))
    return {"step": result.step, **result.metrics}
