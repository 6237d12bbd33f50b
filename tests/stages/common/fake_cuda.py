"""Run stage code as if on a GPU, on this CPU-only machine, and fail wherever a CPU tensor meets a CUDA one.

PyTorch's FakeTensorMode with fake CUDA tensors runs forward passes here (this torch is a CUDA build; fake tensors
carry shapes, dtypes and devices, no data) and raises `FakeTensorDeviceMismatchError` where an op mixes a CPU tensor
with a CUDA one, exactly where a real GPU would raise. What it cannot do (measured): backward (needs a real GPU), and
ops whose output depends on the data (`.item()`, `.tolist()`, boolean indexing). This mode differs from the stock
one in two ways, so that whole stages run to the end:
- ops on CPU tensors alone run for real (data loading, tokenising and host-side reads keep their values); only what
  is made on or moved to CUDA becomes fake;
- data-dependent reads of fake tensors (decoding reads tokens back on the host) get placeholders: every scalar read
  is 0 / False, `nonzero` selects every position, and a CUDA tensor copied to the CPU (`.cpu()`) arrives as real
  zeros. Those values are meaningless: the check is about devices, dtypes and shapes, never about device results.
Autocast on "cuda" is disabled here (torch.cuda.is_available() is False), so dtypes are fp32 inside.

    with fake_cuda():  # stage_device() (vlflow.stages.common.device) is cuda:0; Module.to(cuda) gives fake weights
        scores = score_pairs(model, batches, device=stage_device(), ...)

Tensors made before entering (real CPU tensors: a loaded model, a tokenised batch) may be passed in; they count as
CPU tensors. `to_fake_cuda(model)` moves a module without going through the stage code.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils import _pytree as pytree

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)

__all__ = ["FakeTensorDeviceMismatchError", "fake_cuda", "to_fake_cuda", "CUDA"]


class _PlaceholderFakeMode(FakeTensorMode):
    """FakeTensorMode that answers data-dependent ops with placeholders instead of raising."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _touches_device(args, kwargs):  # host work stays real: data loading, tokenising, host-side reads
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func in _INDEXING:
            _check_indices(func, args[0], args[1])
        if func is aten._local_scalar_dense.default:  # .item(), .tolist(), bool(), int()
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if func is aten._to_copy.default and isinstance(args[0], FakeTensor) and args[0].device.type == "cuda" \
                and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            # a device result read back to the host (.cpu()): real placeholder zeros, so host code keeps running
            with unset_fake_temporarily():
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten._nested_tensor_from_mask_left_aligned.default:  # nn.Transformer's fast-path check: no
            return False
        if func is aten.nonzero.default:  # boolean indexing and masks: every position selected
            tensor = args[0]
            return super().__torch_dispatch__(aten.empty.memory_format, types, ((tensor.numel(), tensor.dim()),),
                                              {"dtype": torch.long, "device": tensor.device})
        if func is aten.masked_select.default:
            tensor, mask = args[0], args[1]
            size = torch.broadcast_shapes(tensor.shape, mask.shape).numel()
            if tensor.device != mask.device and mask.dim() > 0:
                raise FakeTensorDeviceMismatchError(func, tensor.device, mask.device)
            return super().__torch_dispatch__(aten.empty.memory_format, types, ((size,),),
                                              {"dtype": tensor.dtype, "device": tensor.device})
        return super().__torch_dispatch__(func, types, args, kwargs)


# A CUDA tensor may be indexed with CPU indices, but a CPU tensor not with CUDA ones (real torch raises; fake
# tensors' own rules let it pass)
_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._unsafe_index.Tensor)


def _check_indices(func, tensor: torch.Tensor, indices) -> None:
    for index in indices:
        if isinstance(index, torch.Tensor) and tensor.device.type == "cpu" and index.device.type != "cpu":
            raise FakeTensorDeviceMismatchError(func, tensor.device, index.device)


def _touches_device(args, kwargs) -> bool:
    """Whether an op involves a fake tensor or makes one on CUDA."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        return True
    return any(isinstance(leaf, FakeTensor) for leaf in pytree.tree_leaves((args, kwargs)))


_active: list[_PlaceholderFakeMode] = []


def _fake(tensor: torch.Tensor, mode: _PlaceholderFakeMode) -> torch.Tensor:
    return tensor if isinstance(tensor, FakeTensor) else mode.from_tensor(tensor)


def to_fake_cuda(module: nn.Module, *args, **kwargs) -> nn.Module:
    """`module.to(*args)` (default: cuda:0) with fake weights, inside `fake_cuda()`.

    nn.Module.to cannot swap a parameter for a fake one; this replaces parameters and buffers in place instead."""
    if not _active:
        raise RuntimeError("to_fake_cuda needs an active fake_cuda() context")
    mode = _active[-1]
    if not args and not kwargs:
        args = (CUDA,)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                moved = _fake(param, mode).to(*args, **kwargs)
                if moved is not param:
                    sub._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = _fake(buffer, mode).to(*args, **kwargs)
    return module


@contextmanager
def fake_cuda(placeholders: bool = True) -> Iterator[FakeTensorMode]:
    """Fake CUDA for the code inside: `stage_device()` is cuda:0 (torch.cuda.is_available() stays False), tensors
    made or moved there are fake, and `Module.to` / `.cuda()` give fake weights. `placeholders=False` keeps
    FakeTensorMode's own errors on data-dependent ops (to prove a step has none)."""
    mode = _PlaceholderFakeMode(allow_non_fake_inputs=True) if placeholders else \
        FakeTensorMode(allow_non_fake_inputs=True)
    with ExitStack() as stack:
        # torch.cuda.is_available itself must stay False: FakeTensorMode would then initialise the real driver
        stack.enter_context(mock.patch("vlflow.stages.common.device.cuda_available", return_value=True))
        stack.enter_context(mock.patch.object(nn.Module, "to", to_fake_cuda))
        stack.enter_context(mock.patch.object(nn.Module, "cuda", lambda self, device=None: to_fake_cuda(
            self, torch.device("cuda", device or 0))))
        real_load = torch.load

        def load_real(*args, **kwargs):  # torch.load under a fake mode makes data-less tensors; files hold data
            with unset_fake_temporarily():
                return real_load(*args, **kwargs)

        stack.enter_context(mock.patch("torch.load", load_real))
        stack.enter_context(warnings.catch_warnings())  # torch.autocast("cuda") here: disabled, said once is enough
        warnings.filterwarnings("ignore", message="CUDA is not available.*Disabling autocast")
        _active.append(mode)
        stack.callback(_active.pop)
        stack.enter_context(mode)
        yield mode
