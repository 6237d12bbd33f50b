"""`fit`: the one training loop of every training stage (vilt.pretrain/finetune_retrieval/finetune_vqa, unitab.pretrain,
testing.train). A stage builds its model, optimizer and schedule and plugs in a `TrainTask`:

- `prepare(batch, generator)` (optional): the micro-batch's random choices (MLM masks, ITM negatives, false captions),
  made on the host batch with a CPU generator seeded by (seed, step, micro-batch, rank), so a resumed run draws what
  an uninterrupted one would;
- `losses(model, batch)`: the forward pass on the model's device; returns `{"loss": fp32 scalar, other scalars}`.

Device placement by construction: the collated, prepared batch is moved to the model's device once (`to_device`,
non-blocking); everything a step makes from it (labels, masks, losses) is made from device tensors. The step loss
that is all-reduced for logging lives on the device too.

Per optimizer step: `accumulation` micro-batches (gradient all-reduce only on the last where the plugin supports
`no_sync`: torch_ddp, ZeRO-1), clipping the way the plugin supports it (see `clip_gradients`), `optimizer.step()`,
the LR schedule stepped once, hooks (`FitHook.after_step`: EMA), logging every `log_every` steps (mean over ranks, to
`output_dir/_vlflow/metrics.jsonl`), an atomic checkpoint every `checkpoint_every` steps (`save_checkpoint`, hooks add
their files before it is published) and resume from the latest one.

Gradient accumulation dtype: under torch_ddp gradients accumulate in the parameters' dtype (fp32; fp16 autocast keeps
fp32 weights). Under low_level_zero with bf16/fp16, Colossal-AI 0.5.0 keeps working gradients and its reduced-gradient
store in the working (bf16/fp16) dtype and converts to the fp32 master gradients only in `step()`
(zero/low_level/low_level_optim.py: `add_gradients_by_param_id` adds into working-dtype slices; `grad.to(master dtype)`
at step). So N micro-batches accumulate with N roundings in bf16. Measured on 1M-element gradients (CPU, bf16
micro-gradients): relative error of the accumulated gradient 1.7e-3 for 1 micro-batch, 3.1e-3 for 4, 4.9e-3 for 16
in bf16, against 1.6e-3 / 1.3e-3 accumulating the same bf16 micro-gradients in fp32. The choice here: accept it, and
keep accumulation small (at most ~4: a large per-device batch) under ZeRO bf16; fp32 accumulation would need a full
fp32 gradient copy outside Colossal-AI's reduction hooks. ZeRO-2 and Gemini have no `no_sync`: each micro-batch is
reduced (into the same working-dtype store).
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from vlflow.stages.common.export import remember_untrained
from vlflow.stages.common.training import MetricsLogger, latest_checkpoint, load_checkpoint, save_checkpoint, step_seed

from vlflow.errors import StageError
from vlflow.executors.preempt import Preempted, preemption_notice
from vlflow.stage import StageContext

EMA_FILE = "ema.pt"


def to_device(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor inside (nested dicts, lists, tuples) moved to `device` (non-blocking)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def first_dim(value: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(value, torch.Tensor):
        return len(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        size = first_dim(item)
        if size:
            return size
    return 0


@dataclass
class TrainTask:
    """What a model plugs into `fit`: see the module docstring."""

    losses: Callable[[nn.Module, Any], dict]
    prepare: Callable[[Any, torch.Generator], Any] | None = None


@dataclass
class FitSettings:
    max_steps: int
    accumulation: int = 1
    seed: int = 0
    grad_clip: float = 0.0  # max global L2 norm of the gradients; 0 disables
    log_every: int = 50
    checkpoint_every: int = 1000


class FitHook(Protocol):
    def start(self, model: nn.Module, device: torch.device, checkpoint: Path | None, ctx: StageContext) -> None:
        """Called once after boosting and loading the checkpoint `checkpoint` (None: a fresh start)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step with the unwrapped model."""

    def save(self, directory: Path) -> None:
        """Rank 0 adds its files to a checkpoint directory before it is published."""


class Ema:
    """Exponential moving average of the weights (MDETR/UniTAB `--ema`), kept in fp32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float):
        # copied from the fp32 model before boosting (a ZeRO bf16 model would give a rounded start)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def start(self, model: nn.Module, device: torch.device, checkpoint: Path | None, ctx: StageContext) -> None:
        from colossalai.booster.plugin import GeminiPlugin

        if isinstance(ctx.plugin, GeminiPlugin):  # its module parameters are chunk views, sharded across ranks
            raise StageError("an EMA of the weights is not supported under the gemini plugin (its parameters are "
                             "sharded chunks between steps): use low_level_zero or torch_ddp, or turn the EMA off",
                             field="launch.plugin")
        self.model.to(device)
        if checkpoint is None:
            return
        file = checkpoint / EMA_FILE
        if file.is_file():
            self.model.load_state_dict(torch.load(file, map_location=device, weights_only=True))
        else:  # as UniTAB does when a checkpoint has no EMA
            ctx.log.warning("checkpoint has no %s: EMA restarts from the current weights", EMA_FILE)
            self.model.load_state_dict(model.state_dict())

    def after_step(self, model: nn.Module, step: int) -> None:
        ema_update(self.model, model, self.decay)

    def save(self, directory: Path) -> None:
        torch.save(cpu_state_dict(self.model), directory / EMA_FILE)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters (in the EMA's dtype); buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        target = ema_params[name]
        target.mul_(decay).add_(param.detach().to(target.dtype), alpha=1 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, buffer in model.named_buffers():
        ema_buffers[name].copy_(buffer)


@dataclass
class FitResult:
    model: nn.Module  # boosted
    optimizer: Any  # boosted
    step: int
    resumed_from_step: int
    metrics: dict = field(default_factory=dict)  # the last logged means (over ranks)

    def unwrapped(self) -> nn.Module:
        return self.model.unwrap() if hasattr(self.model, "unwrap") else self.model


def plugin_clips(plugin) -> bool:
    """Whether the plugin clips inside `optimizer.step()` from its own `max_norm` (ZeRO, Gemini, hybrid parallel):
    their optimizers hold sharded master gradients that only exist inside step()."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin

    return isinstance(plugin, (LowLevelZeroPlugin, GeminiPlugin, HybridParallelPlugin))


def clip_gradients(optimizer, plugin, model: nn.Module, max_norm: float) -> None:
    """torch_ddp (and no plugin): the booster's optimizer wrapper clips the accumulated, all-reduced gradients
    (unscaling first under fp16). ZeRO/Gemini/hybrid: the plugin was built with max_norm and clips in step()."""
    if max_norm <= 0 or plugin_clips(plugin):
        return
    if hasattr(optimizer, "clip_grad_by_norm"):
        optimizer.clip_grad_by_norm(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def adamw_choice(plugin: str | None) -> tuple[type, dict]:
    """The AdamW implementation a plugin can drive, and its extra arguments. GeminiOptimizer accepts only Colossal-AI's
    Adams (HybridAdam/CPUAdam/FusedAdam; colossalai 0.5.0 zero/gemini/gemini_optimizer.py `_AVAIL_OPTIM_LIST`):
    HybridAdam in AdamW mode (decoupled weight decay, as torch's AdamW). Elsewhere torch's AdamW."""
    if plugin == "gemini":
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam, {"adamw_mode": True}
    return torch.optim.AdamW, {}


def make_adamw(ctx: StageContext, param_groups: list[dict], lr: float, betas: tuple[float, float],
               weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (their own lr/weight_decay override the defaults), as the launch's plugin needs it."""
    plugin = ctx.launch.plugin if ctx.launch is not None else None
    optimizer_class, extra = adamw_choice(plugin)
    try:
        return optimizer_class(param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra)
    except AssertionError as exc:  # HybridAdam without its CPU/CUDA kernel (colossalai's kernel loader asserts)
        raise StageError(f"plugin {plugin} needs Colossal-AI's {optimizer_class.__name__}, which cannot load its "
                         f"kernel here: {exc}", field="launch.plugin") from None


def host_batch(task: TrainTask, batch: Any, generator: torch.Generator) -> Any:
    """The micro-batch's random choices, made on the host (CPU) batch with a CPU generator."""
    return task.prepare(batch, generator) if task.prepare is not None else batch


def device_losses(task: TrainTask, model: nn.Module, batch: Any, device: torch.device | str) -> dict:
    """The prepared host batch moved to the model's device once, then the forward there."""
    return task.losses(model, to_device(batch, device))


def micro_step_losses(task: TrainTask, model: nn.Module, batch: Any, generator: torch.Generator,
                      device: torch.device | str) -> dict:
    """One micro-batch from the loader to its losses: host-side random choices, one move to the device, forward."""
    return device_losses(task, model, host_batch(task, batch, generator), device)


def plugin_max_norm(plugin) -> float:
    """The max_norm a plugin that clips inside step() was built with (Colossal-AI 0.5.0's attributes)."""
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin

    if isinstance(plugin, LowLevelZeroPlugin):
        return plugin.zero_optim_kwargs["clip_grad_norm"]
    if isinstance(plugin, GeminiPlugin):
        return plugin.optim_kwargs["max_norm"]
    return plugin.max_norm  # HybridParallelPlugin


def training_booster(ctx: StageContext, grad_clip: float):
    """The launch's booster, built here once (`ctx.booster_factory`, from the worker) with `max_norm=grad_clip`,
    which the plugins that clip inside step() take only in their constructor. A booster given ready-made (tests,
    other callers) is used as it is, and refused when its plugin clips with another max_norm than grad_clip."""
    if ctx.booster is None and ctx.booster_factory is not None:
        ctx.booster, ctx.plugin = ctx.booster_factory(max_norm=grad_clip)
    elif ctx.plugin is not None and plugin_clips(ctx.plugin) and plugin_max_norm(ctx.plugin) != grad_clip:
        raise StageError(f"the {type(ctx.plugin).__name__} was built with max_norm {plugin_max_norm(ctx.plugin)}, "
                         f"the stage clips at grad_clip {grad_clip}: build it with make_booster(launch, "
                         f"max_norm=grad_clip), or leave ctx.booster unset and give ctx.booster_factory")
    return ctx.booster


def _fingerprint(flat: torch.Tensor) -> torch.Tensor:
    """Sum, sum of squares and a position-weighted sum: equal for equal tensors, almost never for different ones."""
    positions = torch.arange(1, len(flat) + 1, dtype=flat.dtype, device=flat.device)
    return torch.stack([flat.sum(), flat.square().sum(), (flat * positions).sum()])


def check_same_initial_weights(model: nn.Module, device, world_size: int) -> None:
    """Raise when ranks build different initial weights. LowLevelZeroPlugin and GeminiPlugin do not broadcast
    parameters (only torch DDP does), so every rank must initialise from `seed` alone; this compares a per-tensor
    fingerprint across ranks once, before boosting."""
    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        fingerprint = torch.stack([_fingerprint(p.detach().double().flatten()) for p in model.parameters()])
        fingerprint = fingerprint.to(device)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        differs = (low != high).any(dim=1).tolist()
        names = [name for (name, _), different in zip(model.named_parameters(), differs) if different]
        raise StageError(f"ranks start from different initial weights ({len(names)} tensors differ, e.g. "
                         f"{names[0]}): build the model right after seeding with the stage's seed alone, before any "
                         f"per-rank seed (ZeRO and Gemini do not broadcast rank 0's weights)")


def _mean_over_ranks(window: dict[str, list[torch.Tensor]], device) -> dict[str, float]:
    names = sorted(window)
    if not names:
        return {}
    means = torch.stack([torch.stack(window[name]).float().mean() for name in names]).to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(means)
        means /= dist.get_world_size()
    return dict(zip(names, means.tolist()))


def fit(ctx: StageContext, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, task: TrainTask,
        batches: Callable[[int], Iterable], settings: FitSettings, hooks: Iterable[FitHook] = ()) -> FitResult:
    """Train `model` for `settings.max_steps` optimizer steps (resuming from the latest checkpoint in ctx.work_dir).

    `batches(start_batch)`: this rank's micro-batches from the `start_batch`-th on (a ResumableSampler's order).
    """
    from colossalai.accelerator import get_accelerator

    hooks = list(hooks)
    booster = training_booster(ctx, settings.grad_clip)
    if booster is None:
        raise StageError(f"{ctx.stage} is a distributed stage; run it through the launcher (vlflow run)")
    device = get_accelerator().get_current_device()
    check_same_initial_weights(model, device, ctx.world_size)
    remember_untrained(model)  # frozen weights keep their fp32 values in the export when a plugin casts the module
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    resumed = load_checkpoint(ctx, model, optimizer, scheduler)
    step = resumed[0] if resumed else 0
    raw_model = model.unwrap() if hasattr(model, "unwrap") else model
    checkpoint = latest_checkpoint(ctx) if resumed else None
    for hook in hooks:
        hook.start(raw_model, device, checkpoint, ctx)
    use_no_sync = settings.accumulation > 1 and ctx.plugin is not None and ctx.plugin.support_no_sync()
    accumulation = settings.accumulation

    loader: Iterator = iter(batches(step * accumulation))
    ctx.log.info("training %s: %.1fM params, steps %d..%d, %d micro-batches per step", ctx.stage,
                 sum(x.numel() for x in raw_model.parameters()) / 1e6, step, settings.max_steps, accumulation)
    model.train()
    window: dict[str, list[torch.Tensor]] = {}
    window_start, window_samples = time.perf_counter(), 0
    last: dict = {}
    notice = preemption_notice()  # in a Slurm job of vlflow's executor: checkpoint and stop on its warning signal
    with MetricsLogger(ctx) as metrics:
        if step:
            metrics.log(step, resumed_from_step=step)
        while step < settings.max_steps:
            for micro in range(accumulation):
                batch = next(loader)
                window_samples += first_dim(batch) * ctx.world_size
                # dropout, masks and negatives depend only on (seed, step, micro-batch, rank)
                seed = step_seed(settings.seed, step, micro, ctx.rank)
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                sync = micro == accumulation - 1 or not use_no_sync
                with booster.no_sync(model, optimizer) if not sync else nullcontext():
                    out = micro_step_losses(task, model, batch, generator, device)
                    booster.backward(out["loss"] / accumulation, optimizer)
                for key, value in out.items():
                    window.setdefault(key, []).append(value.detach() if torch.is_tensor(value)
                                                      else torch.tensor(float(value)))
            clip_gradients(optimizer, ctx.plugin, raw_model, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            for hook in hooks:
                hook.after_step(raw_model, step)

            if step % settings.log_every == 0 or step == settings.max_steps:
                elapsed = time.perf_counter() - window_start
                last = _mean_over_ranks({k: [v.to(device) for v in vs] for k, vs in window.items()}, device)
                if not math.isfinite(last.get("loss", 0.0)):
                    raise StageError(f"loss became {last['loss']} at step {step}; lower lr or check the data")
                last["lr"] = scheduler.get_last_lr()[0]
                metrics.log(step, **last, samples_per_s=window_samples / max(elapsed, 1e-9))
                ctx.log.info("step %d/%d %s", step, settings.max_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in last.items()))
                window, window_start, window_samples = {}, time.perf_counter(), 0
            due = step % settings.checkpoint_every == 0 and step < settings.max_steps
            preempted = notice is not None and step < settings.max_steps and notice.requested(device)
            if due or preempted:  # one checkpoint at this step, whichever asks for it
                save_checkpoint(ctx, model, optimizer, scheduler, step,
                                write_files=(lambda directory: [hook.save(directory) for hook in hooks]))
            if preempted:
                ctx.log.warning("stopping at step %d on Slurm's warning signal (checkpoint saved)", step)
                raise Preempted()
    return FitResult(model, optimizer, step, resumed[0] if resumed else 0, last)


def training_steps(max_steps: int | None, max_epochs: int | None, batches_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps of a run given as steps or epochs (max_steps wins when both are given, as UniTAB's and
    ViLT's configs mean it). An epoch is `batches_per_epoch` micro-batches per rank (ResumableSampler: the tail that
    does not fill a global batch is dropped), so `max_epochs` passes are max_epochs x batches_per_epoch //
    accumulation steps, at least 1 (PyTorch Lightning's count for ViLT's schedule)."""
    if max_steps is not None:
        return max_steps
    if max_epochs is None:
        raise StageError("neither max_steps nor max_epochs is set", field="with.max_steps")
    return max(1, max_epochs * batches_per_epoch // accumulation)


def warmup_linear_schedule(optimizer: torch.optim.Optimizer, warmup: int | float, max_steps: int):
    """Linear warmup from 0 to the optimizer's lr, then linear decay to 0 at `max_steps` (transformers'
    get_linear_schedule_with_warmup). `warmup`: a step count, or a fraction of max_steps when a float below 1."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps(warmup, max_steps), max_steps)


def warmup_steps(warmup: int | float, max_steps: int) -> int:
    """A float below 1 is a fraction of max_steps (ViLT's warmup ratio), else a step count."""
    return int(warmup * max_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
