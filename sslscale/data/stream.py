"""Reading shards: the training stream and the evaluation reader.

Training: each (rank, data-loader worker) reads the shards the plan (``launcher.plan``) deals it
for the epoch, through a WebDataset pipeline (tar -> samples -> seeded shuffle buffer -> PIL
decode), and yields full micro-batches forever, epoch after epoch, so every rank can take
exactly ``max_steps`` steps and none waits on another at an epoch end. Evaluation: every sample
once, in manifest order, rank ``r`` of ``W`` taking samples ``r, r+W, ...``.

The seam for resumable streams: ``TrainStream`` is the only thing the trainer iterates; it is
built from a manifest, the run env, the data config and a start ``epoch``.
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launcher.plan import check_enough_shards, shards_for
from sslscale.data.shards import Manifest

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp")


def decode_image(data: bytes, image_size: int, num_channels: int) -> torch.Tensor:
    """Image bytes -> uint8 ``(C, S, S)``: converted to gray (C=1) or RGB (C=3); other sizes
    are resized (shorter side) and center-cropped to ``S``. Raises PIL's errors on bad bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if num_channels == 1 else "RGB")
        if im.size != (image_size, image_size):
            scale = image_size / min(im.size)
            w, h = max(image_size, round(im.width * scale)), max(image_size, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(im, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def to_example(sample: dict[str, Any], image_size: int, num_channels: int) -> dict[str, Any]:
    """A raw WebDataset sample -> ``{"pixel_values": uint8 (C,S,S), "labels": int (-1 = none)}``."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')} from {sample.get('__url__')} has no "
                         f"image ({', '.join(IMAGE_KEYS)})")
    label = int(sample["cls"]) if "cls" in sample else -1
    return {"pixel_values": decode_image(sample[key], image_size, num_channels), "labels": label}


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


def _raw_samples(urls: list[str], shuffle_buffer: int = 0,
                 rng: random.Random | None = None) -> Iterator[dict[str, Any]]:
    stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng))
    return iter(wds.DataPipeline(*stages))


class TrainStream(IterableDataset):
    """Endless micro-batches ``{"pixel_values": uint8 (B, C, S, S), "labels": (B,)}`` for one rank.

    Raises ``PlanError`` at construction when there are fewer shards than ranks x workers.
    """

    def __init__(self, manifest: Manifest, *, rank: int, world_size: int, num_workers: int,
                 batch_size: int, image_size: int, num_channels: int, seed: int,
                 shuffle_buffer: int, start_epoch: int = 0, where: str = ""):
        check_enough_shards(len(manifest.shards), world_size, num_workers, where or manifest.root)
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.num_workers, self.batch_size = num_workers, batch_size
        self.image_size, self.num_channels = image_size, num_channels
        self.seed, self.shuffle_buffer, self.start_epoch = seed, shuffle_buffer, start_epoch

    def _epoch_samples(self, worker: int, epoch: int) -> Iterator[dict[str, Any]]:
        ids = shards_for(len(self.manifest.shards), world_size=self.world_size, rank=self.rank,
                         num_workers=self.num_workers, worker=worker, seed=self.seed, epoch=epoch)
        rng = random.Random(f"sslscale-buffer:{self.seed}:{epoch}:{self.rank}:{worker}")
        for sample in _raw_samples([self.manifest.url(i) for i in ids], self.shuffle_buffer, rng):
            yield to_example(sample, self.image_size, self.num_channels)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        samples = itertools.chain.from_iterable(
            self._epoch_samples(worker, epoch) for epoch in itertools.count(self.start_epoch))
        while True:
            yield collate(list(itertools.islice(samples, self.batch_size)))


def train_loader(stream: TrainStream) -> DataLoader:
    """A ``DataLoader`` over ``stream``'s workers (batches are made inside the workers)."""
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                      persistent_workers=stream.num_workers > 0,
                      prefetch_factor=4 if stream.num_workers > 0 else None)


def eval_batches(manifest: Manifest, *, rank: int, world_size: int, batch_size: int,
                 image_size: int, num_channels: int, limit: int | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Every sample once (the first ``limit`` if given), in manifest order, this rank's share
    (sample ``i`` goes to rank ``i % world_size``), in batches of up to ``batch_size``."""
    total = manifest.num_samples if limit is None else min(limit, manifest.num_samples)
    urls = [manifest.url(i) for i in range(len(manifest.shards))]
    mine = (s for i, s in enumerate(itertools.islice(_raw_samples(urls), total))
            if i % world_size == rank)
    while batch := [to_example(s, image_size, num_channels) for s in itertools.islice(mine, batch_size)]:
        yield collate(batch)
