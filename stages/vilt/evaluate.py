"""`vilt.evaluate_retrieval`: text->image (IR) and image->text (TR) recall@1/5/10 over ALL image-text pairs of a
split, as ViLT's `compute_irtr_recall`: each image is embedded once and scored against every caption in batches.
Works on a pretraining output (zero-shot, ITM "match" logit) and on a fine-tuning output (rank head).

Scoring all pairs is the expensive part (COCO 5k: 5,000 x 25,010 forward passes), so under the launcher every rank
scores its share of the images (rank r takes images r, r + world, ...) and rank 0 gathers the score columns."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, ViltForImageAndTextRetrieval

from vlflow.stage import StageContext
from vlflow.stages.common.evaluation import rank_and_world, share
from vlflow.stages.vilt.data import image_dataset, load_trained_run, tokenize
from vlflow.stages.vilt.model import ViltPretrainingModel, embed_images, encode

KS = (1, 5, 10)


def recall_at_k(scores: torch.Tensor, text_image: torch.Tensor, ks=KS) -> dict[str, float]:
    """scores [num_texts, num_images]; text_image[t] = index of the image caption t belongs to.

    IR R@k: share of texts whose image is among their k best images. TR R@k: share of images with at least one of
    their captions among their k best texts."""
    num_texts, num_images = scores.shape
    out = {}
    best_images = scores.topk(min(max(ks), num_images), dim=1).indices  # [T, k]
    best_texts = scores.topk(min(max(ks), num_texts), dim=0).indices.T  # [I, k]
    for k in ks:
        out[f"ir_r{k}"] = (best_images[:, :k] == text_image[:, None]).any(1).float().mean().item()
        image_hit = text_image[best_texts[:, :k]] == torch.arange(num_images)[:, None]
        out[f"tr_r{k}"] = image_hit.any(1).float().mean().item()
    return out


def load_scorer(model_dir: Path):
    """(ViltModel, pooled -> score) from a pretraining or fine-tuning output's `model` directory."""
    config = AutoConfig.from_pretrained(str(model_dir))
    if "ViltForImageAndTextRetrieval" in (config.architectures or []):
        model = ViltForImageAndTextRetrieval.from_pretrained(str(model_dir)).eval()
        return model.vilt, lambda pooled: model.rank_output(pooled)[:, 0], "rank"
    model = ViltPretrainingModel.from_pretrained(model_dir).eval()
    return model.vilt, lambda pooled: model.itm_score(pooled)[:, 1], "itm"


@torch.no_grad()
def score_all_pairs(vilt, score_head, load_image, num_images: int, texts: dict, max_image_len: int,
                    text_batch_size: int, progress=None) -> torch.Tensor:
    """[num_texts, num_images] scores; each image (`load_image(i)`, CHW) is embedded once, then run against every
    text batch."""
    num_texts = len(texts["input_ids"])
    scores = torch.empty(num_texts, num_images)
    for i in range(num_images):
        pixel_values = load_image(i)[None]
        pixel_mask = torch.ones(1, *pixel_values.shape[-2:], dtype=torch.long)
        image_embeds, image_mask = embed_images(vilt, pixel_values, pixel_mask, max_image_len)
        for start in range(0, num_texts, text_batch_size):
            input_ids = texts["input_ids"][start:start + text_batch_size]
            attention_mask = texts["attention_mask"][start:start + text_batch_size]
            # trim padding shared by the whole batch: shorter sequences, same scores
            length = int(attention_mask.sum(1).max())
            n = len(input_ids)
            enc = encode(vilt, input_ids[:, :length], attention_mask[:, :length],
                         image_embeds.expand(n, -1, -1), image_mask.expand(n, -1))
            scores[start:start + n, i] = score_head(enc.pooled).float()
        if progress is not None:
            progress(i)
    return scores


def rank_images(num_images: int, rank: int, world_size: int) -> list[int]:
    """The images one rank scores (the common strided share, so ranks get equal shares of any split)."""
    return list(share(range(num_images), rank, world_size))


