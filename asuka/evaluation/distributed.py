"""Splitting an evaluation across processes and meeting again for the merge.

The shard comes from ``--shard i/n`` or from torchrun's ``RANK``/``WORLD_SIZE``; items are dealt
round-robin (``items[i::n]``) so every shard sees every domain. Under torchrun the ranks meet at a
``torch.distributed`` barrier (gloo backend, CPU-only) after writing their shard files, and rank 0 merges.
Independent jobs (``--shard``, e.g. SLURM array tasks) merge with ``asuka evaluate --merge --out DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard: need 0 <= i < n, got {self.index}/{self.count}")

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index::self.count])

    @property
    def name(self) -> str:
        return f"{self.index:04d}-of-{self.count:04d}"


def parse_shard(text: str) -> Shard:
    """``"i/n"`` -> :class:`Shard`."""
    try:
        index, count = (int(t) for t in text.split("/"))
    except ValueError:
        raise ValueError(f"shard: expected i/n such as 0/4, got {text!r}") from None
    return Shard(index, count)


def torchrun_shard() -> Shard | None:
    """The shard of this process under torchrun (``WORLD_SIZE`` > 1), else ``None``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Shard(int(os.environ.get("RANK", "0")), world) if world > 1 else None


def barrier() -> None:
    """Wait for every torchrun rank (a gloo process group, created here and torn down after the barrier
    unless the caller already had one)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="gloo")
    dist.barrier()
    if owned:
        dist.destroy_process_group()
