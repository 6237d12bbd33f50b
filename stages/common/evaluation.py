"""Helpers for evaluation stages that run on every rank of a launch: each rank takes a strided share of the items,
and rank 0 gathers the per-item results. Both work unchanged in a single process (no process group)."""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: Sequence[T], rank: int, world: int) -> Sequence[T]:
    """Rank `rank` of `world` takes items rank, rank + world, ... (equal shares, to one item)."""
    return items[rank::world]


def my_share(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of `items`."""
    return share(items, *rank_and_world())


def gather_on_main(local: list) -> list | None:
    """Rank 0: every rank's `local` results concatenated (rank 0's first); other ranks: None. Results must pickle."""
    rank, world = rank_and_world()
    if world == 1:
        return list(local)
    parts = [None] * world if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    return [item for part in parts for item in part] if rank == 0 else None
