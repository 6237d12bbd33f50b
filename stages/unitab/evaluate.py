"""`unitab.evaluate`: phrase grounding recall@1 (with random-box and center-box baselines on the same phrases) and
grounded-captioning BLEU-4 / CIDEr-D.

Grounding follows UniTAB's Flickr30k grounding evaluation: the caption is given to the text encoder and teacher
forced in the decoder; after each `<obj> phrase` the model decodes the four box tokens greedily (the argmax is taken
over the coordinate bins only, so a box always comes out); the decoded box, not the gold one, stays in the prefix for
later phrases. Captioning gives the encoder no text and decodes greedily from <s>.

Under the launcher each rank grounds its share of the captions and captions its share of the images, on its device
(cuda:local_rank, else the CPU with its share of the cores) in the launch's precision; rank 0 gathers them in order,
so the metrics (and the random-box baseline's draws) equal a single process's.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlflow.stage import StageContext
from vlflow.stages.common.device import autocast, launch_precision, limit_cpu_threads, stage_device
from vlflow.stages.common.evaluation import gather_on_main, my_share, rank_and_world

from . import metrics
from .data import image_tensor, open_split, pad_ids, pad_images, phrase_token_spans
from .model import Memory, UniTAB
from .train import load_trained

CENTER_BOX = (0.25, 0.25, 0.75, 0.75)  # the centred box covering half of each side


@torch.no_grad()
def ground_phrases(model: UniTAB, memory: Memory, token_ids: list[list[int]], spans: list[list]) -> list[list]:
    """For each caption (its tokens without specials + phrase spans) the predicted box of every span, in order.
    Prefixes are built on the host and moved to the memory's device once per decoding step."""
    cfg, layout = model.config, model.layout
    device = memory.memory.device
    prefixes = [[cfg.bos_token_id] for _ in token_ids]
    consumed = [0] * len(token_ids)
    boxes: list[list] = [[] for _ in token_ids]
    for k in range(max((len(s) for s in spans), default=0)):
        active = [i for i, s in enumerate(spans) if len(s) > k
                  and len(prefixes[i]) + s[k].token_end - consumed[i] + 5 <= cfg.max_decoding_step]
        if not active:
            break
        for i in active:
            span = spans[i][k]
            prefixes[i] += token_ids[i][consumed[i]:span.token_start] + [layout.obj_start]
            prefixes[i] += token_ids[i][span.token_start:span.token_end]
            consumed[i] = span.token_end
        rows = torch.tensor(active, device=device)
        for _ in range(4):  # x1, y1, x2, y2
            prev = pad_ids([prefixes[i] for i in active], cfg.pad_token_id)
            lengths = torch.tensor([len(prefixes[i]) for i in active])
            padding = torch.arange(prev.shape[1])[None] >= lengths[:, None]
            logits = model.decode(memory.select(rows), prev.to(device), padding.to(device))
            last = logits[torch.arange(len(active), device=device), (lengths - 1).to(device),
                          layout.first_bin:layout.size]
            for i, token in zip(active, (last.argmax(-1) + layout.first_bin).tolist()):
                prefixes[i].append(token)
        for i in active:
            boxes[i].append(layout.tokens_to_box(prefixes[i][-4:]))
            prefixes[i].append(layout.obj_end)
    return boxes


def caption_text(tokens: list[int], tokenizer, text_vocab: int) -> str:
    """Drop <obj>, </obj> and box tokens, stop at </s>, decode the text."""
    text = []
    for token in tokens[1:]:
        if token == tokenizer.eos_token_id:
            break
        if token < text_vocab:
            text.append(token)
    return tokenizer.decode(text, skip_special_tokens=True).strip()


def encode_batch(model: UniTAB, images, text_ids: list[list[int]], pad_token_id: int,
                 device: torch.device) -> Memory:
    """Encoder memory of a batch padded on the host and moved to `device` once."""
    batch, mask = pad_images(images)
    ids = pad_ids(text_ids, pad_token_id)
    text_mask = pad_ids([[1] * len(t) for t in text_ids], 0)
    return model.encode(*(t.to(device, non_blocking=True) for t in (batch, mask, ids, text_mask)))


def random_box(rng: random.Random) -> list[float]:
    x = sorted((rng.random(), rng.random()))
    y = sorted((rng.random(), rng.random()))
    return [x[0], y[0], x[1], y[1]]


