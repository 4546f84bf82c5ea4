"""Infinite, resumable training loader: the sampler yields global sample counters, not dataset indices.

``SourceTargetDataset`` turns the counter into its own random draws, so the loader only has to hand out
``k = rank + world_size * n`` for n = start, start + 1, ...; resuming at iteration ``it`` starts at
``n = it * batch_size`` and reproduces the batches of an uninterrupted run.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dida.data.uda import collate_uda


class InfiniteSampler(Sampler[int]):
    """Yields ``rank + world_size * n`` for n = start, start + 1, ... forever."""

    def __init__(self, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.start, self.rank, self.world_size = int(start), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return (self.rank + self.world_size * n for n in itertools.count(self.start))


def seed_worker(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """Seed numpy / random / torch in a loader worker with ``seed + worker_id + 1000 * rank``.

    Our own code draws from explicit generators; this only protects third-party code that might use
    the global ones (the reference seeded numpy and ``random`` with ``seed + worker_id``).
    """
    s = seed + worker_id + 1000 * rank
    np.random.seed(s % 2**32)
    random.seed(s)
    torch.manual_seed(s)


def build_train_loader(
    dataset: Any, batch_size: int, num_workers: int, start_iter: int = 0, rank: int = 0, world_size: int = 1,
    pin_memory: bool = False, seed: int = 0, collate_fn: Callable[[list], Any] = collate_uda,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with an ``InfiniteSampler`` starting at ``start_iter * batch_size``.

    Workers are persistent when ``num_workers > 0``; each is seeded by ``seed_worker``. Batches are
    ``collate_fn`` of ``batch_size`` items (the default stacks ``SourceTargetDataset`` items).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        init = functools.partial(seed_worker, seed=seed, rank=rank)
        kwargs.update(persistent_workers=True, worker_init_fn=init)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset, batch_size=batch_size, sampler=InfiniteSampler(start_iter * batch_size, rank, world_size),
        num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory, drop_last=True, **kwargs,
    )
