"""`vilt.evaluate_retrieval`: text->image (IR) and image->text (TR) recall@1/5/10 over ALL image-text pairs of a
split, as ViLT's `compute_irtr_recall`: each image is embedded once and scored against every caption in batches.
Works on a pretraining output (zero-shot, ITM "match" logit) and on a fine-tuning output (rank head).

Scoring all pairs is the expensive part (COCO 5k: 5,000 x 25,010 pairs), so under the launcher every rank scores its
share of the images (rank r takes images r, r + world, ...) on its device (cuda:local_rank, else the CPU with its share
of the cores), in the launch's precision (bf16/fp16 autocast), `image_batch_size` images x `text_batch_size` texts per
forward, and rank 0 gathers the score columns. Every patch of an image is used (no random patch sampling), so the
scores are deterministic."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, ViltForImageAndTextRetrieval
from vlflow.stages.common.device import autocast, launch_precision, limit_cpu_threads, stage_device
from vlflow.stages.common.evaluation import rank_and_world, share
from vlflow.stages.data.transforms import normalize_pixels
from vlflow.stages.vilt.data import collate_images, image_dataset, load_trained_run, tokenize
from vlflow.stages.vilt.model import ViltPretrainingModel, encode

from vlflow.stage import StageContext

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


def load_scorer(model_dir: Path, device: torch.device):
    """(ViltModel, pooled -> score, head name) from a pretraining or fine-tuning output's `model` directory, on
    `device`."""
    config = AutoConfig.from_pretrained(str(model_dir))
    if "ViltForImageAndTextRetrieval" in (config.architectures or []):
        model = ViltForImageAndTextRetrieval.from_pretrained(str(model_dir)).eval().to(device)
        return model.vilt, lambda pooled: model.rank_output(pooled)[:, 0], "rank"
    model = ViltPretrainingModel.from_pretrained(model_dir).eval().to(device)
    return model.vilt, lambda pooled: model.itm_score(pooled)[:, 1], "itm"


# ---------------------------------------------------------------------------------------------------------------
# Images at evaluation: every patch, fixed shapes. transformers' visual_embed samples up to max_image_length patches
# at random (a different score per run and per batch composition) and finds them with nonzero/unique (a host sync
# per image batch); here every patch of the padded grid goes in, padding masked, so a score depends on its image
# and text only, whatever the batch and the rank.

@dataclass
class ImageBatch:
    """Host-side image batch: padded pixels, pixel mask and each image's patch grid (rows, columns)."""

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    grids: list[tuple[int, int]]

    def to(self, device: torch.device) -> "ImageBatch":
        """On `device`, uint8 pixels normalised there (ViLT's floats, bit for bit; float pixels as they are)."""
        pixel_mask = self.pixel_mask.to(device, non_blocking=True)
        return ImageBatch(normalize_pixels(self.pixel_values.to(device, non_blocking=True), pixel_mask), pixel_mask,
                          self.grids)


def patch_grids(pixel_mask: torch.Tensor, patch_size: int) -> list[tuple[int, int]]:
    """Each image's valid patch rows and columns, computed on the host as transformers' visual_embed does."""
    height, width = pixel_mask.shape[-2] // patch_size, pixel_mask.shape[-1] // patch_size
    mask = F.interpolate(pixel_mask[:, None].float(), size=(height, width)).long()[:, 0]
    return list(zip(mask[:, :, 0].sum(1).tolist(), mask[:, 0, :].sum(1).tolist()))


def image_batch(images: list[torch.Tensor], patch_size: int) -> ImageBatch:
    """Host-side batch: uint8 images stay uint8 (a quarter of the bytes to copy; `to` normalises on the device)."""
    pixel_values, pixel_mask = collate_images(images)
    return ImageBatch(pixel_values, pixel_mask, patch_grids(pixel_mask, patch_size))


