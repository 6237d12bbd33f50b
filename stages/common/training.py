"""Helpers shared by the training stages (ViLT, UniTAB, testing.train).

- `accumulation_steps`: gradient accumulation that turns a per-device batch into the configured global batch.
- `save_checkpoint` / `load_checkpoint`: Booster checkpoints in `ctx.work_dir/checkpoints/step_<n>/`, written to a
  temporary directory and renamed, with the `latest` pointer file replaced last, so a kill at any moment leaves the
  previous checkpoint usable. The last `KEEP_CHECKPOINTS` are kept.
- `seed_everything`: python/numpy/torch seeds; `configure_determinism`: threads per rank + deterministic algorithms.
- `MetricsLogger`: JSONL (+ TensorBoard when installed) under `output_dir/_vlflow/` (timings and event-file names are
  not data: `_vlflow/` is left out of the artifact's data digest), rank 0 only.
- `load_tokenizer`: the `tokenizer` input when given, else a hub name / local path.
- `ResumableSampler`: the data order as a pure function of (seed, batch index), so a resumed run continues with
  exactly the batches an uninterrupted run would have seen.

In a multi-node run `ctx.work_dir` must be on a file system all nodes share: every rank loads the checkpoint files.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from vlflow.stages.common.device import cpu_threads_per_rank
from vlflow.stages.common.export import master_weights, restore_master_weights

from vlflow.errors import StageError
from vlflow.stage import StageContext
from vlflow.store import META_DIR

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
KEEP_CHECKPOINTS = 2
MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE = "model.pt", "optimizer.pt", "lr_scheduler.pt", "state.json"
MASTER_FILE = "master_weights.pt"  # fp32 masters where the plugin keeps them apart from the model (ZeRO, AMP)


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that per_device_batch x world_size x steps == global_batch."""
    if global_batch < 1 or per_device_batch < 1 or world_size < 1:
        raise StageError(f"batch sizes and world size must be positive (global_batch={global_batch}, "
                         f"per_device_batch={per_device_batch}, world_size={world_size})", field="global_batch")
    per_step = per_device_batch * world_size
    if global_batch < per_step or global_batch % per_step != 0:
        raise StageError(f"global_batch {global_batch} must be a positive multiple of per_device_batch "
                         f"{per_device_batch} x world size {world_size} = {per_step}", field="global_batch")
    return global_batch // per_step


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with `seed + rank`.

    Build a model right after `seed_everything(seed)` (rank 0 for all), so that every rank starts from the same
    weights: LowLevelZeroPlugin and GeminiPlugin do not broadcast parameters (only torch DDP does). Seed per rank
    (`rank=`) afterwards, for each rank's own dropout/augmentation stream.
    """
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def configure_determinism(world_size: int = 1) -> int:
    """Threads per rank and deterministic kernels, so a training stage's result is a function of its seed, world
    size and thread count. Threads: OMP_NUM_THREADS when set, else the machine's cores / ranks on this node
    (LOCAL_WORLD_SIZE from torchrun, else `world_size`), so ranks do not oversubscribe a CPU machine. Deterministic
    algorithms warn (not fail) where an op has no deterministic kernel. On GPUs cuBLAS also needs
    CUBLAS_WORKSPACE_CONFIG=:4096:8 (set here when absent; it must be set before the first cuBLAS call), and
    atomics-based kernels (index_add/scatter backward, some attention backward) still vary run to run.
    Returns the thread count."""
    threads = cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE") or world_size or 1))
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return threads


def load_tokenizer(inputs: dict[str, Path], name_or_path: str, field: str = "with.tokenizer"):
    """The `tokenizer` input directory when given, else `name_or_path` (hub name or local dir)."""
    from transformers import AutoTokenizer

    source = inputs.get("tokenizer") or name_or_path
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot load tokenizer {str(source)!r}: {exc}", field=field) from None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _checkpoints_dir(ctx: StageContext) -> Path:
    if ctx.work_dir is None:
        raise StageError(f"stage {ctx.stage} saves checkpoints but has no work_dir (its spec must be resumable)")
    return Path(ctx.work_dir) / CHECKPOINTS_DIR


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's random draws (dropout, masks, negatives): a function of where it is in training,
    not of how many draws came before, so a resumed run draws what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % 2**63


def save_checkpoint(ctx: StageContext, model, optimizer, lr_scheduler, step: int, extra: dict | None = None,
                    write_files: Callable[[Path], None] | None = None) -> Path:
    """Save model/optimizer/scheduler through `ctx.booster` as checkpoint `step`; all ranks must call it.

    `write_files(dir)` (rank 0) adds the stage's own files (e.g. EMA weights) before the checkpoint is published, so
    a checkpoint is never seen without them."""
    root = _checkpoints_dir(ctx)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    # Every rank takes part: sharded plugins (ZeRO, Gemini) gather their pieces; torch_ddp writes on rank 0 only.
    ctx.booster.save_model(model, str(tmp / MODEL_FILE))
    ctx.booster.save_optimizer(optimizer, str(tmp / OPTIMIZER_FILE))
    if lr_scheduler is not None:
        ctx.booster.save_lr_scheduler(lr_scheduler, str(tmp / SCHEDULER_FILE))
    masters = master_weights(model, optimizer, ctx.is_main)  # the Booster saves only the rounded working weights
    if masters is not None and ctx.is_main:
        torch.save(masters, tmp / MASTER_FILE)
    _barrier()
    if ctx.is_main:
        if write_files is not None:
            write_files(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "extra": extra or {}}))
        shutil.rmtree(final, ignore_errors=True)  # same step saved by an attempt that died before updating latest
        os.replace(tmp, final)
        _write_atomically(root / LATEST_FILE, final.name)  # the commit point
        _prune(root, keep=final.name)
        ctx.log.info("checkpoint saved at step %d (%s)", step, final)
    _barrier()
    return final


def _prune(root: Path, keep: str) -> None:
    """Delete all but the newest KEEP_CHECKPOINTS step directories (never `keep`), and stale temporary ones."""
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-KEEP_CHECKPOINTS]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ctx: StageContext) -> Path | None:
    """The directory the `latest` pointer names, or None when no checkpoint was completed."""
    if ctx.work_dir is None:
        return None
    root = Path(ctx.work_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise StageError(f"checkpoint pointer {pointer} names {path.name}, which is missing or incomplete; "
                         f"delete {root} to start over")
    return path


def load_checkpoint(ctx: StageContext, model, optimizer, lr_scheduler) -> tuple[int, dict] | None:
    """Load the latest checkpoint into the boosted objects; returns (step, extra), or None when there is none."""
    path = latest_checkpoint(ctx)
    if path is None:
        return None
    ctx.booster.load_model(model, str(path / MODEL_FILE))
    ctx.booster.load_optimizer(optimizer, str(path / OPTIMIZER_FILE))
    if (path / MASTER_FILE).is_file():  # load_model set the masters to the rounded working weights
        restore_master_weights(model, optimizer, torch.load(path / MASTER_FILE, map_location="cpu",
                                                            weights_only=True))
    if lr_scheduler is not None:
        ctx.booster.load_lr_scheduler(lr_scheduler, str(path / SCHEDULER_FILE))
    state = json.loads((path / STATE_FILE).read_text())
    ctx.log.info("resumed from checkpoint %s (step %d)", path, state["step"])
    return state["step"], state["extra"]


class MetricsLogger:
    """Appends `{"step": n, ...}` lines to `<output_dir>/_vlflow/metrics.jsonl` (and TensorBoard scalars under
    `_vlflow/tensorboard/`) on rank 0: they carry timings and the event file name carries time and host, so they live
    in the artifact's bookkeeping, outside its data digest (a rerun reproducing the weights leaves downstream cached).

    Other ranks get a logger that does nothing, so stages can call it unconditionally.
    """

    def __init__(self, ctx: StageContext, filename: str = "metrics.jsonl", tensorboard: bool = True) -> None:
        self.enabled = ctx.is_main
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        directory = ctx.output_dir / META_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self._file = open(directory / filename, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                log.info("tensorboard not installed: metrics go to %s only", filename)
            else:
                self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ResumableSampler:
    """Endless batches of dataset indices for one rank; use as `DataLoader(dataset, batch_sampler=sampler)`.

    Epoch `e` is a permutation seeded by `seed + e`. Global batch `b` of an epoch is the slice
    `[b * world_size * batch_size, (b + 1) * world_size * batch_size)` of it, and rank `r` takes the r-th
    `batch_size` piece of that slice. The tail that does not fill a global batch is dropped so all ranks step together.
    Set `start_batch` (batches per rank already consumed: optimizer steps x accumulation steps) before iterating to
    resume where a previous run stopped.

    `item_seeds=True`: batches of (index, item_seed) pairs instead. The epoch's generator, after the permutation,
    draws one seed per position of the epoch; a dataset seeds that sample's own random choices with it (ViLT's
    RandAugment, its drawn false image), in whichever DataLoader worker loads it, and a resumed run sees the same.
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_batch: int = 0, item_seeds: bool = False) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        self.item_seeds = item_seeds
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = dataset_size // self.global_batch
        if self.batches_per_epoch == 0:
            raise StageError(f"dataset of {dataset_size} samples is smaller than one global batch "
                             f"({batch_size} per device x {world_size} ranks = {self.global_batch})")
        self._cached_epoch, self._cached_order, self._cached_seeds = -1, None, None

    def epoch_of(self, batch_index: int) -> int:
        return batch_index // self.batches_per_epoch

    def batch(self, batch_index: int) -> list[int] | list[tuple[int, int]]:
        """This rank's indices for its `batch_index`-th batch (counting across epochs); (index, item_seed) pairs
        with `item_seeds`."""
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        order = self._permutation(epoch)
        start = within * self.global_batch + self.rank * self.batch_size
        indices = order[start:start + self.batch_size].tolist()
        if not self.item_seeds:
            return indices
        return list(zip(indices, self._cached_seeds[start:start + self.batch_size].tolist()))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached_epoch, self._cached_order = epoch, torch.randperm(self.dataset_size, generator=generator)
            if self.item_seeds:  # drawn after the permutation: the order is the same with or without seeds
                self._cached_seeds = torch.randint(2**62, (self.dataset_size,), generator=generator)
        return self._cached_order

    def __iter__(self) -> Iterator[list[int]]:
        batch_index = self.start_batch
        while True:  # endless: the training loop decides when to stop (by step count)
            yield self.batch(batch_index)
            batch_index += 1
