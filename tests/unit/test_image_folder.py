"""``data prepare image-folder``: an ImageNet-layout folder (class sub-folders of JPEGs) becomes
shards that keep each JPEG's bytes, label by sorted class name, use integer mtimes (no pax
headers), choose a shard count the default streams can read, and come out the same with one
worker or several."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from sslscale.data import sources
from sslscale.data.plan import check_streams
from sslscale.data.shards import load_manifest
from sslscale.data.sources import auto_shards, prepare, prepare_image_folder, stored_image
from sslscale.data.tar import read_tar_samples


def photo(seed: int, size=(64, 48)) -> Image.Image:
    """A smooth RGB image (gradients + a disc + mild noise), JPEG-friendly like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, max(w, h) / 2)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (1 - disc) * 200 + 30], axis=-1)
    noisy = base + rng.normal(0, 6, size=base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def jpeg_folder(root, counts: dict[str, int], size=(64, 48)):
    """``root/<class>/<i>.JPEG`` files; returns {path: bytes}."""
    written = {}
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            path = root / name / f"{name}_{i}.JPEG"
            photo(100 * c + i, size).save(path, quality=90)
            written[path] = path.read_bytes()
    return written


def members(manifest):
    """Every (name, TarInfo, bytes) of every shard, and the raw shard bytes."""
    out, raw = [], b""
    for shard in manifest.shards:
        path = f"{manifest.root}/{shard.name}"
        raw += open(path, "rb").read()
        with tarfile.open(path) as tar:
            out += [(m.name, m, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out, raw


def test_jpegs_pass_through_with_sorted_class_labels_and_no_pax_headers(tmp_path):
    files = jpeg_folder(tmp_path / "in", {"n02": 3, "n01": 5})  # sorted: n01 -> 0, n02 -> 1
    (tmp_path / "in" / "n01" / "notes.txt").write_text("not an image")
    manifest = prepare("image-folder", tmp_path / "out", input_dir=str(tmp_path / "in"), progress=False)
    assert manifest.num_samples == 8 and manifest.meta["classes"] == ["n01", "n02"]
    assert manifest.meta["passthrough"] == 8 and manifest.meta["image_format"] == "passthrough"
    rows, raw = members(manifest)
    assert b"PaxHeader" not in raw and all(m.type != tarfile.XHDTYPE for _, m, _ in rows)
    assert all(isinstance(m.mtime, int) for _, m, _ in rows)
    by_digest = {hashlib.sha256(b).hexdigest(): p for p, b in files.items()}
    labels = {n.split(".")[0]: int(b) for n, _, b in rows if n.endswith(".cls")}
    jpgs = [(n, b) for n, _, b in rows if n.endswith(".jpg")]
    assert len(jpgs) == 8
    for name, data in jpgs:  # the file's own bytes, labelled by its class folder
        path = by_digest[hashlib.sha256(data).hexdigest()]
        assert labels[name.split(".")[0]] == ["n01", "n02"].index(path.parent.name)


@pytest.mark.filterwarnings("ignore:.*shard\\(s\\) but the default data.num_streams")
def test_other_formats_unreadable_files_and_max_size(tmp_path):
    root = tmp_path / "in" / "a"
    root.mkdir(parents=True)
    photo(1, (300, 200)).save(root / "big.jpg", quality=90)
    photo(2, (40, 30)).save(root / "small.jpg", quality=90)
    photo(3, (50, 40)).save(root / "lossless.png")
    photo(4, (30, 20)).convert("L").save(root / "gray.bmp")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    assert stored_image(root / "small.jpg").passthrough
    big = stored_image(root / "big.jpg", max_size=100)
    assert (big.ext, big.size, big.passthrough) == ("jpg", (100, 67), False)
    assert Image.open(io.BytesIO(big.data)).size == (100, 67)
    bmp = stored_image(root / "gray.bmp")
    assert (bmp.ext, bmp.channels, bmp.passthrough) == ("png", 1, False)
    assert stored_image(root / "lossless.png", fmt="jpg").ext == "jpg"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\): .*broken.jpg"):
        manifest = prepare_image_folder(tmp_path / "in", tmp_path / "out", max_size=100, progress=False)
    assert manifest.num_samples == 4 and manifest.meta["unreadable"] == 1
    assert manifest.meta["passthrough"] == 2 and manifest.meta["reencoded"] == 2
    exts = sorted(n.rsplit(".", 1)[1] for n, _, _ in members(manifest)[0] if not n.endswith(".cls"))
    assert exts == ["jpg", "jpg", "png", "png"]


def test_default_shards_let_the_default_streams_train_400_images_on_2_ranks(tmp_path, capsys):
    jpeg_folder(tmp_path / "in", {"a": 150, "b": 250}, size=(24, 16))
    manifest = prepare_image_folder(tmp_path / "in", tmp_path / "out")
    counts = [s.num_samples for s in manifest.shards]
    assert len(counts) == 64 and sum(counts) == 400 and max(counts) - min(counts) <= 1
    check_streams(len(counts), 8, 2, 2)  # data.num_streams=8, data.num_workers=2, 2 ranks
    assert "prepare image-folder: 400/400 images" in capsys.readouterr().err
    assert load_manifest(tmp_path / "out").num_samples == 400
    # ImageNet: 1,281,167 JPEGs of ~110 KB -> ~1,000 per shard, enough for 1,024 streams
    assert auto_shards(1_281_167, 141 * 10**9) == 1288
    assert auto_shards(5, 10**4) == 5 and auto_shards(60_000, 3 * 10**7) == 64


def test_too_few_shards_warn_what_to_change(tmp_path):
    jpeg_folder(tmp_path / "in", {"a": 40}, size=(16, 16))
    with pytest.warns(UserWarning, match=r"4 shard\(s\) but the default data.num_streams=8 needs >= 8: "
                                         r"prepare again with --samples-per-shard <= 5"):
        prepare_image_folder(tmp_path / "in", tmp_path / "out", samples_per_shard=10, progress=False)


def test_parallel_workers_write_the_same_shards(tmp_path, monkeypatch):
    jpeg_folder(tmp_path / "in", {"a": 30, "b": 20}, size=(20, 20))
    photo(9, (90, 60)).save(tmp_path / "in" / "a" / "wide.png")
    one = prepare_image_folder(tmp_path / "in", tmp_path / "one", workers=1, max_size=32, progress=False)
    monkeypatch.setattr(sources, "POOL_MIN_SECONDS", 0.0)  # use the pool even for a small folder
    two = prepare_image_folder(tmp_path / "in", tmp_path / "two", workers=2, max_size=32, progress=False)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    samples = [s for shard in two.shards
               for s in read_tar_samples(open(f"{two.root}/{shard.name}", "rb"), shard.name)]
    assert len(samples) == 51 and sorted(len(s) for s in samples)[0] == 4  # __key__, __url__, image, cls


def test_bad_flags_are_named(tmp_path):
    jpeg_folder(tmp_path / "in", {"a": 2})
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        prepare_image_folder(tmp_path / "in", tmp_path / "out", max_size=0)
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        prepare_image_folder(tmp_path / "in", tmp_path / "out", fmt="gif")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        prepare_image_folder(tmp_path / "empty", tmp_path / "x")
