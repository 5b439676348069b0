"""RotNet, the denoising autoencoder and the VAE: their seeded randomness, their losses against a
direct computation, and the pictures ``sslscale samples`` draws."""

from __future__ import annotations

import pytest
import torch

from sslscale.config import load_config
from sslscale.objectives import build_objective
from sslscale.objectives.autoencoders import patchify, unpatchify
from sslscale.objectives.rotnet import rotate, rotations
from tests.conftest import TINY

GRAY = [*TINY, "model.image_size=28", "model.num_channels=1", "data.mean=[0.3]", "data.std=[0.3]"]


def build(name: str, *extra: str):
    torch.manual_seed(0)
    return build_objective(load_config(None, [*GRAY, f"objective.name={name}", *extra]))


def images(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            "sample_seeds": torch.arange(n) * 7919 + 5}


def test_rotations_are_all_four_or_distinct_seeded_draws():
    seeds = torch.arange(64)
    assert rotations(seeds, 4).tolist() == [[0, 1, 2, 3]] * 64
    two = rotations(seeds, 2)
    assert torch.equal(two, rotations(seeds, 2)) and (two[:, 0] != two[:, 1]).all()
    assert set(two.flatten().tolist()) == {0, 1, 2, 3}  # every class is drawn
    with pytest.raises(ValueError, match="rotations_per_image=5"):
        rotations(seeds, 5)


def test_rotate_turns_each_image_by_its_own_quarter_turns():
    x = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).view(5, 3, 4, 4)
    turns = torch.tensor([1, 3, 0, 2, 1])
    turned = rotate(x, turns)
    for image, k in enumerate(turns.tolist()):
        assert torch.equal(turned[image], torch.rot90(x[image], k, dims=(1, 2)))


def test_rotnet_classifies_every_rotated_copy():
    objective = build("rotnet", "objective.rotations_per_image=4")
    out = objective(images())
    # 4 classes at init: the loss is near log 4 and is the cross-entropy of all 32 copies
    assert abs(out.loss.item() - torch.log(torch.tensor(4.0)).item()) < 0.5
    assert 0.0 <= out.metrics["rotation_accuracy"].item() <= 1.0
    out.loss.backward()
    assert objective.head.weight.grad.abs().sum() > 0
    assert objective.features(images()).shape == (8, 32)


def test_patchify_round_trips_and_orders_patches_row_major():
    x = torch.rand(2, 3, 28, 28)
    patches = patchify(x, 7)
    assert patches.shape == (2, 16, 147) and torch.equal(unpatchify(patches, 7, 3), x)
    assert torch.equal(patches[0, 1].view(7, 7, 3).permute(2, 0, 1), x[0, :, :7, 7:14])


@pytest.mark.parametrize("noise, level", [("masking", 0.5), ("gaussian", 0.2)])
def test_dae_corruption_is_seeded_and_of_the_asked_strength(noise, level):
    objective = build("dae", f"objective.noise={noise}", f"objective.noise_level={level}")
    clean = torch.full((64, 1, 28, 28), 0.5)
    seeds = torch.arange(64)
    corrupted = objective.corrupt(clean, seeds)
    assert torch.equal(corrupted, objective.corrupt(clean, seeds))
    assert not torch.equal(corrupted[0], corrupted[1])  # each sample its own noise
    if noise == "masking":
        assert abs((corrupted == 0).float().mean().item() - level) < 0.01
    else:
        assert abs((corrupted - clean).std().item() - level) < 0.01


def test_dae_loss_is_the_mse_to_the_clean_crop():
    objective = build("dae", "objective.noise=masking", "objective.noise_level=0.5")
    batch = images()
    out = objective(batch)
    seeds, clean = objective._clean(batch, augment=True)
    want = torch.nn.functional.mse_loss(objective._decode(objective.corrupt(clean, seeds)),
                                        patchify(clean, 7))
    torch.testing.assert_close(out.loss, want)
    rows = objective.reconstruct(batch)
    assert list(rows) == ["input", "corrupted", "reconstruction"]
    assert all(r.shape == (8, 1, 28, 28) and 0 <= r.min() and r.max() <= 1 for r in rows.values())


def test_vae_loss_is_the_negative_elbo_per_pixel_and_logs_its_terms():
    objective = build("vae", "objective.latent_dim=8", "objective.beta=2.0")
    batch = images()
    out = objective(batch)
    _, clean = objective._clean(batch, augment=True)
    mu, logvar = objective.encode(clean)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(out.metrics["kl_loss"], kl.mean())
    torch.testing.assert_close(out.loss, out.metrics["recon_loss"] + 2.0 * kl.mean() / 784)
    assert objective.features(batch).shape == (8, 8)
    torch.testing.assert_close(objective.features(batch), objective.encode(objective._clean(batch, False)[1])[0])
    drawn = objective.sample(6, seed=3)
    assert drawn.shape == (6, 1, 28, 28) and torch.equal(drawn, objective.sample(6, seed=3))


@pytest.mark.parametrize("key, value", [("latent_dim", 0), ("beta", -1.0)])
def test_vae_refuses_bad_keys(key, value):
    with pytest.raises(ValueError, match=f"objective.{key}"):
        build("vae", f"objective.{key}={value}")


def test_image_grid_lays_out_rows():
    from sslscale.samples import image_grid

    rows = [torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)]
    picture = image_grid(rows, scale=2)
    assert picture.size == (2 * (3 * 6 - 2), 2 * (2 * 6 - 2)) and picture.mode == "L"
    assert picture.getpixel((0, 0)) == 0 and picture.getpixel((0, picture.height - 1)) == 255
