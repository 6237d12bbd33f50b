"""Build the Colossal-AI plugin and Booster that a `launch:` block asks for.

Checks the combination first, so that an unsupported one (a GPU-only plugin on a CPU machine, a precision the plugin
cannot do) fails with a LaunchError naming the field instead of an assertion deep inside colossalai.
Call after `colossalai.launch_from_*`: plugins read the process group when they are created.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin
from colossalai.booster.plugin.plugin_base import Plugin
from colossalai.booster.plugin.torch_ddp_plugin import TorchDDPModel
from colossalai.interface import OptimizerWrapper
from colossalai.shardformer.policies.base_policy import Policy
from torch import nn

from vlflow.errors import LaunchError
from vlflow.stage import LaunchSpec

GPU_ONLY_PLUGINS = ("low_level_zero", "gemini", "hybrid_parallel")


def runs_off_cuda(launch: LaunchSpec) -> bool:
    """hybrid_parallel without tensor/pipeline parallelism or ZeRO is data parallel with fp32 master weights in its
    mixed-precision optimizer: that runs on gloo CPU ranks (tests/stages/common/test_plugins_export.py trains and
    exports it)."""
    return (launch.plugin == "hybrid_parallel" and launch.tp_size == 1 and launch.pp_size == 1
            and launch.zero_stage == 0 and launch.precision in ("fp32", "bf16"))


def check_launch(launch: LaunchSpec, device: str, world_size: int) -> None:
    """Raise LaunchError when `launch` cannot run on `device` ("cuda", "cpu", ...) with `world_size` ranks."""
    if device != "cuda" and launch.plugin in GPU_ONLY_PLUGINS and not runs_off_cuda(launch):
        hint = (" (on a CPU it runs as plain data parallel only: tp_size 1, pp_size 1, zero_stage 0, fp32 or bf16)"
                if launch.plugin == "hybrid_parallel" else "")
        raise LaunchError(f"plugin {launch.plugin} needs CUDA GPUs (its ZeRO/Gemini/tensor-parallel kernels do not "
                          f"run on {device}){hint}; use plugin: torch_ddp here", field="launch.plugin")
    if launch.plugin == "torch_ddp":
        if launch.precision == "fp16" and device != "cuda":
            raise LaunchError(f"precision fp16 with torch_ddp uses CUDA automatic mixed precision and does not run "
                              f"on {device}; use precision: fp32", field="launch.precision")
        if launch.precision == "bf16":
            raise LaunchError("precision bf16 is not available with plugin torch_ddp in this Colossal-AI version "
                              "(its Booster has no bf16 mixed precision); use fp16, or plugin low_level_zero, "
                              "gemini or hybrid_parallel for bf16", field="launch.precision")
    if launch.plugin == "low_level_zero" and launch.zero_stage not in (1, 2):
        raise LaunchError(f"low_level_zero needs zero_stage 1 or 2, got {launch.zero_stage}",
                          field="launch.zero_stage")
    if launch.plugin == "gemini" and launch.precision == "fp32":
        raise LaunchError("plugin gemini trains in fp16 or bf16 only; set precision: fp16 or bf16",
                          field="launch.precision")
    if launch.plugin == "hybrid_parallel" and world_size % (launch.tp_size * launch.pp_size) != 0:
        raise LaunchError(f"world size {world_size} is not divisible by tp_size {launch.tp_size} x pp_size "
                          f"{launch.pp_size}", field="launch.tp_size")


class CpuTorchDDPPlugin(TorchDDPPlugin):
    """TorchDDPPlugin for CPU/gloo ranks: identical except that BatchNorm layers stay as they are.

    TorchDDPPlugin.configure always converts BatchNorm to SyncBatchNorm, which has no CPU kernel, so any model with a
    trainable BatchNorm would fail on CPU. Here each rank keeps its own BatchNorm statistics, as plain DDP does."""

    def configure(self, model: nn.Module, optimizer=None, criterion=None, dataloader=None, lr_scheduler=None):
        model = TorchDDPModel(model.to(get_accelerator().get_current_device()), **self.ddp_kwargs)
        if optimizer is not None and not isinstance(optimizer, OptimizerWrapper):
            optimizer = OptimizerWrapper(optimizer)
        return model, optimizer, criterion, dataloader, lr_scheduler


class ReplicatedPolicy(Policy):
    """A shardformer policy that leaves the model whole: hybrid_parallel with tp_size = pp_size = 1 is data
    parallel (ZeRO by zero_stage) and needs no per-architecture policy."""

    def config_sanity_check(self):
        pass

    def preprocess(self) -> nn.Module:
        return self.model

    def module_policy(self) -> dict:
        return {}

    def postprocess(self) -> nn.Module:
        return self.model

    def get_held_layers(self) -> list[nn.Module]:
        return [self.model]

    def get_shared_params(self) -> list:
        return []


def make_plugin(launch: LaunchSpec, max_norm: float = 0.0) -> Plugin:
    """The plugin for `launch`. `max_norm` > 0: gradient clipping by global L2 norm inside the optimizer step, where the
    plugin owns it (ZeRO, Gemini, hybrid parallel clip their sharded fp32 master gradients, which exist only inside
    step()); torch_ddp ignores it (the training loop clips the all-reduced gradients itself)."""
    if launch.plugin == "torch_ddp":
        # Gradients as views into DDP's all-reduce buckets: one copy of every gradient less per step.
        ddp_plugin = CpuTorchDDPPlugin if get_accelerator().name == "cpu" else TorchDDPPlugin
        return ddp_plugin(gradient_as_bucket_view=True)
    if launch.plugin == "low_level_zero":
        return LowLevelZeroPlugin(stage=launch.zero_stage, precision=launch.precision, max_norm=max_norm)
    if launch.plugin == "gemini":
        return GeminiPlugin(precision=launch.precision, max_norm=max_norm)
    if launch.plugin == "hybrid_parallel":
        # Pipeline parallelism needs a micro-batch split; one sample per micro-batch is the simplest valid choice.
        microbatch_size = 1 if launch.pp_size > 1 else None
        # Without tp/pp nothing is sharded by layer: a policy that replaces nothing (any model), instead of the
        # shardformer auto policy that exists only for the transformers models colossalai lists.
        policy = ReplicatedPolicy() if launch.tp_size == launch.pp_size == 1 else None
        return HybridParallelPlugin(tp_size=launch.tp_size, pp_size=launch.pp_size, zero_stage=launch.zero_stage,
                                    precision=launch.precision, microbatch_size=microbatch_size, max_norm=max_norm,
                                    custom_policy=policy)
    raise LaunchError(f"unknown plugin {launch.plugin!r}", field="launch.plugin")


def booster_factory(launch: LaunchSpec) -> Callable[[float], tuple[Booster, Plugin]]:
    """What the worker gives a distributed stage (`ctx.booster_factory`): `launch` is checked now, so an impossible
    one fails before the stage runs; the plugin is built later, once, by the stage that trains (`fit` passes its
    grad_clip as `max_norm`: the ZeRO/Gemini/hybrid plugins take it only in their constructor, and building one
    creates process groups, so it is not built first without it and then again)."""
    check_launch(launch, get_accelerator().name, dist.get_world_size())
    return partial(make_booster, launch)


def make_booster(launch: LaunchSpec, max_norm: float = 0.0) -> tuple[Booster, Plugin]:
    """The Booster and its plugin for `launch` (precision through Booster for torch_ddp, else through the plugin);
    `max_norm` as in `make_plugin` (a training stage asks for it with its grad_clip)."""
    check_launch(launch, get_accelerator().name, dist.get_world_size())
    plugin = make_plugin(launch, max_norm)
    # Only torch_ddp leaves precision to the Booster; the other plugins take it as a constructor argument.
    mixed_precision = "fp16" if launch.plugin == "torch_ddp" and launch.precision == "fp16" else None
    return Booster(plugin=plugin, mixed_precision=mixed_precision), plugin
