"""Opening a shard at a sample: per-shard seek indexes, local seeks, HTTP Range, ``pipe:`` replay.

Owns the seek index of a shard (a sidecar file, ``NAME.tar.idx`` beside the shards that
``sslscale data prepare`` writes; where ``sslscale data index`` puts them for shards it cannot
write beside), reading one offset from it, and :func:`open_at`, which positions a byte stream
at sample ``i`` of a shard:

- a local file: seek to the offset from the seek index (two small reads), from a version 1
  manifest's inlined ``offsets``, or else from a walk of the tar headers up to the sample;
- ``http(s)://``: one HTTP Range request from the index's offset (a server that ignores Range:
  the bytes before the offset are read and discarded unparsed); without an index, a replay;
- ``pipe:CMD`` and other schemes: a replay (the samples before ``i`` are read and discarded).

An index is read only by the stream that resumes inside its shard, and nothing of it is kept.
A missing or stale index (sample count or shard size differ) warns once and falls back.

Sidecar format (little-endian): ``b"SSLSEEK1"``, uint64 sample count ``n``, uint64 shard size in
bytes, then ``n`` uint64 byte offsets (where each sample's first member header starts):
``24 + 8 n`` bytes, 80 KB for a shard of 10,000 samples.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import urllib.error
import urllib.request
import warnings
from typing import Any, BinaryIO, NamedTuple, Sequence

from sslscale.data.tar import sample_offsets

SEEK_SUFFIX = ".idx"
MAGIC = b"SSLSEEK1"
_HEAD = struct.Struct("<8sQQ")
_HTTP = ("http://", "https://")


def shard_id(name: str) -> str:
    """A stable file-name-safe id of a shard name or URL (the ``{id}`` of a seek-index template):
    the first 20 hex digits of its sha1."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:20]


class SeekIndexError(ValueError):
    """A seek index is unreadable, not one, or does not match its shard (names both)."""


def write_seek_index(path: str | os.PathLike, offsets: Sequence[int], shard_size: int) -> None:
    """Write the seek index of a shard of ``len(offsets)`` samples and ``shard_size`` bytes to
    ``path`` atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(_HEAD.pack(MAGIC, len(offsets), shard_size))
        f.write(struct.pack(f"<{len(offsets)}Q", *offsets))
    os.replace(tmp, path)


def read_range(url: str, start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of a local file or an ``http(s)://`` URL (a Range
    request; a server that ignores Range sends the whole body, which is then sliced). Fewer
    bytes at the end of the file. Raises ``OSError`` / ``urllib.error.URLError``."""
    if not url.startswith(_HTTP):
        with open(url, "rb") as f:
            f.seek(start)
            return f.read(length)
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + length - 1}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
            return body if response.status == 206 else body[start:start + length]
    except urllib.error.HTTPError as e:
        if e.code == 416:  # range not satisfiable: past the end
            return b""
        raise


def index_offset(index_url: str, sample: int, num_samples: int, shard_url: str) -> tuple[int, int]:
    """``(byte offset of sample, shard size in bytes)`` from the seek index at ``index_url``
    (the shard size when ``sample >= num_samples``). Raises ``SeekIndexError`` naming the index
    and the shard when it is missing, malformed, or was made for another shard."""
    try:
        head = read_range(index_url, 0, _HEAD.size)
        magic, count, size = _HEAD.unpack(head) if len(head) == _HEAD.size else (b"", 0, 0)
        if magic != MAGIC:
            raise SeekIndexError(f"not a seek index (no {MAGIC!r} header)")
        if count != num_samples:
            raise SeekIndexError(f"indexes {count} samples, the manifest says {num_samples}")
        if sample >= count:
            return size, size
        entry = read_range(index_url, _HEAD.size + 8 * sample, 8)
        if len(entry) < 8:
            raise SeekIndexError("truncated")
        return struct.unpack("<Q", entry)[0], size
    except (OSError, SeekIndexError, urllib.error.URLError, ValueError) as e:
        raise SeekIndexError(f"seek index {index_url} of shard {shard_url}: {type(e).__name__}: {e}") from e