def embed_all_patches(vilt, batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [B, 1 + H*W, D], mask [B, 1 + H*W]) with every patch: visual_embed without sampling."""
    embeddings, config = vilt.embeddings, vilt.config
    patches = embeddings.patch_embeddings(batch.pixel_values)  # [B, D, H, W]
    size, dim, height, width = patches.shape
    mask = F.interpolate(batch.pixel_mask[:, None].float(), size=(height, width)).long()[:, 0]
    grid = config.image_size // config.patch_size
    spatial = embeddings.position_embeddings[:, 1:, :].transpose(1, 2).view(1, dim, grid, grid)
    positions = torch.cat([F.pad(F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True),
                                 (0, width - w, 0, height - h)) for h, w in batch.grids])
    patches = patches.flatten(2).transpose(1, 2) + positions.flatten(2).transpose(1, 2)
    cls = embeddings.cls_token.expand(size, -1, -1) + embeddings.position_embeddings[:, :1, :]
    image_embeds = embeddings.dropout(torch.cat([cls.to(patches.dtype), patches], dim=1))
    image_mask = torch.cat([torch.ones_like(mask[:, :1, 0]), mask.flatten(1)], dim=1)
    return image_embeds, image_mask


@dataclass
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def text_batches(texts: dict, batch_size: int, device: torch.device) -> list[TextBatch]:
    """All texts in batches, each trimmed to its longest text (shorter sequences, same scores), moved once."""
    out = []
    for start in range(0, len(texts["input_ids"]), batch_size):
        attention_mask = texts["attention_mask"][start:start + batch_size]
        length = int(attention_mask.sum(1).max())
        out.append(TextBatch(texts["input_ids"][start:start + batch_size, :length].to(device, non_blocking=True),
                             attention_mask[:, :length].to(device, non_blocking=True)))
    return out


def pairs_of(per_image: torch.Tensor, n: int) -> torch.Tensor:
    """[I, ...] -> [I * n, ...]: each image's row n times in a row."""
    return per_image[:, None].expand(-1, n, *per_image.shape[1:]).reshape(-1, *per_image.shape[1:])


@torch.no_grad()
def score_all_pairs(vilt, score_head, images: Iterable[ImageBatch], texts: list[TextBatch], num_images: int,
                    device: torch.device, precision: str = "fp32", progress=None) -> torch.Tensor:
    """[num_texts, num_images] scores (on the CPU, fp32). Each image batch is embedded once and scored against every
    text batch in one forward of images x texts pairs."""
    num_texts = sum(len(t.input_ids) for t in texts)
    scores = torch.empty(num_texts, num_images, device=device)
    done = 0
    for host_batch in images:
        batch = host_batch.to(device)
        with autocast(precision, device):
            image_embeds, image_mask = embed_all_patches(vilt, batch)
            count, start = len(batch.grids), 0
            for text in texts:
                n = len(text.input_ids)
                # pair (image i, text t) at row i * n + t; with one image these are views, not copies
                enc = encode(vilt, text.input_ids.repeat(count, 1), text.attention_mask.repeat(count, 1),
                             pairs_of(image_embeds, n), pairs_of(image_mask, n))
                scores[start:start + n, done:done + count] = score_head(enc.pooled).float().view(count, n).T
                start += n
        done += count
        if progress is not None:
            progress(done)
    return scores.cpu()


def image_batches(load_image, indices: list[int], batch_size: int, patch_size: int) -> Iterator[ImageBatch]:
    """Host-side batches of the images `indices` (`load_image(i)`: CHW tensor), in order."""
    for start in range(0, len(indices), batch_size):
        yield image_batch([load_image(i) for i in indices[start:start + batch_size]], patch_size)


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
    limit_cpu_threads(p.num_threads or None)
    device, precision = stage_device(), launch_precision(ctx)
    run = load_trained_run(ctx.inputs["model"], ctx.inputs)
    image_size, max_image_size, max_text_len = run.geometry(p)
    tokenizer = run.tokenizer
    vilt, score_head, head_name = load_scorer(run.model_dir, device)
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
    ctx.log.info("scoring %d images x %d texts (%s head) on %d rank(s), %s %s", num_images, len(captions), head_name,
                 world_size, device, precision)
    started = time.perf_counter()
    reported = [0]

    def progress(done):
        if done - reported[0] >= max(1, len(mine) // 10) or done == len(mine):
            reported[0] = done
            ctx.log.info("  %d/%d images of this rank, %.0fs", done, len(mine), time.perf_counter() - started)

    batches = image_batches(lambda i: images[i]["image"], mine, p.image_batch_size, vilt.config.patch_size)
    local = score_all_pairs(vilt, score_head, batches, text_batches(texts, p.text_batch_size, device), len(mine),
                            device, precision, progress)
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
    metrics["precision"] = precision
    (ctx.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    metrics["device"] = device.type  # a run fact, like the time: in the manifest, not in the data
    # timings stay out of the data (they change every run): returned, they go to the manifest and _vlflow/ only
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics["pairs_per_second"] = round(len(captions) * num_images / max(metrics["seconds"], 1e-9), 1)
    torch.save({"scores": scores, "text_image": text_image}, ctx.output_dir / "scores.pt")
    print_table({k: v for k, v in metrics.items() if isinstance(v, dict)},
                f"{ctx.stage}: {p.split} retrieval ({head_name} head)")
    return metrics
