"""Where a stage computes and in which precision: one place, so that tests can point every stage at a (fake) GPU.

- `stage_device()`: cuda:LOCAL_RANK when CUDA is available, else the CPU. Stages call it instead of building
  `torch.device("cuda")` themselves; `tests/stages/common/fake_cuda.py` makes
  it (and everything behind it) take the CUDA path.
- `autocast(precision, device)`: the launch's `precision` (bf16 / fp16 autocast; fp32: none) on `device`.
- `limit_cpu_threads(requested=None)`: on a CPU machine, each rank of a launch gets its share of the cores, not all
  of them.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cuda_available() -> bool:
    """Whether stages compute on CUDA (tests/stages/common/fake_cuda.py: True)."""
    return torch.cuda.is_available()


def stage_device(rank: int | None = None) -> torch.device:
    """The device of this rank: cuda:<local rank> when CUDA is available, else cpu."""
    if cuda_available():
        return torch.device("cuda", local_rank() if rank is None else rank)
    return torch.device("cpu")


def autocast(precision: str, device: torch.device):
    """Autocast to the launch's precision on `device` ("fp32" or None: full precision, no autocast)."""
    dtype = AUTOCAST_DTYPES.get(precision or "fp32")
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def launch_precision(ctx) -> str:
    """The precision of the stage's `launch:` block (fp32 when it has none)."""
    return ctx.launch.precision if ctx.launch is not None else "fp32"


def cpu_threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """Torch threads of one rank: OMP_NUM_THREADS when set, else the cores this process may use divided among the
    ranks on this machine (at least 1). Training (configure_determinism) and evaluation both use it."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, local_world_size))


def limit_cpu_threads(requested: int | None = None) -> int | None:
    """On the CPU: set torch's intra-op threads to `requested`, else to this rank's share of the cores, so the ranks
    of one machine do not oversubscribe it. Returns the number set (None on a GPU, where nothing is changed)."""
    if stage_device().type != "cpu":
        return None
    threads = requested or cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads
