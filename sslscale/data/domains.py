"""Two unpaired image domains from one labeled shard set (``cyclegan``): domain A is the samples
of some classes, domain B those of others, each read from its own virtual streams.

``TwoDomainStream`` holds two ``TrainStream``s over the same shards with the same plan (stream
``s`` of A and of B go to the same rank and worker), each keeping only its classes (the label
is read before the image is decoded) and each seeded differently (``DOMAIN_B_SEED``: another
shard order, other block shuffles, other sample seeds), so the two sides of a pair of
micro-batches are drawn independently: unpaired. The trainer keeps ``2 * data.num_streams``
positions, A's streams first then B's, and a checkpoint holds them all, so a resume continues
both domains exactly. Samples of neither domain are passed over (they count in the positions,
not in ``data/skipped_samples``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from sslscale.data.shards import Manifest
from sslscale.data.stream import Decoder, TrainStream, read_label

DOMAIN_B_SEED = 0x5EED_B  # added to train.seed for domain B's streams


def two_domains(cfg) -> bool:
    """Whether ``cfg``'s objective reads two unpaired domains (``cyclegan``)."""
    return cfg.objective.name == "cyclegan"


def num_positions(cfg) -> int:
    """The stream positions a run of ``cfg`` keeps: ``data.num_streams``, twice that for two domains."""
    return cfg.data.num_streams * (2 if two_domains(cfg) else 1)


class ClassFilter:
    """``decode`` for samples whose label (``label_key``) is in ``classes``; None for the others
    (before decoding them). Picklable (data-loader workers)."""

    def __init__(self, decode: Decoder, classes: Sequence[int], label_key: str = "cls"):
        self.decode, self.classes, self.label_key = decode, frozenset(int(c) for c in classes), label_key

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any] | None:
        if read_label(sample, self.label_key) not in self.classes:
            return None
        return self.decode(sample, seed)


def check_classes(manifest: Manifest, key: str, classes: Sequence[int]) -> None:
    """``ValueError`` naming ``key`` when ``classes`` is empty or names a class the manifest's
    ``meta.classes`` does not have (unchecked when it records none)."""
    known = (manifest.meta or {}).get("classes")
    if not classes:
        raise ValueError(f"key '{key}' is empty: list the class indices of the domain")
    if known and any(not 0 <= int(c) < len(known) for c in classes):
        raise ValueError(f"key '{key}' = {list(classes)}: {manifest.root} has classes 0..{len(known) - 1} "
                         f"({', '.join(map(str, known))})")


class TwoDomainStream(IterableDataset):
    """Endless pairs of micro-batches: domain A's batch (``pixel_values``, ``labels``,
    ``sample_seeds``) with domain B's under the same keys + ``_b``; ``stream_positions`` rows
    ``(stream, position)`` with B's streams numbered ``num_streams + s``; ``data_skipped`` summed
    over both. ``positions``: ``2 * num_streams`` (A's, then B's). ``PlanError`` as
    ``TrainStream``."""

    def __init__(self, manifest: Manifest, *, decode: Decoder, label_key: str, classes_a: Sequence[int],
                 classes_b: Sequence[int], num_streams: int, seed: int,
                 positions: list[int] | None = None, **stream_args):
        positions = list(positions) if positions is not None else [0] * (2 * num_streams)
        if len(positions) != 2 * num_streams:
            from sslscale.data.plan import PlanError
            raise PlanError(f"{len(positions)} saved stream positions but two domains of data.num_streams="
                            f"{num_streams} need {2 * num_streams}; resume with the num_streams the run started with")
        self.num_streams, self.seed = num_streams, seed
        self.a = TrainStream(manifest, decode=ClassFilter(decode, classes_a, label_key), seed=seed,
                             num_streams=num_streams, positions=positions[:num_streams], **stream_args)
        self.b = TrainStream(manifest, decode=ClassFilter(decode, classes_b, label_key), seed=seed + DOMAIN_B_SEED,
                             num_streams=num_streams, positions=positions[num_streams:], **stream_args)
        self.num_workers = self.a.num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for a, b in zip(self.a, self.b):
            out = {k: v for k, v in a.items() if k not in ("stream_positions", "data_skipped")}
            out.update({f"{k}_b": v for k, v in b.items() if k not in ("stream_positions", "data_skipped")})
            b_positions = b["stream_positions"].clone()
            b_positions[:, 0] += self.num_streams
            out["stream_positions"] = torch.cat([a["stream_positions"], b_positions])
            skipped_a, skipped_b = a["data_skipped"], b["data_skipped"]
            out["data_skipped"] = torch.cat([skipped_a[:1], skipped_a[1:] + skipped_b[1:]])
            yield out


def two_domain_stream(cfg, manifest: Manifest, *, rank: int, world_size: int,
                      positions: list[int] | None = None, phase: int = 0) -> TwoDomainStream:
    """The ``TwoDomainStream`` of ``cfg`` (``objective.domain_a_classes`` / ``domain_b_classes``
    of ``data.train_shards``). ``ValueError`` for an empty list or a class the shards lack."""
    from sslscale.data.stream import decoder_for

    o = cfg.objective
    check_classes(manifest, "objective.domain_a_classes", o.domain_a_classes)
    check_classes(manifest, "objective.domain_b_classes", o.domain_b_classes)
    decode = decoder_for(cfg, manifest)
    return TwoDomainStream(manifest, decode=decode, label_key=getattr(decode, "label_key", "cls"),
                           classes_a=list(o.domain_a_classes), classes_b=list(o.domain_b_classes),
                           num_streams=cfg.data.num_streams, seed=cfg.train.seed, positions=positions,
                           phase=phase, rank=rank, world_size=world_size, num_workers=cfg.data.num_workers,
                           batch_size=cfg.train.micro_batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
                           strict=cfg.data.strict, where=cfg.data.train_shards)
