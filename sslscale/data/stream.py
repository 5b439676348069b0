"""Reading shards: resumable virtual streams for training, and the evaluation reader.

Training: each data-loader worker of each rank reads the virtual streams ``sslscale.data.plan``
deals it, from their saved positions (``sslscale.data.seek``: a seek index per shard, read only
when a stream resumes inside that shard), interleaving them and shuffling within blocks of a
shard with seeds derived from the position, so replaying from a position reproduces the
sequence. Streams are endless, so every rank takes exactly ``max_steps`` steps and none waits on
another. Batches carry the positions of the streams they consumed.
Unreadable data (truncated or corrupt tar, undecodable image, missing shard, HTTP error, failing
``pipe:``) is skipped with one warning per shard and counted, or raises with ``strict``.

Evaluation: every sample once, in manifest order, rank ``r`` of ``W`` taking samples
``r, r+W, ...``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslscale.data.augment import sample_seed
from sslscale.data.decode import center_box, decode_crop, random_resized_box
from sslscale.data.plan import PlanError, check_streams, locate, stream_shards, streams_for
from sslscale.data.seek import open_at, open_shard  # noqa: F401 (open_shard: public here too)
from sslscale.data.shards import Manifest
from sslscale.data.tar import read_tar_samples
from sslscale.data import jpeg_box
from sslscale.log import get_logger

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
# decode(raw sample, sample seed) -> example dict (ImageDecoder, sslscale.data.masking.MLMDecoder)
Decoder = Callable[[dict[str, Any], int], dict[str, Any]]


def decode_image(data: bytes, image_size: int, num_channels: int) -> torch.Tensor:
    """Image bytes -> uint8 ``(C, S, S)``: the largest centered square, gray (C=1) or RGB (C=3),
    resized (bicubic) to ``S`` unless it is already ``S`` x ``S``; JPEGs are decoded at a reduced
    DCT scale when the square keeps >= S pixels (``sslscale.data.decode.decode_crop``). Raises
    PIL's errors on bad bytes."""
    return decode_crop(data, image_size, num_channels, center_box)


def read_label(sample: dict[str, Any], label_key: str = "cls") -> int:
    """A sample's integer label: member ``label_key`` (``cls``: ASCII digits) or, for
    ``json:FIELD``, that field of its ``.json``; -1 when it has none. ``ValueError`` names the
    sample, its shard and the key when the value is not an integer."""
    try:
        if label_key.startswith("json:"):
            if "json" not in sample:
                return -1
            value = json.loads(sample["json"]).get(label_key[5:], -1)
            return -1 if value is None else int(value)
        return int(sample[label_key]) if label_key in sample else -1
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"sample {sample.get('__key__')} from {sample.get('__url__')}: label "
                         f"'{label_key}' is not an integer ({type(e).__name__}: {e})") from None