def gather_score_columns(local: torch.Tensor, num_images: int, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank 0: the full [num_texts, num_images] matrix from every rank's columns (rank_images order); others: None.

    gather needs equal shapes, so each rank pads its block to the largest share."""
    if world_size == 1:
        return local
    share = -(-num_images // world_size)
    padded = torch.zeros(local.shape[0], share)
    padded[:, :local.shape[1]] = local
    blocks = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, blocks, dst=0)
    if rank != 0:
        return None
    scores = torch.empty(local.shape[0], num_images)
    for r, block in enumerate(blocks):
        columns = rank_images(num_images, r, world_size)
        scores[:, columns] = block[:, :len(columns)]
    return scores


def subsets_for(requested: list[str], num_images: int) -> dict[str, list[range]]:
    """Image ranges per subset: COCO 1k = 5 folds of 1000 (averaged), 5k = first 5000; smaller splits: 'all'."""
    out: dict[str, list[range]] = {}
    for name in requested:
        if name == "1k" and num_images >= 5000:
            out["1k"] = [range(f * 1000, (f + 1) * 1000) for f in range(5)]
        elif name == "5k" and num_images >= 5000:
            out["5k"] = [range(5000)]
    if not out or "all" in requested:
        out["all"] = [range(num_images)]
    return out


def subset_recall(scores: torch.Tensor, text_image: torch.Tensor, folds: list[range]) -> dict[str, float]:
    results = []
    for fold in folds:
        texts = ((text_image >= fold.start) & (text_image < fold.stop)).nonzero().squeeze(1)
        results.append(recall_at_k(scores[texts][:, fold.start:fold.stop], text_image[texts] - fold.start))
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def print_table(metrics: dict[str, dict], title: str) -> None:
    table = Table(title=title)
    table.add_column("subset")
    for direction in ("tr", "ir"):
        for k in KS:
            table.add_column(f"{direction.upper()} R@{k}", justify="right")
    table.add_column("chance R@1", justify="right")
    for name, m in metrics.items():
        table.add_row(name, *[f"{100 * m[f'{d}_r{k}']:.2f}" for d in ("tr", "ir") for k in KS],
                      f"{100 * m['chance_r1']:.2f}")
    Console().print(table)


def evaluate_retrieval(ctx: StageContext) -> dict:
    p = ctx.params
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    run = load_trained_run(ctx.inputs["model"], ctx.inputs)
    image_size, max_image_size, max_text_len = run.geometry(p)
    tokenizer = run.tokenizer
    vilt, score_head, head_name = load_scorer(run.model_dir)
    images = image_dataset(ctx.inputs["arrows"], p.split, image_size, max_image_size)
    num_images = min(len(images), p.max_images or len(images))
    captions, text_image = [], []
    for i in range(num_images):
        for caption in images.captions(i):
            captions.append(caption)
            text_image.append(i)
    text_image = torch.tensor(text_image)
    texts = tokenize(tokenizer, captions, max_text_len)

    rank, world_size = rank_and_world()
    mine = rank_images(num_images, rank, world_size)
    ctx.log.info("scoring %d images x %d texts (%s head) on %d rank(s)", num_images, len(captions), head_name,
                 world_size)
    started = time.perf_counter()

    def progress(i):
        if (i + 1) % max(1, len(mine) // 10) == 0:
            ctx.log.info("  %d/%d images of this rank, %.0fs", i + 1, len(mine), time.perf_counter() - started)

    local = score_all_pairs(vilt, score_head, lambda i: images[mine[i]]["image"], len(mine), texts,
                            vilt.config.max_image_length, p.text_batch_size, progress)
    scores = gather_score_columns(local, num_images, rank, world_size)
    if scores is None:  # not rank 0: its columns are delivered
        return {}
    metrics = {}
    for name, folds in subsets_for(p.subsets, num_images).items():
        metrics[name] = subset_recall(scores, text_image, folds)
        metrics[name]["chance_r1"] = 1 / len(folds[0])
        metrics[name]["num_images"] = len(folds[0])
    metrics["head"] = head_name
    metrics["num_texts"] = len(captions)
    metrics["ranks"] = world_size
    (ctx.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metrics["seconds"] = round(time.perf_counter() - started, 1)  # run facts stay out of the data (manifest only)
    torch.save({"scores": scores, "text_image": text_image}, ctx.output_dir / "scores.pt")
    print_table({k: v for k, v in metrics.items() if isinstance(v, dict)},
                f"{ctx.stage}: {p.split} retrieval ({head_name} head)")
    return metrics