def ground_rows(model: UniTAB, tokenizer, source, rows, batch_size: int, image_size: int,
                max_image_size: int, device: torch.device = torch.device("cpu"), precision: str = "fp32") -> list[dict]:
    """One entry per annotated phrase of the given caption rows, in row order: row, phrase text, predicted box,
    gold boxes. The model runs on `device` (where its weights are) in `precision`."""
    config = model.config
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        parsed = [phrase_token_spans(tokenizer, source.caption(i), source.phrases(i)) for i in chunk]
        images = [image_tensor(source.image(i), image_size, max_image_size) for i in chunk]
        text = [[tokenizer.bos_token_id, *ids[:config.max_decoding_step - 2], tokenizer.eos_token_id]
                for ids, _ in parsed]
        with autocast(precision, device):
            memory = encode_batch(model, images, text, tokenizer.pad_token_id, device)
            boxes = ground_phrases(model, memory, [ids for ids, _ in parsed], [s for _, s in parsed])
        for i, (ids, spans), row_boxes in zip(chunk, parsed, boxes):
            phrases = source.phrases(i)
            for n, span in enumerate(spans):
                box = row_boxes[n] if n < len(row_boxes) else [0.0, 0.0, 0.0, 0.0]  # cut off: a miss
                out.append({"row": i, "phrase": phrases[span.phrase_index]["text"], "box": box, "gold": span.boxes})
    return out


def caption_images(model: UniTAB, tokenizer, source, first_rows: list[tuple[int, int]], batch_size: int,
                   image_size: int, max_image_size: int, max_steps: int, device: torch.device = torch.device("cpu"),
                   precision: str = "fp32") -> list[tuple[int, str]]:
    """(position, caption) for each (position, row) given: the caption generated for that row's image."""
    out = []
    for start in range(0, len(first_rows), batch_size):
        chunk = first_rows[start:start + batch_size]
        images = [image_tensor(source.image(i), image_size, max_image_size) for _, i in chunk]
        empty = [[tokenizer.bos_token_id, tokenizer.eos_token_id]] * len(chunk)
        with autocast(precision, device):
            memory = encode_batch(model, images, empty, tokenizer.pad_token_id, device)
            tokens = model.generate(memory, max_steps=max_steps).cpu()
        out += [(position, caption_text(t, tokenizer, model.config.text_vocab))
                for (position, _), t in zip(chunk, tokens.tolist())]
    return out


def evaluate(ctx: StageContext) -> dict:
    p = ctx.params
    limit_cpu_threads()
    device, precision = stage_device(), launch_precision(ctx)
    model, tokenizer, config, used_ema = load_trained(ctx.inputs["model"], p.use_ema)
    model.to(device)
    train_params = json.loads((Path(ctx.inputs["model"]) / "config.json").read_text())["train_params"]
    image_size, max_image_size = train_params["image_size"], train_params["max_image_size"]
    source = open_split(ctx.inputs["arrows"], p.split)
    rows = range(min(len(source), p.max_samples or len(source)))
    _, world_size = rank_and_world()
    result: dict = {"split": p.split, "weights": "ema" if used_ema else "model", "captions": len(rows),
                    "ranks": world_size, "precision": precision}
    predictions: list[dict] = []

    # UniTAB's --no_detection switches the evaluator only: this evaluation follows the trained model's flag
    no_detection = train_params.get("no_detection", False) if p.no_detection is None else p.no_detection
    result["no_detection"] = no_detection
    if not no_detection:
        grounded = gather_on_main(ground_rows(model, tokenizer, source, my_share(rows), p.batch_size, image_size,
                                              max_image_size, device, precision))
        if grounded is not None:
            grounded.sort(key=lambda entry: entry["row"])  # stable: a row's phrases keep their order
            predicted, gold = [e["box"] for e in grounded], [e["gold"] for e in grounded]
            rng = random.Random(p.seed)
            result.update({
                "phrases": len(gold),
                "grounding_recall@1": metrics.recall_at_1(predicted, gold),
                "random_box_recall@1": metrics.recall_at_1([random_box(rng) for _ in gold], gold),
                "center_box_recall@1": metrics.recall_at_1([list(CENTER_BOX) for _ in gold], gold),
            })
            predictions += grounded

    if p.captioning:
        references: dict[str, list[str]] = {}
        first_row: dict[str, int] = {}
        for i in rows:
            image_id = source.image_id(i)
            references.setdefault(image_id, []).append(source.caption(i))
            first_row.setdefault(image_id, i)
        image_ids = list(first_row)
        generated = gather_on_main(caption_images(
            model, tokenizer, source, my_share(list(enumerate(first_row.values()))), p.batch_size, image_size,
            max_image_size, p.max_decoding_step, device, precision))
        if generated is not None:
            captions = [caption for _, caption in sorted(generated)]
            refs = [references[image_id] for image_id in image_ids]
            result.update({"images": len(image_ids), "bleu4": metrics.bleu4(captions, refs),
                           "cider": metrics.cider_d(captions, refs)})
            predictions += [{"image_id": i, "caption": c} for i, c in zip(image_ids, captions)]

    if rank_and_world()[0] != 0:  # its results are delivered to rank 0, which writes them
        return {}
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(ctx.output_dir / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in predictions)
    print_table(result, ctx.stage)
    return {**result, "device": device.type}  # a run fact: in the manifest, not in the data


def print_table(result: dict, title: str) -> None:
    table = Table(title=f"{title}: UniTAB evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