class _PipeReader:
    """stdout of ``pipe:CMD``; a non-zero exit status is an ``OSError`` once the output ends
    (not before: what the command wrote is still read)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) < n and self.proc.wait() != 0:
            raise OSError(f"pipe:{self.command} exited with status {self.proc.returncode}")
        return data

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def open_shard(url: str, start: int = 0) -> Any:
    """A binary stream of shard ``url`` from byte ``start``: a local path, ``http(s)://``
    (urllib: an HTTP error or a short body raises; ``start > 0`` asks for a Range and, if the
    server ignores it, reads and discards the bytes before ``start``), ``pipe:CMD``, or any
    other scheme WebDataset's ``gopen`` knows (``start`` must be 0 for those two)."""
    if url.startswith(_HTTP):
        headers = {"Range": f"bytes={start}-"} if start else {}
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        if start and response.status != 206:
            _discard(response, start, url)
        return response
    if start:
        if url.startswith("pipe:") or "://" in url:
            raise ValueError(f"{url}: cannot start at byte {start} (not a local file or HTTP)")
        f = open(url, "rb")
        f.seek(start)
        return f
    if url.startswith("pipe:"):
        return _PipeReader(url[5:])
    if "://" in url:
        import webdataset as wds

        return wds.gopen(url)
    return open(url, "rb")


def _discard(stream: BinaryIO, n: int, url: str, chunk: int = 1 << 20) -> None:
    while n > 0:
        got = len(stream.read(min(chunk, n)))
        if got == 0:
            raise EOFError(f"{url}: ended {n} byte(s) before the sample's offset")
        n -= got


class Opened(NamedTuple):
    stream: Any  # binary stream positioned at a member header
    skip: int  # samples still to read and discard (a replay), 0 after a seek
    how: str  # "start", "index", "offsets" (version 1), "walk", "replay"


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _open_indexed(url: str, index: str, info: Any, sample: int) -> Any:
    """Shard ``url`` opened at ``sample``'s offset from seek index ``index``; ``SeekIndexError``
    when the index was made for a shard of another size (the manifest's ``size``, the local
    file's, or the total of the HTTP response's ``Content-Range``)."""
    offset, size = index_offset(index, sample, info.num_samples, url)
    remote = url.startswith(_HTTP)
    actual = info.size if remote else os.path.getsize(url)
    if actual is not None and actual != size:
        raise SeekIndexError(f"seek index {index} was made for {size} bytes, shard {url} has {actual}")
    stream = open_shard(url, offset)
    total = (stream.headers.get("Content-Range") or "/").rsplit("/", 1)[1] if remote else ""
    if total.isdigit() and int(total) != size:
        stream.close()
        raise SeekIndexError(f"seek index {index} was made for {size} bytes, shard {url} has {total}")
    return stream


def open_at(manifest: Any, shard: int, sample: int) -> Opened:
    """Shard ``shard`` of ``manifest`` (a ``sslscale.data.shards.Manifest``) positioned at
    sample ``sample`` (see the module docstring for how, per kind of URL). Raises what opening
    the shard raises (``OSError``, an HTTP error); an unusable seek index only warns."""
    url, info = manifest.url(shard), manifest.shards[shard]
    remote = url.startswith(_HTTP)
    if sample == 0:
        return Opened(open_shard(url), 0, "start")
    if not remote and ("://" in url or url.startswith("pipe:")):
        return Opened(open_shard(url), sample, "replay")
    if info.offsets is not None and not remote:  # a version 1 manifest
        end = info.offsets[sample] if sample < len(info.offsets) else os.path.getsize(url)
        return Opened(open_shard(url, end), 0, "offsets")
    index = manifest.index_url(shard)
    if index is not None:
        try:
            return Opened(_open_indexed(url, index, info, sample), 0, "index")
        except SeekIndexError as e:
            _warn(f"{e}; {'replaying the shard' if remote else 'walking its tar headers'} instead")
    if remote:
        return Opened(open_shard(url), sample, "replay")
    offsets = sample_offsets(url, stop=sample)
    return Opened(open_shard(url, offsets[sample] if sample < len(offsets) else os.path.getsize(url)),
                  0, "walk")


def resume_methods(manifest: Any) -> dict[str, int]:
    """How a stream resuming inside each shard gets there, counted over the shards (no I/O):
    ``seek`` (local, seek index or version 1 offsets), ``walk`` (local, tar headers walked up
    to the sample), ``range`` (HTTP Range from a seek index) and ``replay`` (``pipe:``, other
    schemes, HTTP without an index: the samples before are read and discarded)."""
    counts = {"seek": 0, "walk": 0, "range": 0, "replay": 0}
    indexed = manifest.seek_index is not None
    for info in manifest.shards:
        name = info.name
        if name.startswith(_HTTP):
            counts["range" if indexed else "replay"] += 1
        elif "://" in name or name.startswith("pipe:"):
            counts["replay"] += 1
        else:
            counts["seek" if indexed or info.offsets is not None else "walk"] += 1
    return counts
