"""``sslscale data index``: a manifest for WebDataset shards written by any tool.

Owns turning shard specs into shard URLs (local paths, folders of ``.tar``, globs, brace
patterns ``data/{000000..041455}.tar``, ``http(s)://`` URLs, ``pipe:`` commands, ``@list.txt``
files of those), scanning the shards in parallel (sample count, size in bytes, the member
extensions of each sample, and a seek index written to ``OUT/seek/<id>.idx``), choosing the
image / text / label keys, and writing ``OUT/manifest.json``. A local shard is scanned by
reading its 512-byte headers only; a remote one is streamed once. Each scanned shard is
appended to ``OUT/index-state.jsonl`` as soon as it is done, so an interrupted run, run again,
scans only the shards not yet indexed (and those whose local size changed). An unreadable
shard is reported and left out, or fails the run with ``strict``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from sslscale.data.seek import open_shard, shard_id, write_seek_index
from sslscale.data.shards import Manifest, ShardInfo, write_manifest
from sslscale.data.tar import members, split_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
TEXT_EXTS = ("txt", "caption", "text")
LABEL_EXTS = ("cls", "cls2", "label", "class", "target")
STATE = "index-state.jsonl"
SEEK_TEMPLATE = "seek/{id}.idx"


class ShardIndexError(ValueError):
    """A spec matches nothing, a chosen key is absent, or (``strict``) a shard is unreadable."""


def _remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand(specs: Sequence[str]) -> list[str]:
    """Shard URLs of ``specs``, in order, without duplicates. A spec is ``@FILE`` (one spec a
    line; blank lines and ``#`` comments skipped), a brace pattern (``{0..9}``, zero-padded
    ``{000..099}``, ``{a,b}``; also inside URLs and ``pipe:`` commands), a local glob or folder
    (its ``*.tar``, sorted), a local path, an ``http(s)://`` URL or a ``pipe:`` command. Raises
    ``ShardIndexError`` naming a list file that is missing or a glob / folder with no shard."""
    from braceexpand import braceexpand  # webdataset's dependency: the same patterns it reads

    urls: list[str] = []
    for spec in specs:
        if spec.startswith("@"):
            try:
                lines = Path(spec[1:]).read_text().splitlines()
            except OSError as e:
                raise ShardIndexError(f"shard list {spec[1:]}: {e.strerror or e}") from None
            urls += expand([s.strip() for s in lines if s.strip() and not s.strip().startswith("#")])
            continue
        for one in braceexpand(spec):
            if _remote(one):
                urls.append(one)
            elif os.path.isdir(one):
                found = sorted(glob.glob(os.path.join(glob.escape(one), "*.tar")))
                if not found:
                    raise ShardIndexError(f"folder {one} holds no .tar shard")
                urls += found
            elif glob.has_magic(one):
                found = sorted(glob.glob(one))
                if not found:
                    raise ShardIndexError(f"pattern {one} matches no file")
                urls += found
            else:
                urls.append(one)
    return list(dict.fromkeys(urls))


def stored_name(url: str, out: Path) -> str:
    """How the manifest in ``out`` names shard ``url``: relative when it lies under ``out``,
    absolute for other local paths, as given for URLs and ``pipe:`` commands."""
    if _remote(url):
        return url
    path = os.path.abspath(url)
    root = os.path.abspath(out)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


class _Counted:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def scan_shard(url: str, seek_path: str) -> dict[str, Any]:
    """Scan one shard: ``{"url", "num_samples", "size" (bytes), "exts": {ext: samples having
    it}}``, its seek index written to ``seek_path``; ``{"url", "error"}`` when it cannot be read
    (a missing file, an HTTP error, a failing command, a truncated or corrupt tar, no sample)."""
    try:
        local = not _remote(url)
        with closing(open(url, "rb", buffering=0) if local else _Counted(open_shard(url))) as stream:
            offsets, exts = _walk(stream, url)
            while not local and stream.read(1 << 20):  # the end-of-archive blocks: a size in full
                pass
        size = os.path.getsize(url) if local else stream.count
        if not offsets:
            raise ValueError("no sample (no member named KEY.EXT)")
        write_seek_index(seek_path, offsets, size)
        return {"url": url, "num_samples": len(offsets), "size": size, "exts": dict(exts)}
    except Exception as e:  # noqa: BLE001: reported per shard, the run goes on
        return {"url": url, "error": f"{type(e).__name__}: {e}"}


def _walk(stream, url: str) -> tuple[list[int], Counter]:
    """(sample offsets, samples per member extension) of a tar stream at byte 0."""
    offsets: list[int] = []
    exts: Counter = Counter()
    last_key, seen = None, set()
    for offset, name, _ in members(stream, url):
        key, ext = split_key(name)
        if key != last_key:
            offsets.append(offset)
            last_key, seen = key, set()
        if ext.lower() not in seen:
            seen.add(ext.lower())
            exts[ext.lower()] += 1
    return offsets, exts


def choose_keys(exts: Counter, image: str | None = None, text: str | None = None,
                label: str | None = None) -> dict[str, str | None]:
    """The image, text and label keys: the ones given (checked against ``exts``, the samples per
    member extension), else the most common extension of each kind (image required). A label
    may be ``json:FIELD``. Raises ``ShardIndexError`` listing the extensions found."""
    found = ", ".join(f"{e} ({n})" for e, n in exts.most_common()) or "none"

    def pick(given: str | None, kinds: tuple[str, ...], role: str) -> str | None:
        if given:
            member = "json" if given.startswith("json:") else given.lower()
            if member not in exts:
                raise ShardIndexError(f"--{role}-key {given}: no sample has a .{member} member "
                                      f"(extensions found: {found})")
            return given if given.startswith("json:") else member
        present = [e for e in kinds if exts[e]]
        return max(present, key=lambda e: (exts[e], -kinds.index(e))) if present else None

    keys = {"image": pick(image, IMAGE_EXTS, "image"), "text": pick(text, TEXT_EXTS, "text"),
            "label": pick(label, LABEL_EXTS, "label")}
    if keys["image"] is None:
        raise ShardIndexError(f"no image member ({', '.join(IMAGE_EXTS)}) in the shards; choose "
                              f"one with --image-key (extensions found: {found})")
    return keys


class Progress:
    """One status line on ``out`` (rewritten in place on a terminal, else every 10 s): shards,
    samples, bytes, MB/s and the ETA by shards."""

    def __init__(self, total: int, out: TextIO | None):
        self.total, self.out, self.start, self.last = total, out, time.monotonic(), 0.0
        self.shards = self.samples = self.bytes = self.failed = 0
        self.tty = bool(out and out.isatty())

    def add(self, result: dict[str, Any]) -> None:
        self.shards += 1
        self.failed += "error" in result
        self.samples += result.get("num_samples", 0)
        self.bytes += result.get("size", 0)
        now = time.monotonic()
        if self.out and (now - self.last > (0.2 if self.tty else 10) or self.shards == self.total):
            self.last = now
            last = self.shards == self.total
            print(("\r" if self.tty else "") + self._line(now - self.start),
                  end="" if self.tty and not last else "\n", file=self.out, flush=True)

    def _line(self, elapsed: float) -> str:
        eta = round((self.total - self.shards) * elapsed / max(self.shards, 1))
        return (f"index: {self.shards:,}/{self.total:,} shards, {self.samples:,} samples, "
                f"{self.bytes / 1e9:.2f} GB, {self.bytes / 1e6 / max(elapsed, 1e-9):.0f} MB/s, "
                f"{self.failed} unreadable, ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")


def _load_state(out: Path) -> dict[str, dict[str, Any]]:
    """Shards indexed by earlier runs whose seek index exists and, for local ones, whose size
    is unchanged: stored name -> record. A torn last line (an interrupted write) is ignored."""
    state: dict[str, dict[str, Any]] = {}
    file = out / STATE
    if file.is_file():
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
                state[record["name"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return {name: r for name, r in state.items()
            if (out / SEEK_TEMPLATE.format(id=shard_id(name))).is_file()
            and (_remote(name) or _local_size(out, name) == r.get("size"))}


def _open_log(file: Path) -> TextIO:
    """``file`` opened to append records, a line torn by an interrupted run ended first."""
    torn = False
    if file.is_file() and file.stat().st_size:
        with open(file, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    log = open(file, "a")
    if torn:
        log.write("\n")
    return log


def _local_size(out: Path, name: str) -> int | None:
    try:
        return os.path.getsize(out / name)  # an absolute name stays absolute
    except OSError:
        return None


def _scans(todo: list[tuple[str, str]], workers: int) -> Iterator[dict[str, Any]]:
    """``scan_shard`` over ``todo`` ((url, seek path) pairs): inline for one worker, else in a
    pool of ``workers`` spawned processes (scanning local shards is CPU-bound Python)."""
    if workers <= 1 or len(todo) <= 1:
        yield from (scan_shard(url, seek) for url, seek in todo)
        return
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
        yield from (f.result() for f in as_completed([pool.submit(scan_shard, u, s) for u, s in todo]))


def index_shards(specs: Sequence[str], out: str | os.PathLike, *, workers: int = 8,
                 image_key: str | None = None, text_key: str | None = None,
                 label_key: str | None = None, strict: bool = False, source: str = "index",
                 license: str = "unknown", quiet: bool = False) -> dict[str, Any]:
    """Index the shards of ``specs`` (see :func:`expand`) into ``out``: ``manifest.json`` (the
    shards in spec order, unreadable ones left out), ``seek/<id>.idx`` and ``index-state.jsonl``.
    Returns a summary (shards, samples, bytes, keys, samples per extension, unreadable shards);
    progress and the unreadable shards go to stderr unless ``quiet``.
    Raises ``ShardIndexError`` for a spec that matches nothing, a key no sample has, no
    readable shard, or (``strict``) the first unreadable shard with its error."""
    out = Path(out)
    (out / "seek").mkdir(parents=True, exist_ok=True)
    urls = expand(specs)
    if not urls:
        raise ShardIndexError("no shard given")
    names = {url: stored_name(url, out) for url in urls}
    state = _load_state(out)
    todo = [(url, str(out / SEEK_TEMPLATE.format(id=shard_id(names[url]))))
            for url in urls if names[url] not in state]
    bar, failed = Progress(len(todo), None if quiet or not todo else sys.stderr), {}
    with _open_log(out / STATE) as log:
        for result in _scans(todo, workers):
            bar.add(result)
            if "error" in result:
                if strict:
                    raise ShardIndexError(f"shard {result['url']}: {result['error']} (--strict)")
                failed[result["url"]] = result["error"]
                continue
            record = {"name": names[result["url"]], **{k: result[k] for k in ("num_samples", "size", "exts")}}
            state[record["name"]] = record
            log.write(json.dumps(record) + "\n")
            log.flush()
    for url, error in failed.items():
        print(f"warning: left out unreadable shard {url}: {error}", file=sys.stderr)
    records = [state[names[u]] for u in urls if names[u] in state]
    if not records:
        raise ShardIndexError(f"none of the {len(urls)} shard(s) could be read; first: "
                              f"{next(iter(failed.items()), ('-', '-'))}")
    exts = Counter()
    for r in records:
        exts.update(r["exts"])
    keys = choose_keys(exts, image_key, text_key, label_key)
    without = sum(r["num_samples"] for r in records) - exts[(keys["image"] or "")]
    manifest = Manifest(
        shards=[ShardInfo(r["name"], r["num_samples"], r["size"]) for r in records], source=source,
        license=license, root=str(out), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        modality="image", seek_index=SEEK_TEMPLATE, keys=keys,
        meta={"indexed": list(specs), "extensions": dict(exts.most_common()),
              "samples_without_image": without, "unreadable_shards": len(failed)})
    write_manifest(manifest, out)
    return {"out": str(out), "num_shards": len(records), "num_samples": manifest.num_samples,
            "bytes": sum(r["size"] for r in records), "scanned": len(todo), "keys": keys,
            "extensions": dict(exts.most_common()), "samples_without_image": without,
            "unreadable": failed}
