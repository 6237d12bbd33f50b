"""The trained model as full fp32 weights, whichever plugin trained it: the one way every training stage exports.

After `fit`, the unwrapped module is not always the trained model: under Gemini its parameters are views into
chunks that are sharded across ranks (rank 0 holds a slice), and under ZeRO (low_level_zero, hybrid_parallel with
zero_stage > 0) with bf16/fp16 it holds the rounded low-precision working copy, while the fp32 master weights are
sharded across ranks inside the optimizer. `gathered_state_dict` collects what the plugin holds:

- Gemini: `GeminiDDP.state_dict(only_rank_0=True)` gathers the chunks (its fp32 copies, since the plugin is built
  without `enable_gradient_accumulation`, which would keep only fp16 chunks);
- ZeRO: each parameter's fp32 master shard, all-gathered over its data-parallel group and un-padded;
- mixed precision without ZeRO (hybrid_parallel zero_stage 0 with bf16/fp16): the optimizer's full fp32 masters;
- torch_ddp and fp32: the module's own weights (DDP keeps them fp32 and identical on every rank).

Frozen parameters and buffers have no fp32 master: ZeRO and hybrid mixed precision cast them to bf16/fp16 with the
module. `remember_untrained` (called by `fit` before boosting) keeps their fp32 values; the export gives those back
wherever training left the tensor equal to its rounded original (frozen weights, FrozenBatchNorm statistics), and the
working value where training changed it (e.g. BatchNorm running statistics, updated in the working dtype).

`trained_module` loads that into the unwrapped module on rank 0 (replacing its tensors, so no sharded or rounded
storage survives), ready for the stage's own format (`save_pretrained`, `torch.save`). All ranks must call it.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from vlflow.errors import StageError

WRAPPER_PREFIX = "module."


def _fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.unwrap() if hasattr(model, "unwrap") else model


# unwrapped module -> fp32 CPU copies of its frozen parameters and floating buffers, taken before boosting
_UNTRAINED: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def remember_untrained(module: nn.Module) -> None:
    """Keep fp32 copies of the floating tensors no optimizer updates (frozen parameters, buffers), before a plugin
    casts the module to its working precision."""
    _UNTRAINED[module] = {name: _fp32_cpu(tensor) for name, tensor in module.state_dict(keep_vars=True).items()
                          if tensor.is_floating_point() and not (isinstance(tensor, nn.Parameter)
                                                                 and tensor.requires_grad)}


def _original_if_unchanged(tensor: torch.Tensor, original: torch.Tensor | None) -> torch.Tensor:
    """`original` (fp32) where `tensor` is its rounded copy (a cast left it so and training did not change it)."""
    if (original is None or not tensor.is_floating_point() or tensor.dtype == original.dtype
            or tensor.shape != original.shape):
        return tensor
    return original if torch.equal(original.to(tensor.dtype), tensor.detach().cpu()) else tensor


def _gather_zero_master(optimizer, param: nn.Parameter, master: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of `param` from its ZeRO master shards (flat, padded at the end to a multiple of the
    group size, rank r holding chunk r)."""
    from colossalai.accelerator import get_accelerator

    group = optimizer.param_to_pg[param]
    if isinstance(group, tuple):
        raise StageError("exporting weights sharded over a multi-dimensional process group (MoE/sequence parallel "
                         "ZeRO) is not supported")
    shard = master.detach().float().to(get_accelerator().get_current_device())  # NCCL gathers device tensors
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard, group=group)
    return torch.cat(shards)[:param.numel()].view(param.shape)


