"""The shard plan: virtual streams, who reads them, and where each epoch ends. Pure Python.

Data, not launching: the readers (``sslscale.data.stream``) follow it in every process, and the
launcher (``sslscale data plan``, the checks before ``launch`` / ``submit``) calls it to check a
plan before starting any process. It imports nothing from ``launcher/``.

Each epoch the shard list is permuted with a seed derived from ``(seed, epoch)`` and dealt
round-robin to a fixed number ``V`` of **virtual streams** (``data.num_streams``), independent of
the world size. A stream's samples are the concatenation of its shards, epoch after epoch: an
endless sequence, so a reader never runs dry and no rank ever waits on another.

The V streams are dealt to the ``world_size x workers`` reader slots (V must be a multiple of the
slot count). Every slot reads its streams at the same rate, so all streams advance together and
the epoch boundary is a cut at the same depth in every stream: epoch ``e`` ends when every stream
has yielded ``cut(e) = min over streams of its samples in epochs 0..e``. Each epoch therefore
holds the same number of samples for every rank *by construction*; the samples a stream holds
beyond the cut (its shards were larger) are **carried** into the next epoch and read first.

A stream's position is the number of samples it has yielded, ``k``; ``locate`` turns it into
``(epoch, shard index in the stream, sample offset in the shard)`` for seeking.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence


class PlanError(ValueError):
    """The data cannot be dealt to this many ranks, workers and streams."""


def reader_slots(world_size: int, num_workers: int) -> int:
    """Reader slots: ranks x data-loader workers (0 workers = the rank's main process reads)."""
    return world_size * max(num_workers, 1)


def check_streams(num_shards: int, num_streams: int, world_size: int, num_workers: int,
                  where: str = "data") -> None:
    """``PlanError`` naming ``where`` and the values that would work, unless every slot gets the
    same number (>= 1) of streams and every stream gets at least one shard per epoch."""
    if world_size < 1 or num_workers < 0:
        raise PlanError(f"{where}: the world size must be >= 1 and data.num_workers >= 0, got "
                        f"{world_size} and {num_workers}")
    slots = reader_slots(world_size, num_workers)
    if num_streams > num_shards:
        raise PlanError(f"{where}: data.num_streams={num_streams} exceeds the {num_shards} shard(s); "
                        f"use at most {num_shards} streams or write more, smaller shards")
    if num_streams < slots or num_streams % slots:
        good = [v for v in range(slots, num_shards + 1, slots)][:6]
        worlds = [w for w in range(1, num_streams + 1) if num_streams % (w * max(num_workers, 1)) == 0]
        raise PlanError(
            f"{where}: data.num_streams={num_streams} cannot be dealt evenly to {world_size} "
            f"rank(s) x {max(num_workers, 1)} worker(s) = {slots} readers; "
            + (f"use data.num_streams in {good}" if good else
               f"the {num_shards} shard(s) are too few for {slots} readers: write more, smaller "
               "shards (fewer samples per shard) or use fewer data.num_workers")
            + (f", or a world size in {worlds} with these workers" if worlds else ""))


@lru_cache(maxsize=64)
def epoch_order(num_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Shard indices in the order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    order = list(range(num_shards))
    random.Random(f"sslscale-shards:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def stream_shards(num_shards: int, num_streams: int, seed: int, epoch: int, stream: int) -> tuple[int, ...]:
    """Shard indices stream ``stream`` reads in ``epoch``, in order."""
    return epoch_order(num_shards, seed, epoch)[stream::num_streams]


def streams_for(num_streams: int, world_size: int, num_workers: int, rank: int, worker: int,
                phase: int = 0) -> list[int]:
    """Streams read by data-loader ``worker`` of ``rank``. ``phase`` rotates the workers so that
    after a resume the loader's first worker continues what worker ``phase`` was doing."""
    workers = max(num_workers, 1)
    slot = rank * workers + (worker + phase) % workers
    return list(range(slot, num_streams, world_size * workers))


@dataclass(frozen=True)
class Epochs:
    """Per-epoch arithmetic of a plan. ``cut(e)``: samples every stream yields by the end of
    epoch ``e``; ``totals(e)[s]``: samples stream ``s`` holds in epochs ``0..e``. Each epoch's
    per-stream sums are computed once, in one pass over the shards (O(shards), cached)."""

    counts: tuple[int, ...]
    num_streams: int
    seed: int
    _per_epoch: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def epoch_samples(self, epoch: int) -> tuple[int, ...]:
        """Samples each stream holds in ``epoch`` alone: ``(num_streams,)``."""
        if epoch not in self._per_epoch:
            sums = [0] * self.num_streams
            for i, shard in enumerate(epoch_order(len(self.counts), self.seed, epoch)):
                sums[i % self.num_streams] += self.counts[shard]
            self._per_epoch[epoch] = tuple(sums)
        return self._per_epoch[epoch]

    def totals(self, epoch: int) -> list[int]:
        return [sum(col) for col in zip(*(self.epoch_samples(e) for e in range(epoch + 1)))]

    def stream_samples(self, epoch: int, stream: int) -> int:
        return self.epoch_samples(epoch)[stream]

    def cut(self, epoch: int) -> int:
        """Samples per stream from the start of training to the end of ``epoch``."""
        return min(self.totals(epoch)) if epoch >= 0 else 0

    def samples_per_stream(self, epoch: int) -> int:
        return self.cut(epoch) - self.cut(epoch - 1)

    def carried(self, epoch: int) -> int:
        """Samples held past the end of ``epoch`` (read first in ``epoch + 1``), all streams."""
        return sum(self.totals(epoch)) - self.num_streams * self.cut(epoch)


def locate(counts: Sequence[int], num_streams: int, seed: int, stream: int, k: int) -> tuple[int, int, int]:
    """Position ``k`` (samples yielded) of ``stream`` -> ``(epoch, shard index in the stream's
    epoch list, sample offset in that shard)``: where its next sample comes from."""
    epoch = 0
    while True:
        for j, shard in enumerate(stream_shards(len(counts), num_streams, seed, epoch, stream)):
            if k < counts[shard]:
                return epoch, j, k
            k -= counts[shard]
        epoch += 1


def describe(counts: Sequence[int], *, num_streams: int, world_size: int, num_workers: int,
             micro_batch_size: int, seed: int = 0, epochs: int = 2) -> dict:
    """The plan as a dict (printed by ``sslscale data plan``): streams per rank, and per epoch the
    samples and micro-batches per rank and the carried-over samples."""
    check_streams(len(counts), num_streams, world_size, num_workers)
    plan = Epochs(tuple(counts), num_streams, seed)
    per_rank_streams = num_streams // world_size
    rows = []
    for e in range(epochs):
        per_rank = plan.samples_per_stream(e) * per_rank_streams
        rows.append({"epoch": e, "samples_per_rank": per_rank,
                     "micro_batches_per_rank": per_rank // micro_batch_size,
                     "samples_all_ranks": per_rank * world_size, "carried_over": plan.carried(e)})
    return {"num_shards": len(counts), "num_samples": sum(counts), "num_streams": num_streams,
            "world_size": world_size, "workers_per_rank": max(num_workers, 1),
            "streams_per_rank": {r: [s for w in range(max(num_workers, 1))
                                     for s in streams_for(num_streams, world_size, num_workers, r, w)]
                                 for r in range(world_size)},
            "epochs": rows}
