"""Manifests cost O(shards); a stream resumes inside a shard from the shard's seek index: a local
seek, one HTTP Range request (bytes counted on a real local HTTP server), a replay for ``pipe:``.
Version 1 manifests (per-sample offsets inlined) still load and seek; a missing or stale index
falls back to a walk of the tar headers. Every way resumes to exactly the same samples."""

import collections
import functools
import http.server
import json
import os
import re
import threading
import warnings
from dataclasses import replace

import pytest

from sslscale.data.seek import SEEK_SUFFIX, index_offset, open_at, resume_methods
from sslscale.data.shards import load_manifest, write_manifest
from sslscale.data.stream import DataStats, StreamReader
from sslscale.data.tar import sample_offsets

from .test_plan import write_shards

COUNTS = [10, 7, 12]


def keys(manifest, k, n, stream=0):
    """Keys of ``n`` samples of ``stream`` (the only one) from position ``k``."""
    reader = iter(StreamReader(manifest, stream, num_streams=1, seed=3, block=4, k=k,
                               stats=DataStats(strict=True)))
    return [next(reader)[0]["__key__"] for _ in range(n)]


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, COUNTS), tmp_path


def test_manifest_has_no_per_sample_data_and_indexes_match_the_tars(shards):
    manifest, root = shards
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["version"] == 2 and raw["seek_index"] == "{name}" + SEEK_SUFFIX
    assert all(set(row) == {"name", "num_samples", "size", "sha256"} for row in raw["shards"])
    assert len((root / "manifest.json").read_text().splitlines()) < 20 + len(COUNTS)  # a line a shard
    for i, info in enumerate(manifest.shards):
        offsets = sample_offsets(root / info.name)
        assert len(offsets) == info.num_samples and info.size == (root / info.name).stat().st_size
        assert os.path.getsize(manifest.index_url(i)) == 24 + 8 * info.num_samples
        assert [index_offset(manifest.index_url(i), s, info.num_samples, "x")[0]
                for s in range(info.num_samples)] == offsets
        assert b"PaxHeader" not in (root / info.name).read_bytes()  # integer mtime: no pax headers


@pytest.mark.parametrize("k", [0, 5, 13, 22, 29, 31, 40])
def test_resume_anywhere_is_exact_for_new_and_version_1_manifests(shards, k):
    manifest, root = shards
    whole = keys(manifest, 0, 60)
    assert keys(manifest, k, 20) == whole[k:k + 20]
    v1 = replace(manifest, seek_index=None,
                 shards=[replace(s, size=None, offsets=sample_offsets(root / s.name)) for s in manifest.shards])
    write_manifest(v1, root)
    for shard in manifest.shards:
        os.remove(root / (shard.name + SEEK_SUFFIX))  # a version 1 folder has no seek indexes
    loaded = load_manifest(root)
    assert loaded.shards[0].offsets is not None and loaded.seek_index is None
    assert keys(loaded, k, 20) == whole[k:k + 20]
    assert open_at(loaded, 1, 3).how == "offsets"


def test_missing_or_stale_index_warns_and_walks_the_tar_headers(shards):
    manifest, root = shards
    whole = keys(manifest, 0, 40)
    assert open_at(manifest, 0, 4).how == "index"
    os.remove(root / (manifest.shards[0].name + SEEK_SUFFIX))
    with pytest.warns(UserWarning, match=r"seek index .*shard-000000.tar.idx.*walking its tar headers"):
        opened = open_at(manifest, 0, 4)
    opened.stream.close()
    assert opened.how == "walk"
    stale = root / manifest.shards[1].name
    stale.write_bytes(stale.read_bytes() + bytes(10240))  # rewritten: another size
    with pytest.warns(UserWarning, match=r"made for \d+ bytes, shard .*shard-000001.tar has"):
        opened = open_at(manifest, 1, 3)
    opened.stream.close()
    assert opened.how == "walk"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(keys(manifest, k, 10) == whole[k:k + 10] for k in range(0, 30, 3))
    no_index = replace(manifest, seek_index=None)
    assert open_at(no_index, 2, 5).how == "walk" and keys(no_index, 17, 20) == whole[17:37]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with single-range ``Range: bytes=a-[b]`` support (unless ``server.ranges`` is
    false); counts the body bytes served per path in ``server.served``."""

    def log_message(self, *args):
        pass

    def send_head(self):
        self.remaining = None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not (match and self.server.ranges and os.path.isfile(path)):
            return super().send_head()
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        if start >= size:
            f.close()
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f.seek(start)
        self.remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        data = source.read() if self.remaining is None else source.read(self.remaining)
        self.server.served[self.path] += len(data)
        outputfile.write(data)


@pytest.fixture(params=[True, False], ids=["range", "no-range"])
def http_shards(request, shards):
    manifest, root = shards
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    server.ranges, server.served = request.param, collections.Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    remote = replace(manifest, shards=[replace(s, name=f"{base}/{s.name}") for s in manifest.shards])
    yield manifest, remote, server
    server.shutdown()


def test_http_resume_is_one_range_request_from_the_index(http_shards):
    local, remote, server = http_shards
    whole = keys(local, 0, 60)
    assert remote.index_url(1).startswith("http://") and resume_methods(remote)["range"] == 3
    info, path = local.shards[2], "/" + local.shards[2].name
    offset = sample_offsets(local.url(2))[9]
    server.served.clear()
    opened = open_at(remote, 2, 9)
    rest = opened.stream.read()
    opened.stream.close()
    assert opened.how == "index" and len(rest) == info.size - offset
    if server.ranges:  # the bytes from the sample on, and 24 + 8 of the index
        assert server.served[path] == info.size - offset
        assert server.served[path + SEEK_SUFFIX] == 24 + 8
    else:  # the whole shard: the bytes before the sample were read (not parsed) and dropped
        assert server.served[path] == info.size
    for k in (5, 13, 29):
        assert keys(remote, k, 20) == whole[k:k + 20]


def test_pipe_shards_replay_and_the_plan_says_so(shards):
    manifest, root = shards
    whole = keys(manifest, 0, 40)
    piped = replace(manifest, seek_index=None,
                    shards=[replace(s, name=f"pipe:cat {root / s.name}") for s in manifest.shards])
    opened = open_at(piped, 0, 4)
    opened.stream.close()
    assert (opened.how, opened.skip) == ("replay", 4)
    assert keys(piped, 13, 20) == whole[13:33]
    assert resume_methods(piped) == {"seek": 0, "walk": 0, "range": 0, "replay": 3}
    assert resume_methods(manifest) == {"seek": 3, "walk": 0, "range": 0, "replay": 0}


def test_bad_seek_index_template_names_the_field(shards):
    _, root = shards
    raw = json.loads((root / "manifest.json").read_text())
    raw["seek_index"] = "{shard}.idx"
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="field 'seek_index' must be a template"):
        load_manifest(root)


def test_no_warning_when_everything_is_indexed(shards):
    manifest, _ = shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys(manifest, 11, 10)
