"""Reading WebDataset tar shards without ``tarfile``: samples from a byte stream, and sample
offsets from a walk of the member headers.

A small reader of the ustar/pax/GNU tar subset that tar writers produce (regular files, pax
``path`` records, GNU long names; other entries skipped), several times faster than
``tarfile``. Members are grouped into samples by key as WebDataset groups them
(``dir/key.ext``: the key is everything before the first dot of the file name). A sample's
byte offset is where its first member's header starts (its pax / long-name header, if any).
"""

from __future__ import annotations

import os
import re
from typing import Any, BinaryIO, Iterator

BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str | None, str | None]:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``, as ``webdataset``'s
    ``base_plus_ext``; ``(None, None)`` for a name without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


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


def parse_header(header: bytes, url: str) -> tuple[str, int, bytes]:
    """A 512-byte member header -> ``(name, data size in bytes, type flag)``. Raises
    ``ValueError`` naming ``url`` on a bad checksum."""
    checksum = sum(header[:148]) + 256 + sum(header[156:])
    if _octal(header[148:156]) != checksum:
        raise ValueError(f"{url}: corrupt tar header (bad checksum)")
    prefix = header[345:500].rstrip(b"\x00").decode("utf-8")
    name = (prefix + "/" if prefix else "") + header[:100].rstrip(b"\x00").decode("utf-8")
    return name, _octal(header[124:136]), header[156:157]


def _long_name(kind: bytes, data: bytes) -> str | None:
    return _pax_path(data) if kind == b"x" else data.rstrip(b"\x00").decode("utf-8")


def _is_file(kind: bytes, name: str) -> bool:
    return kind in (b"0", b"\x00") and "." in name.rsplit("/", 1)[-1]


def read_tar_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples from a tar byte stream positioned at a member header:
    ``{"__key__": "dir/key", "__url__": url, "ext": bytes, ...}`` (extensions lower-cased).

    A sample is yielded only once the next one begins or the archive ends cleanly. Raises
    ``EOFError`` on truncation (the pending sample, which may miss members, is dropped) and
    ``ValueError`` on a bad header checksum, both naming ``url``.
    """
    sample: dict[str, Any] | None = None
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            if header and len(header) < BLOCK:  # the pending sample may miss members: dropped
                raise EOFError(f"{url}: truncated tar header")
            break
        name, size, kind = parse_header(header, url)
        name = long_name or name
        data = stream.read(size + (-size % BLOCK))[:size]
        if len(data) < size:  # as above: a sample is yielded only once the next one begins
            raise EOFError(f"{url}: truncated tar member {name}")
        if kind in (b"x", b"L"):
            long_name = _long_name(kind, data)
            continue
        long_name = None
        if not _is_file(kind, name):
            continue
        key, ext = split_key(name)
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample


def members(stream: BinaryIO, url: str) -> Iterator[tuple[int, str, int]]:
    """``(sample offset, member name, data size)`` of every file member of a tar byte stream
    that starts at byte 0, reading the headers only: the data is skipped with ``seek`` when the
    stream can (a local file opened unbuffered: one 512-byte read per member), else read in
    chunks and dropped (HTTP, ``pipe:``). The offset is where the member's first header starts
    (its pax / long-name header, if any). Raises ``EOFError`` / ``ValueError`` naming ``url`` on
    a truncated archive (also one cut at a member boundary: no end-of-archive marker) or a bad
    header."""
    seekable = getattr(stream, "seekable", lambda: False)()
    end = os.fstat(stream.fileno()).st_size if seekable else None
    pos, long_name, first = 0, None, None
    while True:
        header = stream.read(BLOCK)
        if header == bytes(BLOCK):  # the end-of-archive marker
            return
        if len(header) < BLOCK:  # tar writers end with the marker: without it, a cut file
            raise EOFError(f"{url}: truncated tar at byte {pos} (no end-of-archive marker)")
        name, size, kind = parse_header(header, url)
        padded = size + (-size % BLOCK)
        first = pos if first is None else first
        if kind in (b"x", b"L"):
            data = stream.read(padded)[:size]
            if len(data) < size:
                raise EOFError(f"{url}: truncated tar member at byte {pos}")
            long_name = _long_name(kind, data)
        else:
            name, long_name = long_name or name, None
            if _is_file(kind, name):
                yield first, name, size
            first = None
            _skip(stream, size, padded, end, url, pos)
        pos += BLOCK + padded


def _skip(stream: BinaryIO, size: int, n: int, end: int | None, url: str, pos: int,
          chunk: int = 1 << 20) -> None:
    """Skip ``n`` bytes of member data (``size`` of them real) at header ``pos``: a seek when the
    file's ``end`` is known, else a read."""
    if end is not None:
        if stream.seek(n, os.SEEK_CUR) - n + size > end:
            raise EOFError(f"{url}: truncated tar member at byte {pos}")
        return
    done = 0
    while done < n:
        got = len(stream.read(min(chunk, n - done)))
        if got == 0:
            break
        done += got
    if done < size:
        raise EOFError(f"{url}: truncated tar member at byte {pos}")


def sample_offsets(path: str | os.PathLike, stop: int | None = None) -> list[int]:
    """Byte offset of each sample of the local tar ``path`` (of the first ``stop`` + 1 samples
    when ``stop`` is given), from a walk of its headers (:func:`members`)."""
    offsets: list[int] = []
    last_key = None
    with open(path, "rb", buffering=0) as f:
        for offset, name, _ in members(f, str(path)):
            key, _ = split_key(name)
            if key != last_key:
                if stop is not None and len(offsets) > stop:
                    break
                offsets.append(offset)
                last_key = key
    return offsets
