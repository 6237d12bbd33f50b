"""testing.train: linear regression trained with the Booster, checkpointed and resumable (for launch/resume tests).

Deterministic end to end: generated data, seeded init, a data order that depends only on the step, and SGD with
momentum plus a decaying learning rate, so that optimizer and scheduler state must be restored for a resumed run to
end with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from vlflow.stage import StageContext
from vlflow.stages.testing.toy import data_files
from vlflow.stages.common.training import (MetricsLogger, ResumableSampler, load_checkpoint, save_checkpoint,
                                           seed_everything)

SEED = 0
NUM_SAMPLES = 64
NUM_FEATURES = 4
BATCH_PER_DEVICE = 4


def data_seed(data: Path | None) -> int:
    """SEED, or a seed derived from the content of the optional `data` input (so upstream changes matter)."""
    if data is None:
        return SEED
    digest = hashlib.sha256()
    for path in data_files(data):
        digest.update(path.read_bytes())
    return int.from_bytes(digest.digest()[:4], "little")


def make_dataset(seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
    true_weight = torch.randn(NUM_FEATURES, 1, generator=generator)
    targets = features @ true_weight + 0.5 + 0.01 * torch.randn(NUM_SAMPLES, 1, generator=generator)
    return TensorDataset(features, targets)


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def train(ctx: StageContext) -> dict:
    params = ctx.params
    booster = ctx.booster
    seed_everything(SEED)  # same initial weights on every rank, and in every attempt
    dataset = make_dataset(data_seed(ctx.inputs.get("data")))
    model = torch.nn.Linear(NUM_FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (params.steps + 1))
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)

    resumed = load_checkpoint(ctx, model, optimizer, scheduler)
    start_step = resumed[0] if resumed else 0
    sampler = ResumableSampler(len(dataset), BATCH_PER_DEVICE, ctx.rank, ctx.world_size, seed=SEED,
                               start_batch=start_step)
    loader = DataLoader(dataset, batch_sampler=sampler)
    loss_fn = torch.nn.MSELoss()
    loss = torch.tensor(float("nan"))
    with MetricsLogger(ctx) as metrics:
        if start_step:
            metrics.log(start_step, resumed_from_step=start_step)
        for step, (features, targets) in zip(range(start_step + 1, params.steps + 1), loader):
            loss = loss_fn(model(features), targets)
            booster.backward(loss, optimizer)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            metrics.log(step, loss=mean_over_ranks(loss), lr=scheduler.get_last_lr()[0])
            if step % params.checkpoint_every == 0 and step < params.steps:
                save_checkpoint(ctx, model, optimizer, scheduler, step)
            if params.sleep:
                time.sleep(params.sleep)

    booster.save_model(model, str(ctx.output_dir / "model"), shard=True, use_safetensors=True)
    return {"final_loss": mean_over_ranks(loss), "steps": params.steps, "resumed_from_step": start_step,
            "world_size": ctx.world_size}
