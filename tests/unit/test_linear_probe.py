"""Linear probing (sslscale.linear_probe): the classifier, its determinism and errors, and the
same result on 2 ranks as on 1 (real Fashion-MNIST / MNIST shards, a real ViT encoder)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from launcher.env import free_port
from sslscale.linear_probe import train_linear_probe

from ..conftest import TINY, end_spawned_rank


def clusters(n: int, seed: int, dims: int = 16, classes: int = 4, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dims, generator=torch.Generator().manual_seed(123)) * 3 + 10
    labels = torch.arange(n) % classes
    return centers[labels] + spread * torch.randn(n, dims, generator=g), labels


def test_separable_classes_are_learned_deterministically_without_touching_the_global_rng():
    xtr, ytr = clusters(512, 0)
    xte, yte = clusters(256, 1)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = train_linear_probe(xtr, ytr, xte, yte, epochs=20, batch_size=64)
    assert torch.equal(torch.get_rng_state(), before)
    assert first["linear_top1"] > 0.97 and first["num_classes"] == 4
    assert first == train_linear_probe(xtr, ytr, xte, yte, epochs=20, batch_size=64)
    # the BatchNorm standardizes: the same problem shifted and scaled is learned the same way
    scaled = train_linear_probe(xtr * 1e3 - 5e3, ytr, xte * 1e3 - 5e3, yte, epochs=20, batch_size=64)
    assert scaled["linear_top1"] > 0.97


def test_random_labels_are_not_learned_on_held_out_data():
    xtr, _ = clusters(512, 0)
    xte, _ = clusters(512, 1)
    g = torch.Generator().manual_seed(0)
    result = train_linear_probe(xtr, torch.randint(0, 4, (512,), generator=g), xte,
                                torch.randint(0, 4, (512,), generator=g), epochs=20)
    assert result["linear_top1"] < 0.4  # chance is 0.25


@pytest.mark.parametrize("bad, match", [
    (dict(train_labels=-torch.ones(8, dtype=torch.long)), "labels must be >= 0"),
    (dict(test_features=torch.zeros(8, 5)), "16 dims, test features 5"),
    (dict(train_features=torch.full((8, 16), float("nan"))), "not all finite"),
    (dict(train_features=torch.zeros(0, 16), train_labels=torch.zeros(0, dtype=torch.long)), "N >= 1"),
    (dict(epochs=0), "must be positive"),
])
def test_bad_inputs_are_refused(bad, match):
    x, y = clusters(8, 0)
    args = {**dict(train_features=x, train_labels=y, test_features=x, test_labels=y), **bad}
    with pytest.raises(ValueError, match=match):
        train_linear_probe(**args)


def _probe_on_ranks(rank: int, world_size: int, port: int, shards: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from sslscale.config import load_config
    from sslscale.data.shards import load_manifest
    from sslscale.linear_probe import features_of
    from sslscale.objectives import build_objective

    cfg = load_config(None, [*TINY, "model.image_size=28", "model.num_channels=1",
                             "data.mean=[0.3]", "data.std=[0.35]"])
    torch.manual_seed(0)
    objective = build_objective(cfg)  # the same random-init encoder on every rank
    features = features_of(objective, load_manifest(shards["train"]), load_manifest(shards["test"]),
                           device=torch.device("cpu"), rank=rank, world_size=world_size,
                           image_size=28, num_channels=1, batch_size=64,
                           max_train_samples=512, max_test_samples=256)
    result = train_linear_probe(**features, epochs=10)
    torch.save({"features": features, "result": result}, f"{out}-{world_size}-{rank}.pt")
    torch.distributed.barrier()
    end_spawned_rank()


def test_two_ranks_give_the_result_of_one(real_shards, tmp_path):
    out = str(tmp_path / "probe")
    for world_size in (1, 2):
        mp.spawn(_probe_on_ranks, args=(world_size, free_port(), real_shards, out),
                 nprocs=world_size, join=True)
    one = torch.load(f"{out}-1-0.pt")
    for rank in (0, 1):
        two = torch.load(f"{out}-2-{rank}.pt")
        for key, value in one["features"].items():  # every rank holds all, in manifest order
            torch.testing.assert_close(two["features"][key], value, rtol=1e-5, atol=1e-5)
        assert two["result"]["linear_top1"] == one["result"]["linear_top1"]
        assert two["result"]["num_train"] == 512
        assert two["result"]["num_test"] == one["result"]["num_test"] == len(one["features"]["test_labels"])
    assert one["result"]["linear_top1"] > 0.3, one["result"]  # 3x chance: a random ViT carries signal