class ImageDecoder:
    """A raw WebDataset sample -> ``{"pixel_values": uint8 (C, S, S), "labels": int (-1 = none),
    "sample_seeds": int}``. ``image_key``: the image member's extension (default: the first of
    ``IMAGE_KEYS`` present); ``label_key``: an integer member (default ``cls``) or ``json:FIELD``
    (a field of the sample's ``.json``). Raises ``ValueError`` naming the sample, shard and key
    if it has no image or a bad label, and PIL's errors on undecodable bytes. ``seed`` is the
    sample's augmentation seed.

    ``crop``: ``"center"`` (training's default: the largest centered square, which the device's
    augmentation then crops from) or ``"random"``: a random resized crop of the original image
    (area fraction ~ U(``crop_scale``)), a pure function of ``seed`` (``augment.crop_box``, view
    0's tag), for pipelines that crop in the workers. Both decode JPEGs at the smallest DCT
    scale the box allows (``sslscale.data.decode``)."""

    def __init__(self, image_size: int, num_channels: int, image_key: str | None = None,
                 label_key: str | None = None, crop: str = "center",
                 crop_scale: tuple[float, float] = (0.2, 1.0)):
        if crop not in ("center", "random"):
            raise ValueError(f"unknown crop '{crop}'; valid: center, random")
        self.image_size, self.num_channels = image_size, num_channels
        self.image_key, self.label_key = image_key, label_key or "cls"
        self.crop, self.crop_scale = crop, tuple(crop_scale)
        if not jpeg_box.available():  # built here, once, before the workers start
            get_logger("data").info("JPEGs decode whole: %s", jpeg_box.unavailable())

    @classmethod
    def for_manifest(cls, manifest: Manifest, image_size: int, num_channels: int) -> "ImageDecoder":
        """The decoder of the keys ``manifest`` chose (``sslscale data index``), else the defaults."""
        keys = manifest.keys or {}
        return cls(image_size, num_channels, keys.get("image"), keys.get("label"))

    def __call__(self, sample: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        keys = (self.image_key,) if self.image_key else IMAGE_KEYS
        key = next((k for k in keys if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')} from {sample.get('__url__')} has no "
                             f"image ({', '.join(keys)})")
        box = center_box if self.crop == "center" else random_resized_box(seed, self.crop_scale)
        return {"pixel_values": decode_crop(sample[key], self.image_size, self.num_channels, box),
                "labels": read_label(sample, self.label_key), "sample_seeds": seed}

def decoder_for(cfg, manifest: Manifest) -> Decoder:
    """The decoder for ``manifest``'s modality: labeled token blocks for fine-tuning on text
    (``objective.name: classify``; ``sslscale.data.text.LabeledTextDecoder``), token blocks as
    they are for causal language modeling (``clm``; ``sslscale.data.text.TokenBlockDecoder``),
    token blocks + MLM masking for other text objectives (``sslscale.data.masking.MLMDecoder``),
    audio clips of ``data.max_audio_seconds`` with wav2vec 2.0's span masks and distractors drawn per
    clip (``sslscale.data.audio.AudioDecoder``, ``sslscale.data.masking.SpanMasking``), images
    resized to ``model.image_size`` otherwise (with the manifest's image and label keys)."""
    if manifest.modality == "audio":
        from sslscale.data.audio import AudioDecoder
        from sslscale.data.masking import SpanMasking

        masking = SpanMasking.from_config(cfg) if cfg.objective.name == "wav2vec2" else None
        return AudioDecoder.for_manifest(manifest, cfg.data.max_audio_seconds, masking=masking)
    if manifest.modality == "text" and cfg.objective.name == "classify":
        from sslscale.data.text import LabeledTextDecoder

        return LabeledTextDecoder.for_manifest(manifest)
    if manifest.modality == "text" and cfg.objective.name == "clm":
        from sslscale.data.text import TokenBlockDecoder

        return TokenBlockDecoder.for_manifest(manifest)
    if manifest.modality == "text":
        from sslscale.data.masking import MLMDecoder

        return MLMDecoder.from_config(cfg, manifest)
    return ImageDecoder.for_manifest(manifest, cfg.model.image_size, cfg.model.num_channels)


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack tensors, make int64 tensors of ints (keys of the first example)."""
    return {k: torch.stack([e[k] for e in examples]) if isinstance(v, torch.Tensor)
            else torch.tensor([e[k] for e in examples], dtype=torch.long)
            for k, v in examples[0].items()}


class DataStats:
    """Skipped-data counters of one reader (cumulative), and one warning per shard."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped_samples = 0
        self.skipped_shards = 0
        self._warned: set[str] = set()

    def skip(self, what: str, url: str, error: Exception, samples: int, shard: bool = False) -> None:
        if self.strict:
            raise RuntimeError(f"data.strict=true: {what} in {url}: {error}") from error
        self.skipped_samples += samples
        self.skipped_shards += int(shard)
        if url not in self._warned:
            self._warned.add(url)
            warnings.warn(f"skipping {what} in {url}: {type(error).__name__}: {error} "
                          "(counted in data/skipped_samples; data.strict=true fails instead)")


def _open_at(manifest: Manifest, shard: int, sample: int) -> Iterator[dict[str, Any]]:
    """Raw samples of ``shard`` from index ``sample`` on (``sslscale.data.seek.open_at``: a
    seek for local tars, an HTTP Range, a replay for ``pipe:``). Opens lazily, at the first
    ``next``, so that opening errors surface where reading errors do."""
    opened = open_at(manifest, shard, sample)
    try:
        yield from itertools.islice(read_tar_samples(opened.stream, manifest.url(shard)), opened.skip, None)
    finally:
        with contextlib.suppress(Exception):  # a failed stream already raised while reading
            opened.stream.close()


class StreamReader:
    """One virtual stream, read from position ``k`` (samples yielded so far) forever.

    Shards are read in blocks of ``block`` consecutive samples, each block permuted by a seed of
    (seed, epoch, stream, shard, block): the order is a pure function of the position, so
    replaying from ``k`` reproduces the sequence. Yields ``(raw_sample or None, k_after)``;
    ``None`` marks a slot whose sample could not be read (counted in ``stats``). ``counts``
    (samples per shard, the manifest's) may be shared by the readers of a worker.
    """

    def __init__(self, manifest: Manifest, stream: int, *, num_streams: int, seed: int,
                 block: int, k: int, stats: DataStats, counts: Sequence[int] | None = None):
        self.manifest, self.stream, self.num_streams = manifest, stream, num_streams
        self.seed, self.block, self.k, self.stats = seed, max(block, 1), k, stats
        self.counts = counts if counts is not None else [s.num_samples for s in manifest.shards]
        self.total = sum(self.counts)

    def _shard_slots(self, epoch: int, shard: int, start: int) -> Iterator[dict[str, Any] | None]:
        n, url = self.counts[shard], self.manifest.url(shard)
        first = start - start % self.block
        raw, broken = _open_at(self.manifest, shard, first), False
        for b0 in range(first, n, self.block):
            size, got = min(self.block, n - b0), []
            error: Exception | None = None
            try:
                while not broken and len(got) < size:
                    got.append(next(raw))
            except StopIteration:
                error = EOFError(f"fewer samples than the manifest's {n}")
            except Exception as e:  # truncated / corrupt tar, missing file, HTTP error
                error = e
            if len(got) < size and not broken:
                broken = True  # nothing more comes from this shard; the other blocks are lost too
                lost = n - b0 - len(got)
                self.stats.skip(f"{lost} sample(s) after #{b0 + len(got)}", url, error, lost, shard=True)
            order = list(range(size))
            random.Random(f"sslscale-block:{self.seed}:{epoch}:{self.stream}:{shard}:{b0}").shuffle(order)
            for i in order[start - b0 if b0 == first else 0:]:
                yield got[i] if i < len(got) else None

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, int]]:
        epoch, j, offset = locate(self.counts, self.num_streams, self.seed, self.stream, self.k)
        empty_run = 0
        while True:
            shards = stream_shards(len(self.counts), self.num_streams, self.seed, epoch, self.stream)
            for shard in shards[j:]:
                for sample in self._shard_slots(epoch, shard, offset):
                    self.k += 1
                    empty_run = 0 if sample is not None else empty_run + 1
                    if empty_run > self.total:
                        raise RuntimeError(f"stream {self.stream}: no readable sample in a whole "
                                           f"pass over {self.manifest.root}")
                    yield sample, self.k
                offset = 0
            epoch, j = epoch + 1, 0


