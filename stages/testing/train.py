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
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from vlflow.stages.common.export import trained_module
from vlflow.stages.common.fit import FitSettings, TrainTask, fit
from vlflow.stages.common.training import ResumableSampler, configure_determinism, seed_everything
from vlflow.stages.testing.toy import data_files

from vlflow.stage import StageContext

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


class SleepAfterStep:
    """Holds each step open for `seconds` (tests interrupt a run mid-training)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def start(self, model, device, checkpoint, ctx) -> None:
        pass

    def after_step(self, model, step: int) -> None:
        time.sleep(self.seconds)

    def save(self, directory: Path) -> None:
        pass


def train(ctx: StageContext) -> dict:
    params = ctx.params
    configure_determinism(ctx.world_size)
    seed_everything(SEED)  # same initial weights on every rank, and in every attempt
    dataset = make_dataset(data_seed(ctx.inputs.get("data")))
    model = torch.nn.Linear(NUM_FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (params.steps + 1))
    loss_fn = torch.nn.MSELoss()
    task = TrainTask(losses=lambda model, batch: {"loss": loss_fn(model(batch[0]), batch[1])})

    def batches(start_batch: int):
        return DataLoader(dataset, batch_sampler=ResumableSampler(len(dataset), BATCH_PER_DEVICE, ctx.rank,
                                                                  ctx.world_size, seed=SEED, start_batch=start_batch))

    settings = FitSettings(max_steps=params.steps, seed=SEED, log_every=1, checkpoint_every=params.checkpoint_every)
    hooks = [SleepAfterStep(params.sleep)] if params.sleep else []
    result = fit(ctx, model, optimizer, scheduler, task, batches, settings, hooks)
    trained = trained_module(result.model, result.optimizer, ctx.is_main)  # full fp32 weights, on rank 0
    if ctx.is_main:
        (ctx.output_dir / "model").mkdir(parents=True, exist_ok=True)
        save_file(trained.state_dict(), str(ctx.output_dir / "model" / "model.safetensors"))
    metrics = {"final_loss": result.metrics["loss"], "steps": params.steps,
               "resumed_from_step": result.resumed_from_step, "world_size": ctx.world_size}
    if params.text:  # its digest only: the metrics are committed to the cache
        metrics["text_sha256"] = hashlib.sha256(params.text.encode()).hexdigest()
    return metrics
