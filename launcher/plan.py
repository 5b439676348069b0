"""The shard plan: which shards each (rank, data-loader worker) reads in an epoch. Pure Python.

Every epoch the shard list is permuted with a seed derived from ``(seed, epoch)`` (the same on
every rank, as open_clip's epoch-seeded shuffle), then dealt round-robin to the
``world_size x workers`` reader slots. Fewer shards than slots is an error here, before any
process starts waiting on another (WebDataset would otherwise leave a worker empty and ranks
would hang or fail with "No samples found").
"""

from __future__ import annotations

import random


class PlanError(ValueError):
    """The data cannot be dealt to this many ranks and workers."""


def reader_slots(world_size: int, num_workers: int) -> int:
    """Reader slots: ranks x data-loader workers (0 workers = the rank's main process reads)."""
    return world_size * max(num_workers, 1)


def check_enough_shards(num_shards: int, world_size: int, num_workers: int, where: str = "") -> None:
    """``PlanError`` (naming ``where``, e.g. the manifest) if a reader slot would get no shard."""
    slots = reader_slots(world_size, num_workers)
    if num_shards < slots:
        fits = max(num_shards // max(num_workers, 1), 0)
        raise PlanError(
            f"{where or 'data'}: {num_shards} shard(s) cannot feed {world_size} rank(s) x "
            f"{max(num_workers, 1)} worker(s) = {slots} readers; write more shards "
            f"(`sslscale data prepare --samples-per-shard` smaller), lower data.num_workers, "
            f"or use at most {fits} rank(s) with these workers")


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard indices in the order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    order = list(range(num_shards))
    random.Random(f"sslscale-shards:{seed}:{epoch}").shuffle(order)
    return order


def shards_for(num_shards: int, *, world_size: int, rank: int, num_workers: int, worker: int,
               seed: int, epoch: int) -> list[int]:
    """Shard indices that reader slot ``(rank, worker)`` reads in ``epoch``, in order."""
    check_enough_shards(num_shards, world_size, num_workers)
    slots = reader_slots(world_size, num_workers)
    slot = rank * max(num_workers, 1) + worker
    if not (0 <= rank < world_size and 0 <= worker < max(num_workers, 1)):
        raise PlanError(f"reader slot rank={rank} worker={worker} is outside {world_size} x {num_workers}")
    return epoch_order(num_shards, seed, epoch)[slot::slots]