def decode_or_skip(sample: dict[str, Any] | None, decode: Decoder, seed: int,
                   stats: DataStats) -> dict[str, Any] | None:
    """``decode(sample, seed)``, or None (counted in ``stats``) for a missing or undecodable one."""
    if sample is None:
        return None
    try:
        return decode(sample, seed)
    except Exception as e:  # undecodable image, missing member
        stats.skip(f"sample {sample.get('__key__')}", sample.get("__url__", "?"), e, 1)
        return None


class TrainStream(IterableDataset):
    """Endless micro-batches for one rank: the collated examples of ``decode`` (images:
    ``pixel_values`` uint8 (B, C, S, S), ``labels`` (B,); text: ``input_ids``, ``labels`` (B, L))
    with ``sample_seeds`` (B,) int64 (``augment.sample_seed`` of each sample's stream slot, for
    per-sample augmentation / masking), ``stream_positions`` (n, 2) int64 rows of (stream, samples
    yielded) and ``data_skipped`` (3,) int64 (worker, skipped samples, skipped shards).

    Each data-loader worker reads its virtual streams (``sslscale.data.plan.streams_for``) from
    ``positions`` and interleaves them, always taking the stream that is least advanced.
    Raises ``PlanError`` at construction when the streams cannot be dealt evenly.
    """

    def __init__(self, manifest: Manifest, *, rank: int, world_size: int, num_workers: int,
                 batch_size: int, decode: Decoder, seed: int,
                 shuffle_buffer: int, num_streams: int, positions: list[int] | None = None,
                 phase: int = 0, strict: bool = False, where: str = ""):
        check_streams(len(manifest.shards), num_streams, world_size, num_workers, where or manifest.root)
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.num_workers, self.batch_size = num_workers, batch_size
        self.decode = decode
        self.seed, self.shuffle_buffer, self.num_streams = seed, shuffle_buffer, num_streams
        self.positions = list(positions) if positions is not None else [0] * num_streams
        if len(self.positions) != num_streams:
            raise PlanError(f"{len(self.positions)} saved stream positions but data.num_streams="
                            f"{num_streams}; resume with the num_streams the run started with")
        self.phase, self.strict = phase, strict

    def _streams(self, worker: int) -> list[int]:
        return streams_for(self.num_streams, self.world_size, self.num_workers, self.rank, worker, self.phase)

    def _examples(self, worker: int, stats: DataStats) -> Iterator[tuple[dict[str, Any], int, int]]:
        streams, counts = self._streams(worker), [s.num_samples for s in self.manifest.shards]
        readers = {s: iter(StreamReader(self.manifest, s, num_streams=self.num_streams, seed=self.seed,
                                        block=self.shuffle_buffer, k=self.positions[s], stats=stats,
                                        counts=counts))
                   for s in streams}
        k = {s: self.positions[s] for s in streams}
        while True:
            s = min(streams, key=lambda t: (k[t], t))
            sample, k[s] = next(readers[s])
            example = decode_or_skip(sample, self.decode, sample_seed(self.seed, s, k[s]), stats)
            if example is not None:
                yield example, s, k[s]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats = DataStats(self.strict)
        examples = self._examples(worker, stats)
        positions = {s: self.positions[s] for s in self._streams(worker)}
        while True:
            batch = []
            for example, s, k in itertools.islice(examples, self.batch_size):
                batch.append(example)
                positions[s] = k
            out = collate(batch)
            out["stream_positions"] = torch.tensor(sorted(positions.items()), dtype=torch.long)
            out["data_skipped"] = torch.tensor([worker, stats.skipped_samples, stats.skipped_shards])
            yield out


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM / SIGUSR1 / SIGINT to their rank, which saves first
    (Slurm, ``kill -TERM -PGID`` and Ctrl-C signal every process of the job or terminal). They
    end with the loader's shutdown, when their rank exits (``sslscale.exits`` SIGKILLs them on
    every exit path), or within seconds of their rank dying (PyTorch's parent watchdog)."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def train_loader(stream: TrainStream) -> DataLoader:
    """A ``DataLoader`` over ``stream``'s workers (batches are made inside the workers), in
    pinned memory when CUDA is there (uint8 batches copy to the device asynchronously)."""
    # Its own generator: creating the iterator must not draw from the global RNG, whose state
    # a checkpoint restores exactly (augmentation and masks draw from it).
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                      pin_memory=torch.cuda.is_available(),
                      persistent_workers=stream.num_workers > 0,
                      prefetch_factor=4 if stream.num_workers > 0 else None,
                      worker_init_fn=_ignore_stop_signals,
                      generator=torch.Generator().manual_seed(stream.seed))


def eval_batches(manifest: Manifest, *, rank: int, world_size: int, batch_size: int,
                 decode: Decoder, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every sample once (the first ``limit`` if given), in manifest order, this rank's share
    (sample ``i`` goes to rank ``i % world_size``), in batches of up to ``batch_size``, decoded
    with seed ``i`` (so masks of a held-out set are the same at every evaluation)."""
    total = manifest.num_samples if limit is None else min(limit, manifest.num_samples)
    samples = itertools.chain.from_iterable(_open_at(manifest, i, 0) for i in range(len(manifest.shards)))
    mine = ((s, i) for i, s in enumerate(itertools.islice(samples, total)) if i % world_size == rank)
    while batch := [decode(s, i) for s, i in itertools.islice(mine, batch_size)]:
        yield collate(batch)
