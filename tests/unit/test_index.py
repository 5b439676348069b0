"""``sslscale data index``: shards written by other tools (webdataset's ``ShardWriter``, an
img2dataset-layout folder) given as brace patterns, folders, ``@list.txt``, ``pipe:`` and HTTP
URLs are counted, keyed and given seek indexes; unreadable shards are left out (or fail with
``strict``); a re-run scans only what is not indexed yet; reading resumes exactly."""

import collections
import functools
import http.server
import io
import json
import threading

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sslscale.data.index import ShardIndexError, choose_keys, expand, index_shards
from sslscale.data.seek import open_at
from sslscale.data.shards import load_manifest
from sslscale.data.stream import ImageDecoder
from sslscale.data.tar import read_tar_samples, sample_offsets

from .test_manifest_seek import RangeHandler, keys

COUNTS = [7, 5, 9, 6]


def jpeg(i: int, mode: str = "L") -> bytes:
    rng = np.random.default_rng(i)
    shape = (28, 28) if mode == "L" else (28, 28, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="JPEG")
    return buf.getvalue()


def write_wds(folder, counts=COUNTS):
    """Shards ``000000.tar`` ... by ``webdataset.ShardWriter``; sample i: jpg, cls i % 3, json."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    with wds.ShardWriter(str(folder / "%06d.tar"), maxcount=10**6, verbose=0) as sink:
        for shard, n in enumerate(counts):
            if shard:
                sink.next_stream()
            for _ in range(n):
                sink.write({"__key__": f"s{i:05d}", "jpg": jpeg(i), "cls": i % 3,
                            "json": {"label": i % 3, "i": i}})
                i += 1
    return sorted(folder.glob("*.tar"))


def test_webdataset_shards_by_brace_pattern(tmp_path):
    write_wds(tmp_path / "wds")
    summary = index_shards([str(tmp_path / "wds" / "{000000..000003}.tar")], tmp_path / "idx",
                           workers=2, quiet=True)
    assert (summary["num_shards"], summary["num_samples"], summary["scanned"]) == (4, 27, 4)
    assert summary["keys"] == {"image": "jpg", "text": None, "label": "cls"}
    assert summary["extensions"] == {"jpg": 27, "cls": 27, "json": 27}
    manifest = load_manifest(tmp_path / "idx")
    assert [s.num_samples for s in manifest.shards] == COUNTS
    for i, s in enumerate(manifest.shards):
        assert s.size == (tmp_path / "wds" / f"{i:06d}.tar").stat().st_size
        assert open_at(manifest, i, 3).how == "index"
    whole = keys(manifest, 0, 60)
    assert all(keys(manifest, k, 15) == whole[k:k + 15] for k in (4, 11, 19, 26))
    decode = ImageDecoder.for_manifest(manifest, 28, 1)
    sample = next(_samples(manifest, 0))
    assert decode(sample)["labels"] == int(sample["__key__"][1:]) % 3


def _samples(manifest, shard):
    with open(manifest.url(shard), "rb") as f:
        yield from read_tar_samples(f, manifest.url(shard))


def test_rerun_scans_only_new_shards_and_bad_shards_are_left_out(tmp_path, capsys):
    shards = write_wds(tmp_path / "wds")
    out = tmp_path / "idx"
    assert index_shards([str(p) for p in shards[:2]], out, workers=1, quiet=True)["scanned"] == 2
    state = out / "index-state.jsonl"
    state.write_text(state.read_text() + '{"name": "torn')  # an interrupted append
    shards[3].write_bytes(shards[3].read_bytes()[: sample_offsets(shards[3])[2] + 700])  # truncated
    summary = index_shards([str(tmp_path / "wds"), str(tmp_path / "missing.tar")], out, workers=1)
    assert summary["scanned"] == 3 and summary["num_shards"] == 3 and summary["num_samples"] == 21
    assert set(summary["unreadable"]) == {str(shards[3]), str(tmp_path / "missing.tar")}
    assert "left out unreadable shard" in capsys.readouterr().err
    assert index_shards([str(tmp_path / "wds")], out, workers=1, quiet=True)["scanned"] == 1
    with pytest.raises(ShardIndexError, match=r"000003.tar: EOFError.*--strict"):
        index_shards([str(tmp_path / "wds")], out, workers=1, strict=True, quiet=True)


def test_img2dataset_layout_list_file_and_pipe(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for j in range(4):
                key = f"{shard:05d}{j:04d}"
                tar.write({"__key__": key, "jpg": jpeg(j, "RGB"), "txt": f"a photo {j}",
                           "json": json.dumps({"caption": f"a photo {j}", "label": j}).encode()})
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    (tmp_path / "list.txt").write_text(f"# shards\n{folder / '00000.tar'}\n\npipe:cat {folder / '00001.tar'}\n")
    assert expand([str(folder)]) == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    summary = index_shards([f"@{tmp_path / 'list.txt'}"], tmp_path / "idx", label_key="json:label",
                           workers=1, quiet=True)
    assert summary["keys"] == {"image": "jpg", "text": "txt", "label": "json:label"}
    manifest = load_manifest(tmp_path / "idx")
    assert manifest.shards[1].name.startswith("pipe:cat") and manifest.num_samples == 8
    assert open_at(manifest, 1, 2).how == "replay" and keys(manifest, 3, 8) == keys(manifest, 0, 11)[3:]
    decode = ImageDecoder.for_manifest(manifest, 16, 3)
    example = decode(next(_samples(manifest, 0)))
    assert example["pixel_values"].shape == (3, 16, 16) and example["labels"] == 0


def test_http_shards_indexed_then_resumed_with_a_range_request(tmp_path):
    shards = write_wds(tmp_path / "wds")
    handler = functools.partial(RangeHandler, directory=str(tmp_path / "wds"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.ranges, server.served = True, collections.Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        index_shards([base + "/{000000..000003}.tar"], tmp_path / "idx", workers=2, quiet=True)
        manifest = load_manifest(tmp_path / "idx")
        assert [s.size for s in manifest.shards] == [p.stat().st_size for p in shards]
        assert manifest.index_url(2).startswith(str(tmp_path / "idx" / "seek"))  # indexes stay local
        server.served.clear()
        opened = open_at(manifest, 2, 6)
        opened.stream.read()
        opened.stream.close()
        assert opened.how == "index"
        assert server.served["/000002.tar"] == shards[2].stat().st_size - sample_offsets(shards[2])[6]
        whole = keys(manifest, 0, 60)
        assert all(keys(manifest, k, 15) == whole[k:k + 15] for k in (4, 11, 19, 26))
    finally:
        server.shutdown()


def test_keys_are_checked_against_what_the_shards_hold():
    exts = collections.Counter({"png": 10, "jpg": 3, "cls": 10, "json": 10})
    assert choose_keys(exts) == {"image": "png", "text": None, "label": "cls"}
    assert choose_keys(exts, image="JPG", label="json:y")["image"] == "jpg"
    with pytest.raises(ShardIndexError, match=r"--image-key webp: no sample has a .webp member "
                                              r"\(extensions found: png \(10\), cls \(10\)"):
        choose_keys(exts, image="webp")
    with pytest.raises(ShardIndexError, match="no image member"):
        choose_keys(collections.Counter({"txt": 3}))


def test_specs_that_match_nothing_are_named(tmp_path):
    with pytest.raises(ShardIndexError, match="pattern .*nope-\\*.tar matches no file"):
        expand([str(tmp_path / "nope-*.tar")])
    with pytest.raises(ShardIndexError, match="shard list .*absent.txt"):
        expand([f"@{tmp_path / 'absent.txt'}"])
    assert expand(["a/{08..10}.tar", "pipe:cat b/{1,2}.tar", "a/08.tar"]) == [
        "a/08.tar", "a/09.tar", "a/10.tar", "pipe:cat b/1.tar", "pipe:cat b/2.tar"]
