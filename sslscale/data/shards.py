"""WebDataset tar shards and their ``manifest.json``.

Owns writing samples into numbered tar shards (``shard-000000.tar`` ...) with a seek index
beside each (``shard-000000.tar.idx``, ``sslscale.data.seek``), and the manifest that describes
them. A manifest costs O(shards), never O(samples): per shard its name, sample count, size in
bytes and sha256; for the whole corpus the source, its license, the ``modality`` (``image``, the
default for manifests that predate the field, or ``text``), where the seek indexes are
(``seek_index``, a template such as ``"{name}.idx"``) and free-form ``meta`` (image size,
channels, classes; for text: seq_len, vocab_size, num_tokens, tokenizer folder). Readers and the
shard plan trust the manifest's counts, so it is written last, atomically, after every shard is
closed. Version 1 manifests, which inlined every sample's byte offset (``offsets``), still load
and seek with those offsets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from sslscale.data.seek import SEEK_SUFFIX, shard_id, write_seek_index
from sslscale.data.tar import read_tar_samples, sample_offsets  # noqa: F401 (public here too)

MANIFEST = "manifest.json"
VERSION = 2


@dataclass(slots=True)
class ShardInfo:
    name: str  # file name relative to the manifest, an absolute path, or a URL / pipe: command
    num_samples: int
    size: int | None = None  # bytes (None: unknown, e.g. a version 1 manifest)
    sha256: str | None = None
    offsets: list[int] | None = None  # version 1 only: byte offset of each sample (local tars)

    def to_json(self) -> dict[str, Any]:
        row = {"name": self.name, "num_samples": self.num_samples, "size": self.size,
               "sha256": self.sha256}
        if self.offsets is not None:
            row["offsets"] = self.offsets
        return row


@dataclass
class Manifest:
    shards: list[ShardInfo]
    source: str
    license: str
    meta: dict[str, Any] = field(default_factory=dict)
    root: str = ""  # folder of the manifest file; not serialized
    created: str = ""
    modality: str = "image"  # "image" or "text"; manifests without the field are image shards
    # Where shard i's seek index is: a template of {name} (the shard's name), {index} (i) and
    # {id} (seek.shard_id(name)), relative to the manifest's folder unless absolute or a URL;
    # None: no seek indexes.
    seek_index: str | None = None
    # Sample members the decoders read: {"image": "jpg", "text": "txt" or None, "label": "cls",
    # "json:FIELD" or None}; None: the defaults (first image extension found, "cls").
    keys: dict[str, str | None] | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def url(self, index: int) -> str:
        """Where shard ``index`` is read from: a local path, ``http(s)://...`` or ``pipe:...``."""
        return self._resolve(self.shards[index].name)

    def index_url(self, index: int) -> str | None:
        """Where shard ``index``'s seek index is (a local path or URL), or None without one."""
        if self.seek_index is None:
            return None
        name = self.shards[index].name
        return self._resolve(self.seek_index.format(name=name, index=index, id=shard_id(name)))

    def _resolve(self, name: str) -> str:
        if "://" in name or name.startswith("pipe:") or os.path.isabs(name):
            return name
        return os.path.join(self.root, name)

    def to_json(self) -> dict[str, Any]:
        head = {"format": "webdataset", "version": VERSION, "modality": self.modality,
                "source": self.source, "license": self.license, "created": self.created,
                "num_shards": len(self.shards), "num_samples": self.num_samples, "meta": self.meta}
        if self.seek_index is not None:
            head["seek_index"] = self.seek_index
        if self.keys is not None:
            head["keys"] = self.keys
        return {**head, "shards": [s.to_json() for s in self.shards]}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(ValueError):
    """A ``manifest.json`` is not valid JSON or a field is missing or has the wrong type."""


_SHARD_FIELDS = {f.name for f in fields(ShardInfo)}
_SHARD_CHECKS = {  # field -> (test, what it must be)
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "num_samples": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "size": (lambda v: v is None or (type(v) is int and v >= 0), "an integer >= 0 or null"),
    "sha256": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "offsets": (lambda v: v is None or (isinstance(v, list) and all(type(o) is int and o >= 0 for o in v)),
                "a list of integers >= 0 or null"),
}


def _shard_info(file: Path, index: int, raw: Any) -> ShardInfo:
    """``shards[index]`` of manifest ``file`` as a ``ShardInfo``; ``ManifestError`` naming the field."""
    where = f"{file}: shards[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} must be an object, got {type(raw).__name__} {raw!r:.60}")
    unknown = sorted(set(raw) - _SHARD_FIELDS)
    if unknown:
        raise ManifestError(f"{where}: unknown field '{unknown[0]}' (known: "
                            f"{', '.join(sorted(_SHARD_FIELDS))})")
    for key in ("name", "num_samples"):
        if key not in raw:
            raise ManifestError(f"{where}: missing field '{key}'")
    for key, (ok, expected) in _SHARD_CHECKS.items():
        if key in raw and not ok(raw[key]):
            raise ManifestError(f"{where}: field '{key}' must be {expected}, got {raw[key]!r:.60}")
    return ShardInfo(**raw)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except UnicodeDecodeError as e:
        raise ManifestError(f"{file}: not a JSON text file ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{file}: a shard manifest is a JSON object, got {type(raw).__name__}")
    return raw


