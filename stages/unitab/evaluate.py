"""`unitab.evaluate`: phrase grounding recall@1 under two protocols, baselines, and caption BLEU-4 / CIDEr-D.

- `merged_recall@1` is the paper's Flickr30k Entities number (UniTAB 79.39/79.58 test/val): the caption is given to
  the text encoder and the decoder runs free (greedy, from <s>); a predicted box belongs to the text tokens written
  inside its `<obj> ... </obj>` (UniTAB's postprocessors.seq2logits: generated text token i is caption token i); a
  phrase's top-1 box is the first box linked to any of its tokens (no box linked: the first decoded box, as UniTAB's
  sort of all-zero scores gives; none decoded: a miss). A hit is IoU >= 0.5 with the phrase's MERGED gold box (the
  box enclosing all its gold boxes; UniTAB configs/flickr.json GT_type merged).
- `anybox_oracle_recall@1` is easier and not the paper's: the gold caption is teacher forced with the gold phrase
  boundaries (`<obj> phrase` given), the model only decodes the four box tokens after each phrase (argmax over the
  bins; the decoded box stays in the prefix), and a hit is IoU >= 0.5 with ANY of the phrase's gold boxes. The
  random-box and centre-box baselines are scored the same way on the same phrases.
- Captioning gives the encoder no text and decodes greedily from <s>; BLEU-4 and CIDEr-D as metrics.py computes them
  (checked against pycocoevalcap in tests; the official pipeline also PTB-tokenises and reports x100).

Phrases are those `phrase_token_spans` keeps (a phrase overlapping an earlier one is not scored; UniTAB scores every
annotated phrase). Under the launcher each rank grounds its share of the captions and captions its share of the
images, on its device (cuda:local_rank, else the CPU with its share of the cores) in the launch's precision; rank 0
gathers them in order, so the metrics (and the random-box baseline's draws) equal a single process's.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from vlflow.stages.common.device import autocast, launch_precision, limit_cpu_threads, stage_device
from vlflow.stages.common.evaluation import gather_on_main, my_share, rank_and_world

from vlflow.stage import StageContext

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


def boxes_by_caption_token(tokens: list[int], layout, eos_token_id: int) -> tuple[list[int], list[list[float]]]:
    """UniTAB's seq2logits on one generated sequence (after <s>): for each generated text token the index of the box
    it is grounded by (-1: outside any <obj>), and the decoded boxes (an incomplete last box is dropped)."""
    box_of_token: list[int] = []
    bins: list[int] = []
    depth = 0
    for token in tokens:
        if token == eos_token_id:
            break
        if token == layout.obj_start:
            depth += 1
        elif token == layout.obj_end:
            depth -= 1
        elif layout.is_bin(token):
            bins.append(token)
        else:
            box_of_token.append(len(bins) // 4 if depth else -1)
    boxes = [layout.tokens_to_box(bins[k:k + 4]) for k in range(0, len(bins) - len(bins) % 4, 4)]
    return box_of_token, boxes


def free_decoding_top1(tokens: list[int], spans: list, layout, eos_token_id: int) -> list[list[float] | None]:
    """Top-1 box per phrase span from a freely generated sequence (see the module docstring); None: no box at all."""
    box_of_token, boxes = boxes_by_caption_token(tokens, layout, eos_token_id)
    top1 = []
    for span in spans:
        linked = [box_of_token[t] for t in range(span.token_start, min(span.token_end, len(box_of_token)))
                  if 0 <= box_of_token[t] < len(boxes)]
        top1.append(boxes[min(linked)] if linked else (boxes[0] if boxes else None))
    return top1


def caption_batches(model: UniTAB, tokenizer, source, rows, batch_size: int, image_size: int, max_image_size: int):
    """Batches of caption rows: (rows, their phrase token spans, images, `<s> caption </s>` ids cut to the decoder's
    length), for both grounding protocols."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        parsed = [phrase_token_spans(tokenizer, source.caption(i), source.phrases(i)) for i in chunk]
        images = [image_tensor(source.image(i), image_size, max_image_size) for i in chunk]
        text = [[tokenizer.bos_token_id, *ids[:model.config.max_decoding_step - 2], tokenizer.eos_token_id]
                for ids, _ in parsed]
        yield chunk, parsed, images, text


def free_ground_rows(model: UniTAB, tokenizer, source, rows, batch_size: int, image_size: int, max_image_size: int,
                     device: torch.device = torch.device("cpu"), precision: str = "fp32") -> list[dict]:
    """The paper's protocol: one entry per scored phrase with the top-1 box of free greedy decoding (None: none)."""
    out = []
    for chunk, parsed, images, text in caption_batches(model, tokenizer, source, rows, batch_size, image_size,
                                                       max_image_size):
        with autocast(precision, device):
            memory = encode_batch(model, images, text, tokenizer.pad_token_id, device)
            generated = model.generate(memory).cpu().tolist()
        for i, (ids, spans), tokens in zip(chunk, parsed, generated):
            phrases = source.phrases(i)
            top1 = free_decoding_top1(tokens[1:], spans, model.layout, tokenizer.eos_token_id)
            out += [{"row": i, "phrase": phrases[span.phrase_index]["text"], "box": box, "gold": span.boxes}
                    for span, box in zip(spans, top1)]
    return out


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
    out = []
    for chunk, parsed, images, text in caption_batches(model, tokenizer, source, rows, batch_size, image_size,
                                                       max_image_size):
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
                "anybox_oracle_recall@1": metrics.recall_at_1(predicted, gold),
                "random_box_recall@1": metrics.recall_at_1([random_box(rng) for _ in gold], gold),
                "center_box_recall@1": metrics.recall_at_1([list(CENTER_BOX) for _ in gold], gold),
            })
            predictions += [{**entry, "protocol": "anybox_oracle"} for entry in grounded]
        free = gather_on_main(free_ground_rows(model, tokenizer, source, my_share(rows), p.batch_size, image_size,
                                               max_image_size, device, precision))
        if free is not None:
            free.sort(key=lambda entry: entry["row"])
            no_box = [0.0, 0.0, 0.0, 0.0]  # nothing decoded: a miss
            result["merged_recall@1"] = metrics.recall_at_1([e["box"] or no_box for e in free],
                                                           [[metrics.merged_box(e["gold"])] for e in free])
            result["free_decoding_phrases_without_box"] = sum(e["box"] is None for e in free)
            predictions += [{**entry, "protocol": "merged_free_decoding"} for entry in free]

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