def gathered_state_dict(model: nn.Module, optimizer, is_main: bool) -> dict[str, torch.Tensor]:
    """The boosted `model`'s full state dict in fp32 on the CPU on rank 0 (`{}` on other ranks). All ranks call it:
    Gemini and ZeRO gather across ranks."""
    from colossalai.amp.naive_amp.mixed_precision_optimizer import MixedPrecisionOptimizer
    from colossalai.zero import GeminiDDP, LowLevelZeroOptimizer

    module = _unwrap(model)
    if isinstance(model, GeminiDDP):
        state = model.state_dict(only_rank_0=True)
        if not is_main:
            return {}
        own_keys = set(module.state_dict().keys())
        return {(key[len(WRAPPER_PREFIX):] if key not in own_keys and key.startswith(WRAPPER_PREFIX) else key):
                _fp32_cpu(value) for key, value in state.items()}

    masters: dict[int, torch.Tensor] = {}
    if isinstance(optimizer, LowLevelZeroOptimizer):  # low_level_zero, hybrid_parallel with zero_stage > 0
        working_to_master = optimizer.get_working_to_master_map()
        for param in module.parameters():  # the same order on every rank: the all-gathers pair up
            if id(param) in working_to_master:
                masters[id(param)] = _gather_zero_master(optimizer, param, working_to_master[id(param)])
    elif isinstance(optimizer, MixedPrecisionOptimizer):  # hybrid_parallel zero_stage 0 bf16/fp16: full masters
        masters = {id(param): master for param, master in optimizer.working_to_master_map.items()}
    if not is_main:
        return {}
    untrained = _UNTRAINED.get(module, {})
    converted: dict[int, torch.Tensor] = {}  # by tensor: a tied weight stays one tensor under both names
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in converted:
            value = masters.get(id(tensor))
            if value is None:
                value = _original_if_unchanged(tensor, untrained.get(name))
            converted[id(tensor)] = _fp32_cpu(value)
    return {name: converted[id(tensor)] for name, tensor in module.state_dict(keep_vars=True).items()}


def trained_module(model: nn.Module, optimizer, is_main: bool) -> nn.Module | None:
    """Rank 0: the unwrapped module holding the full fp32 trained weights on the CPU (its tensors replaced, so
    sharded or rounded storage is gone); other ranks: None. All ranks call it; training is over afterwards."""
    state = gathered_state_dict(model, optimizer, is_main)
    if not is_main:
        return None
    module = _unwrap(model)
    # a tied weight (ViLT's MLM decoder = word embeddings) may come back under one of its names only: give every
    # name of the same tensor that value, so the tie survives and the strict load sees every key
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    for names in names_by_tensor.values():
        present = next((name for name in names if name in state), None)
        for name in names if present is not None else ():
            state.setdefault(name, state[present])
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def _separate_masters(optimizer) -> bool:
    from colossalai.amp.naive_amp.mixed_precision_optimizer import MixedPrecisionOptimizer
    from colossalai.zero import LowLevelZeroOptimizer

    return isinstance(optimizer, (LowLevelZeroOptimizer, MixedPrecisionOptimizer))


def master_weights(model: nn.Module, optimizer, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights by parameter name (full, on the CPU, rank 0; `{}` elsewhere) where the optimizer keeps
    them apart from the module's weights (ZeRO, hybrid_parallel mixed precision); None where it does not (torch_ddp,
    Gemini, whose model state dict already holds its fp32 copies). A checkpoint needs them: the Booster saves the
    module's bf16/fp16 working weights, and loading them sets the masters to those rounded values
    (`update_master_params`), so a resumed run would continue from rounded weights. All ranks call it."""
    if not _separate_masters(optimizer):
        return None
    state = gathered_state_dict(model, optimizer, is_main)
    return {name: state[name] for name, _ in _unwrap(model).named_parameters()} if is_main else {}


@torch.no_grad()
def restore_master_weights(model: nn.Module, optimizer, masters: dict[str, torch.Tensor]) -> None:
    """Copy saved full fp32 masters into the optimizer's master copies (each ZeRO rank takes its own shard of the
    flattened, end-padded parameter, as Colossal-AI's `update_master_params` does)."""
    from colossalai.zero import LowLevelZeroOptimizer

    working_to_master = optimizer.get_working_to_master_map()
    for name, param in _unwrap(model).named_parameters():
        if id(param) not in working_to_master:
            continue
        master = working_to_master[id(param)]
        value = masters[name].to(device=master.device, dtype=master.dtype)
        if isinstance(optimizer, LowLevelZeroOptimizer):
            group = optimizer.param_to_pg[param]
            flat = torch.nn.functional.pad(value.flatten(), [0, optimizer.get_param_padding_size(param)])
            value = flat.chunk(dist.get_world_size(group))[dist.get_rank(group)]
        master.copy_(value.view_as(master))
