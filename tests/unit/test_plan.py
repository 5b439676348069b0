"""The stream plan and the reader over real tar shards: every sample once per epoch (the rest
carried, counted), equal batches per rank, exact resume on the same or another world size."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from sslscale.data.plan import Epochs, PlanError, check_streams, describe, epoch_order, locate, stream_shards
from sslscale.data.shards import ShardWriter
from sslscale.data.stream import DataStats, ImageDecoder, TrainStream, train_loader

PNG = io.BytesIO()
Image.fromarray(np.zeros((2, 2), np.uint8)).save(PNG, format="PNG")


def write_shards(root, counts):
    """Shards with the given sample counts; sample i carries label i (its identity)."""
    writer, i = ShardWriter(root, samples_per_shard=10**9), 0
    for n in counts:
        writer._open_next()
        for _ in range(n):
            writer.write({"__key__": f"{i:06d}", "png": PNG.getvalue(), "cls": i})
            i += 1
    return writer.close("test", "none")


def stream(manifest, world, workers, rank, v, **kw):
    return TrainStream(manifest, rank=rank, world_size=world, num_workers=workers, batch_size=kw.pop("b", 3),
                       decode=ImageDecoder(2, 1), seed=kw.pop("seed", 0),
                       shuffle_buffer=kw.pop("block", 4), num_streams=v, **kw)


def take_labels(ts, worker, n, stats=None):
    examples = ts._examples(worker, stats or DataStats(strict=True))
    return [int(next(examples)[0]["labels"]) for _ in range(n)]


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 7), min_size=1, max_size=8), world=st.integers(1, 4),
       workers=st.integers(0, 2), seed=st.integers(0, 100), block=st.integers(1, 5), data=st.data())
def test_one_epoch_every_sample_once_and_equal_per_rank(tmp_path_factory, counts, world, workers,
                                                        seed, block, data):
    slots = world * max(workers, 1)
    if len(counts) < slots:
        with pytest.raises(PlanError):
            check_streams(len(counts), slots, world, workers)
        return
    v = slots * data.draw(st.integers(1, len(counts) // slots))
    manifest = write_shards(tmp_path_factory.mktemp("s"), counts)
    plan = Epochs(tuple(counts), v, seed)
    per_slot = plan.cut(0) * (v // slots)
    seen, per_rank = [], []
    for r in range(world):
        ts = stream(manifest, world, workers, r, v, seed=seed, block=block)
        got = [y for w in range(max(workers, 1)) for y in take_labels(ts, w, per_slot)]
        per_rank.append(len(got))
        seen += got
    assert len(seen) == len(set(seen))  # nothing twice in the epoch
    assert len(seen) + plan.carried(0) == sum(counts)  # the rest is carried, and counted
    assert len(set(per_rank)) == 1  # every rank the same number of samples (hence batches)


def test_carry_is_read_first_next_epoch(tmp_path):
    counts = [5, 2]  # one shard per stream: 3 samples of the bigger shard do not fit epoch 0
    manifest = write_shards(tmp_path, counts)
    plan = Epochs(tuple(counts), 2, 0)
    assert plan.cut(0) == 2 and plan.carried(0) == 3
    labels = take_labels(stream(manifest, 1, 0, 0, 2), 0, 10)
    epoch0 = labels[:4]
    carried = set(range(5)) - set(epoch0)  # the big shard holds samples 0..4
    assert len(set(epoch0)) == 4 and len(carried) == 3
    assert carried <= set(labels[4:10])  # read first in epoch 1 (interleaved with stream 1)


def test_locate_walks_epochs():
    counts = [3, 4]
    s0 = stream_shards(2, 1, 0, 0, 0)
    assert locate(counts, 1, 0, 0, 0) == (0, 0, 0)
    assert locate(counts, 1, 0, 0, counts[s0[0]]) == (0, 1, 0)
    assert locate(counts, 1, 0, 0, 7) == (1, 0, 0)


def test_epoch_order_is_seeded_and_changes_per_epoch():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)


def test_bad_stream_counts_say_what_works():
    with pytest.raises(PlanError, match=r"use data.num_streams in \[3, 6\]"):
        check_streams(6, 4, 3, 1)
    with pytest.raises(PlanError, match="exceeds the 4 shard"):
        check_streams(4, 8, 1, 1)
    plan = describe([10] * 8, num_streams=8, world_size=2, num_workers=2, micro_batch_size=4)
    assert plan["streams_per_rank"] == {0: [0, 4, 1, 5], 1: [2, 6, 3, 7]}  # slot = rank x workers + worker
    assert plan["epochs"][0]["samples_per_rank"] == 40 and plan["epochs"][0]["micro_batches_per_rank"] == 10


def consume(loaders, n):
    """n batches from each rank's loader, tracking positions like the trainer."""
    positions, labels = {}, []
    for it in loaders:
        for _ in range(n):
            batch = next(it)
            positions.update(dict(batch["stream_positions"].tolist()))
            labels.append(batch["labels"].tolist())
    return positions, labels


@pytest.mark.parametrize("new_world", [1, 4])
def test_resume_on_another_world_size_finishes_the_epoch_exactly(tmp_path, new_world):
    counts = [6] * 8
    manifest = write_shards(tmp_path, counts)
    v, b = 8, 3
    loaders = [iter(train_loader(stream(manifest, 2, 2, r, v, b=b))) for r in range(2)]
    positions, labels = consume(loaders, 3)  # 3 batches per rank, through 2 real workers each
    first = [y for batch in labels for y in batch]
    cut = Epochs(tuple(counts), v, 0).cut(0)
    rest = []
    for r in range(new_world):
        ts = stream(manifest, new_world, 0, r, v, b=b, positions=[positions[s] for s in range(v)])
        rest += take_labels(ts, 0, sum(cut - positions[s] for s in range(r, v, new_world)))
    assert sorted(first + rest) == list(range(sum(counts)))


def test_resume_same_world_size_gives_identical_batches(tmp_path):
    manifest = write_shards(tmp_path, [7, 5, 6, 6, 4, 7, 6, 5])
    make = lambda r, **kw: iter(train_loader(stream(manifest, 2, 2, r, 8, b=3, **kw)))  # noqa: E731
    _, uninterrupted = consume([make(0)], 9)
    positions, _ = consume([make(0), make(1)], 5)  # stop after 5 batches per rank (odd: phase 1)
    resumed_positions = [positions[s] for s in range(8)]
    _, after = consume([make(0, positions=resumed_positions, phase=5)], 4)
    assert after == uninterrupted[5:9]
    assert torch.tensor(after).numel() == 12
