import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sslscale.data.plan import PlanError
from sslscale.data.shards import ShardWriter, load_manifest
from sslscale.data.sources import prepare, read_idx, FASHION_MNIST_DIR
from sslscale.data.stream import ImageDecoder, TrainStream, eval_batches, train_loader

# Small folders with an explicit --samples-per-shard: prepare warns that 8 streams need more shards.
pytestmark = pytest.mark.filterwarnings("ignore:.*shard\\(s\\) but the default data.num_streams")


@pytest.fixture
def image_folder(tmp_path):
    """10 RGB images in two class folders (3 and 7 images), sizes differ."""
    rng = np.random.default_rng(0)
    for cls, n in [("cat", 3), ("dog", 7)]:
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


def test_writer_manifest_counts_and_hashes(image_folder, tmp_path):
    manifest = prepare("image-folder", tmp_path / "out", input_dir=str(image_folder), samples_per_shard=4)
    assert [s.num_samples for s in manifest.shards] == [4, 4, 2]
    loaded = load_manifest(tmp_path / "out")
    assert loaded.num_samples == 10 and loaded.meta["classes"] == ["cat", "dog"]
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["num_samples"] == 10 and raw["num_shards"] == 3
    for shard in loaded.shards:
        data = (tmp_path / "out" / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.size
        assert b"PaxHeader" not in data  # an integer mtime: no pax header per member
        assert (tmp_path / "out" / (shard.name + ".idx")).stat().st_size == 24 + 8 * shard.num_samples


def test_eval_reader_returns_every_sample_once_in_order(image_folder, tmp_path):
    manifest = prepare("image-folder", tmp_path / "out", input_dir=str(image_folder), samples_per_shard=3)
    labels = [int(y) for b in eval_batches(manifest, rank=0, world_size=1, batch_size=4,
                                           decode=ImageDecoder(16, 3)) for y in b["labels"]]
    assert sorted(labels) == [0] * 3 + [1] * 7 and labels != sorted(labels)  # written shuffled
    shares = [[int(y) for b in eval_batches(manifest, rank=r, world_size=3, batch_size=2,
                                            decode=ImageDecoder(16, 3)) for y in b["labels"]]
              for r in range(3)]
    assert sum(len(s) for s in shares) == 10 and len(shares[0]) == 4


def test_png_round_trip_is_lossless_on_real_fashion_mnist(tmp_path):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    manifest = prepare("fashion-mnist", tmp_path / "fm", split="test", samples_per_shard=40, limit=100)
    assert [s.num_samples for s in manifest.shards] == [40, 40, 20]
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:100]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:100]
    batches = list(eval_batches(manifest, rank=0, world_size=1, batch_size=64, decode=ImageDecoder(28, 1)))
    pixels = np.concatenate([b["pixel_values"].numpy() for b in batches])
    assert pixels.shape == (100, 1, 28, 28)
    np.testing.assert_array_equal(pixels[:, 0], images)
    np.testing.assert_array_equal(np.concatenate([b["labels"].numpy() for b in batches]), labels)


def test_train_stream_batches_and_epochs(image_folder, tmp_path):
    manifest = prepare("image-folder", tmp_path / "out", input_dir=str(image_folder), samples_per_shard=2)
    stream = TrainStream(manifest, rank=0, world_size=1, num_workers=0, batch_size=4,
                         decode=ImageDecoder(16, 3), seed=0, shuffle_buffer=8, num_streams=5)
    it = iter(train_loader(stream))
    batches = [next(it) for _ in range(5)]  # 20 samples = two epochs of 10 (5 equal shards)
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    assert sorted(labels[:10]) == [0] * 3 + [1] * 7 and sorted(labels[10:]) == [0] * 3 + [1] * 7
    assert batches[-1]["stream_positions"].tolist() == [[s, 4] for s in range(5)]


def test_streams_that_cannot_be_dealt_are_an_error_not_a_hang(image_folder, tmp_path):
    manifest = prepare("image-folder", tmp_path / "out", input_dir=str(image_folder), samples_per_shard=5)
    with pytest.raises(PlanError, match=r"data.num_streams=2 cannot be dealt evenly to 2 rank\(s\) x 2"):
        TrainStream(manifest, rank=0, world_size=2, num_workers=2, batch_size=2,
                    decode=ImageDecoder(8, 1), seed=0, shuffle_buffer=1, num_streams=2)


def test_missing_manifest_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_manifest(tmp_path / "nothing")


def test_writer_rejects_sample_without_key(tmp_path):
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match="__key__"):
        writer.write({"png": b""})