def _check_template(file: Path, template: str | None) -> None:
    """``ManifestError`` unless ``seek_index`` is None or a template of {name}, {index}, {id}."""
    if template is None:
        return
    try:
        template.format(name="shard.tar", index=0, id="0")
    except (KeyError, IndexError, ValueError) as e:
        raise ManifestError(f"{file}: field 'seek_index' must be a template of {{name}}, {{index}} "
                            f"and {{id}}, got {template!r:.60} ({type(e).__name__}: {e})") from None


def _check_keys(file: Path, keys: dict | None) -> None:
    """``ManifestError`` unless ``keys`` is None or maps image / text / label to strings or null."""
    for role, value in (keys or {}).items():
        if role not in ("image", "text", "label"):
            raise ManifestError(f"{file}: field 'keys' has unknown role '{role}' (known: image, text, label)")
        if value is not None and not (isinstance(value, str) and value):
            raise ManifestError(f"{file}: field 'keys.{role}' must be a member extension or null, "
                                f"got {value!r:.60}")


def manifest_file(path: str | os.PathLike) -> Path:
    """The manifest file ``path`` names: ``path/manifest.json`` for a folder (or a path without a
    suffix), else ``path`` itself."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() or not path.suffix else path


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read ``manifest.json`` (or the one inside folder ``path``).

    Raises ``FileNotFoundError`` naming the path if there is none, ``ManifestError`` (a
    ``ValueError``) naming the file and the field if it is malformed.
    """
    file = manifest_file(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {file} (prepare shards with `sslscale data prepare ... --out "
            f"{file.parent}`)")
    raw = _read_json(file)
    types = {"shards": (list, "a list"), "source": (str, "a string"), "license": (str, "a string"),
             "meta": (dict, "an object"), "created": (str, "a string"), "modality": (str, "a string"),
             "seek_index": ((str, type(None)), "a string or null"),
             "keys": ((dict, type(None)), "an object or null")}
    for key, (kind, expected) in types.items():
        if key not in raw and key in ("shards", "source", "license"):
            raise ManifestError(f"{file}: missing field '{key}'")
        if key in raw and not isinstance(raw[key], kind):
            raise ManifestError(f"{file}: field '{key}' must be {expected}, got "
                                f"{type(raw[key]).__name__} {raw[key]!r:.60}")
    _check_template(file, raw.get("seek_index"))
    _check_keys(file, raw.get("keys"))
    shards = [_shard_info(file, i, s) for i, s in enumerate(raw["shards"])]
    manifest = Manifest(shards=shards, source=raw["source"], license=raw["license"],
                        meta=raw.get("meta", {}), root=str(file.parent),
                        created=raw.get("created", ""), modality=raw.get("modality", "image"),
                        seek_index=raw.get("seek_index"), keys=raw.get("keys"))
    if "num_samples" in raw and raw["num_samples"] != manifest.num_samples:
        raise ManifestError(f"{file}: field 'num_samples' is {raw['num_samples']!r:.60} but the "
                            f"shards sum to {manifest.num_samples}")
    if not shards:
        raise ManifestError(f"{file}: field 'shards' lists no shards")
    return manifest


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/manifest.json`` atomically (temp file + rename): the corpus fields, then
    one line per shard."""
    out = Path(out_dir) / MANIFEST
    tmp = out.with_suffix(".json.tmp")
    data = manifest.to_json()
    rows = data.pop("shards")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1)[:-2] + ',\n "shards": [\n  ')
        f.write(",\n  ".join(json.dumps(row) for row in rows))
        f.write("\n ]\n}\n")
    os.replace(tmp, out)
    return out


class ShardWriter:
    """Write WebDataset samples into ``out_dir/shard-%06d.tar``, ``samples_per_shard`` each.

    ``write({"__key__": "000001", "png": b"...", "cls": 3})`` adds a sample; ``close(source,
    license, meta, modality)`` closes the last shard, hashes every shard and writes the manifest.
    Use as a context manager only for clean-up on error (the manifest is written by ``close``).
    Each closed shard gets its seek index beside it (``NAME.tar.idx``: the byte offset of every
    sample, recorded while writing). Every member has the integer ``mtime`` (seconds; default:
    when the writer was made), which keeps tarfile from adding a pax header per member (a float
    mtime costs 1 KiB per member: 28x28 PNG shards are ~1.9x larger with one).
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 10_000,
                 mtime: int | None = None):
        if samples_per_shard <= 0:
            raise ValueError("samples_per_shard must be > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.mtime = int(time.time()) if mtime is None else int(mtime)
        self.shards: list[ShardInfo] = []
        self._tar = None  # a webdataset.TarWriter while a shard is open
        self._offsets: list[int] = []

    def _open_next(self) -> None:
        self._finish_shard()
        name = f"shard-{len(self.shards):06d}.tar"
        import webdataset as wds  # imported here: it imports torch, which readers of manifests skip

        self.shards.append(ShardInfo(name=name, num_samples=0))
        self._tar = wds.TarWriter(str(self.out_dir / name), mtime=self.mtime)
        self._offsets = []

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            last, path = self.shards[-1], self.out_dir / self.shards[-1].name
            last.num_samples, last.size = len(self._offsets), path.stat().st_size
            last.sha256 = sha256_file(path)
            write_seek_index(path.with_name(path.name + SEEK_SUFFIX), self._offsets, last.size)

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError("a sample needs a '__key__'")
        if self._tar is None or len(self._offsets) >= self.samples_per_shard:
            self._open_next()
        self._offsets.append(self._tar.tarstream.offset)  # where this sample's first header goes
        self._tar.write(sample)

    def write_all(self, samples: Iterable[dict[str, Any]]) -> int:
        n = 0
        for n, sample in enumerate(samples, 1):
            self.write(sample)
        return n

    def close(self, source: str, license: str, meta: dict[str, Any] | None = None,
              modality: str = "image") -> Manifest:
        self._finish_shard()
        if not self.shards:
            raise ValueError(f"no samples were written to {self.out_dir}")
        manifest = Manifest(shards=self.shards, source=source, license=license,
                            meta=meta or {}, root=str(self.out_dir),
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            modality=modality, seek_index="{name}" + SEEK_SUFFIX)
        write_manifest(manifest, self.out_dir)
        return manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._tar is not None:
            self._tar.close()


def encode_image(array, fmt: str) -> bytes:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` array -> PNG (lossless) or JPEG (quality 95) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format '{fmt}'; use png or jpg")
    return buf.getvalue()


def load_manifest_for(key: str, path: str | None):
    """``load_manifest`` whose error names the config ``key`` that pointed at ``path``."""
    from sslscale.config import ConfigError

    if not path:
        raise ConfigError(f"key '{key}' is not set (a folder written by `sslscale data prepare`)")
    try:
        return load_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"key '{key}' = {path}: {e}") from None


def image_shape_warning(manifest: Manifest, key: str, *, num_channels: int, image_size: int) -> str | None:
    """One line (no ``warning:`` prefix) naming the manifest file, its ``meta`` fields and the
    model keys when the images ``sslscale data prepare`` recorded (``meta.channels``,
    ``meta.image_sizes``) differ from what the model takes (``model.num_channels``,
    ``model.image_size``): the decoder converts every image (gray <-> RGB, the centered square
    resized), which is correct but rarely what was meant. None if they match, for text shards,
    or when the manifest does not record them (``sslscale data index``)."""
    if manifest.modality != "image":
        return None
    meta = manifest.meta or {}
    have, fields, model, becomes = [], [], [], []
    channels = meta.get("channels")
    if isinstance(channels, int) and channels != num_channels:
        have.append(f"{channels}-channel")
        fields.append("meta.channels")
        model.append(f"model.num_channels = {num_channels}")
        becomes.append(f"converted to {num_channels} channel{'s' if num_channels > 1 else ''}")
    sizes = [tuple(s) for s in meta.get("image_sizes") or [] if isinstance(s, (list, tuple)) and len(s) == 2]
    if any(s != (image_size, image_size) for s in sizes):
        have.append(", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (", ..." if len(sizes) > 3 else ""))
        fields.append("meta.image_sizes")
        model.append(f"model.image_size = {image_size}")
        becomes.append(f"resized to {image_size}x{image_size} (its centered square)")
    if not have:
        return None
    return (f"{key}: {Path(manifest.root) / MANIFEST} records {' '.join(have)} images "
            f"({', '.join(fields)}) but {' and '.join(model)}: every image is "
            f"{' and '.join(becomes)} when decoded")


def image_shape_warnings(cfg) -> list[str]:
    """``image_shape_warning`` of the config's image shards (``data.train_shards``,
    ``eval.train_shards``, ``eval.test_shards``), one line each. Shards that are not set or do
    not load are left to the command's own checks (which name the error)."""
    from omegaconf import OmegaConf

    found: list[str] = []
    if OmegaConf.select(cfg, "model.image_size") is None:
        return found  # a text model: nothing to compare
    for key in ("data.train_shards", "eval.train_shards", "eval.test_shards"):
        path = OmegaConf.select(cfg, key)
        if not path:
            continue
        try:
            manifest = load_manifest(path)
        except (OSError, ValueError):
            continue
        line = image_shape_warning(manifest, key, num_channels=cfg.model.num_channels,
                                   image_size=cfg.model.image_size)
        if line:
            found.append(line)
    return found
