"""WebDataset tar shards and their ``manifest.json``.

Owns writing samples into numbered tar shards (``shard-000000.tar`` ...) and the manifest that
describes them: shard file names, sample count per shard, total, sha256 per shard, the source,
its license, the ``modality`` (``image``, the default for manifests that predate the field, or
``text``) and free-form ``meta`` (image size, channels, classes; for text: seq_len, vocab_size,
num_tokens, tokenizer folder). Readers and the shard plan trust the manifest's counts, so it is
written last, atomically, after every shard is closed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext

MANIFEST = "manifest.json"


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest, an absolute path, or a URL / pipe: command
    num_samples: int
    sha256: str | None = None
    offsets: list[int] | None = None  # byte offset of each sample's first member (local tars)


@dataclass
class Manifest:
    shards: list[ShardInfo]
    source: str
    license: str
    meta: dict[str, Any] = field(default_factory=dict)
    root: str = ""  # folder of the manifest file; not serialized
    created: str = ""
    modality: str = "image"  # "image" or "text"; manifests without the field are image shards

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def url(self, index: int) -> str:
        """Where shard ``index`` is read from: a local path, ``http(s)://...`` or ``pipe:...``."""
        name = self.shards[index].name
        if "://" in name or name.startswith("pipe:") or os.path.isabs(name):
            return name
        return os.path.join(self.root, name)

    def to_json(self) -> dict[str, Any]:
        return {"format": "webdataset", "version": 1, "modality": self.modality,
                "source": self.source, "license": self.license, "created": self.created,
                "num_shards": len(self.shards), "num_samples": self.num_samples,
                "meta": self.meta, "shards": [asdict(s) for s in self.shards]}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sample_offsets(path: str | os.PathLike) -> list[int]:
    """Byte offset of the first tar member of each sample (members grouped by key, as
    WebDataset groups them), so that a reader can seek to any sample."""
    offsets, last_key = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            key, _ = base_plus_ext(member.name)
            if key != last_key:
                offsets.append(member.offset)
                last_key = key
    return offsets


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read ``manifest.json`` (or the one inside folder ``path``).

    Raises ``FileNotFoundError`` naming the path if there is none, ``ValueError`` naming the
    file and key if it is malformed.
    """
    path = Path(path)
    file = path / MANIFEST if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {file} (prepare shards with `sslscale data prepare ... --out "
            f"{file.parent}`)")
    try:
        raw = json.loads(file.read_text())
        shards = [ShardInfo(**s) for s in raw["shards"]]
        manifest = Manifest(shards=shards, source=raw["source"], license=raw["license"],
                            meta=raw.get("meta", {}), root=str(file.parent),
                            created=raw.get("created", ""), modality=raw.get("modality", "image"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: malformed shard manifest ({type(e).__name__}: {e})") from None
    if "num_samples" in raw and raw["num_samples"] != manifest.num_samples:
        raise ValueError(f"{file}: 'num_samples' is {raw['num_samples']} but the shards sum to "
                         f"{manifest.num_samples}")
    if not shards:
        raise ValueError(f"{file}: lists no shards")
    return manifest


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/manifest.json`` atomically (temp file + rename)."""
    out = Path(out_dir) / MANIFEST
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, out)
    return out


class ShardWriter:
    """Write WebDataset samples into ``out_dir/shard-%06d.tar``, ``samples_per_shard`` each.

    ``write({"__key__": "000001", "png": b"...", "cls": 3})`` adds a sample; ``close(source,
    license, meta, modality)`` closes the last shard, hashes every shard and writes the manifest.
    Use as a context manager only for clean-up on error (the manifest is written by ``close``).
    An integer ``mtime`` (seconds) for every member keeps tarfile from adding a pax header per
    member, which halves shards of small samples (a 128-token block: 1 KiB instead of 2 KiB).
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 10_000,
                 mtime: int | None = None):
        if samples_per_shard <= 0:
            raise ValueError("samples_per_shard must be > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.mtime = mtime  # None: each member's write time, a float that costs a 1 KiB pax header
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def _open_next(self) -> None:
        self._finish_shard()
        name = f"shard-{len(self.shards):06d}.tar"
        self.shards.append(ShardInfo(name=name, num_samples=0))
        self._tar = wds.TarWriter(str(self.out_dir / name), mtime=self.mtime)
        self._count = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            last = self.shards[-1]
            last.num_samples = self._count
            last.sha256 = sha256_file(self.out_dir / last.name)
            last.offsets = sample_offsets(self.out_dir / last.name)

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError("a sample needs a '__key__'")
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        self._tar.write(sample)
        self._count += 1

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
                            modality=modality)
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


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big") * (-1 if field[:1] == b"\xff" else 1)
    return int(field.rstrip(b"\x00 ").strip() or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8")
    return None


def read_tar_samples(stream, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples from a tar byte stream positioned at a member header.

    A small reader of the ustar/pax/GNU tar subset that tar writers produce (regular files,
    pax ``path`` records, GNU long names; other entries skipped), several times faster than
    ``tarfile``. Members are grouped into samples by key like WebDataset (``dir/key.ext``:
    ``{"__key__": "dir/key", "__url__": url, "ext": bytes}``), a sample only once the next
    one begins or the archive ends cleanly. Raises ``EOFError`` on truncation (the pending
    sample, which may miss members, is dropped) and ``ValueError`` on a bad header checksum.
    """
    sample: dict[str, Any] | None = None
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == bytes(512):
            if header and len(header) < 512:  # the pending sample may miss members: dropped
                raise EOFError(f"{url}: truncated tar header")
            break
        checksum = sum(header[:148]) + 256 + sum(header[156:])
        if _octal(header[148:156]) != checksum:
            raise ValueError(f"{url}: corrupt tar header (bad checksum)")
        size, kind = _octal(header[124:136]), header[156:157]
        prefix = header[345:500].rstrip(b"\x00").decode("utf-8")
        name = long_name or (prefix + "/" if prefix else "") + header[:100].rstrip(b"\x00").decode("utf-8")
        data = stream.read(size + (-size % 512))[:size]
        if len(data) < size:  # as above: a sample is yielded only once the next one begins
            raise EOFError(f"{url}: truncated tar member {name}")
        if kind in (b"x", b"L"):
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\x00").decode("utf-8")
            continue
        long_name = None
        if kind not in (b"0", b"\x00") or "." not in name.rsplit("/", 1)[-1]:
            continue
        key, ext = base_plus_ext(name)
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample


def load_manifest_for(key: str, path: str | None):
    """``load_manifest`` whose error names the config ``key`` that pointed at ``path``."""
    from sslscale.config import ConfigError

    if not path:
        raise ConfigError(f"key '{key}' is not set (a folder written by `sslscale data prepare`)")
    try:
        return load_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"key '{key}' = {path}: {e}") from None
