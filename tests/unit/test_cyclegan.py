"""cyclegan (sslscale.objectives.cyclegan): the losses against their formulas, the networks'
shapes, which networks each loss reaches, the translation grid; the two unpaired domain streams
(sslscale.data.domains): each keeps its classes, they are drawn independently, and a restart
from saved positions continues both exactly."""

import itertools

import pytest
import torch
from omegaconf import OmegaConf

from sslscale.objectives.cyclegan import (CycleGAN, PatchViTDiscriminator, ResNetGenerator, cycle_loss,
                                          lsgan_discriminator_loss, lsgan_generator_loss, patch_accuracies)


def cfg(**objective):
    return OmegaConf.create({
        "model": {"image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                  "attn_implementation": "eager"},
        "objective": {"name": "cyclegan", "domain_a_classes": [7], "domain_b_classes": [9],
                      "adversarial_loss": "lsgan", "lambda_cyc": 10.0, "lambda_id": 0.5,
                      "generator_width": 4, "generator_blocks": 1, "d_steps_per_g": 1, "d_lr": 0.0,
                      "g_lr": 1e-4, "pooling": "mean", "image_every_steps": 10, "image_grid_size": 3,
                      **objective}})


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            "pixel_values_b": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)}


def test_losses_match_their_formulas():
    real, fake = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 2.0]])
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.125 + 2.0))
    assert lsgan_generator_loss(fake).item() == pytest.approx((1.0 + 1.0) / 2)
    assert lsgan_discriminator_loss(torch.ones(3), torch.zeros(3)).item() == 0.0  # the optimum
    x = torch.zeros(2, 1, 4, 4)
    assert cycle_loss(x, x + 0.25).item() == pytest.approx(0.25)
    real_acc, fake_acc = patch_accuracies(real, fake, 0.5)
    assert real_acc.item() == 0.5 and fake_acc.item() == 0.5


def test_network_shapes():
    g = ResNetGenerator(channels=1, width=4, blocks=2, image_size=28)
    out = g(torch.rand(3, 1, 28, 28) * 2 - 1)
    assert out.shape == (3, 1, 28, 28) and out.min() >= -1 and out.max() <= 1
    assert not any(True for _ in g.buffers())  # instance norm without running statistics
    with pytest.raises(ValueError, match="multiple of 4"):
        ResNetGenerator(1, 4, 1, 30)
    d = PatchViTDiscriminator(cfg())
    x = torch.rand(3, 1, 28, 28)
    assert d(x).shape == (3, 16) and d(x).dtype == torch.float32  # one output per 7x7 patch
    assert d.pooled(x).shape == (3, 32)


def _reached(objective, loss) -> set[str]:
    objective.zero_grad(set_to_none=True)
    loss.backward()
    return {f"{net}.{name}" for net, group in objective.networks().items() for name, m in group.items()
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())}


@pytest.mark.parametrize("loss", ["lsgan", "nonsaturating"])
def test_losses_reach_the_right_networks(loss):
    torch.manual_seed(0)
    objective = CycleGAN(cfg(adversarial_loss=loss))
    assert list(objective.networks()) == ["discriminator", "generator"]
    assert [p.network for p in objective.phases()] == ["discriminator", "generator"]
    assert objective.lr == {"discriminator": None, "generator": 1e-4}
    assert objective.lambda_id == 5.0  # 0.5 * lambda_cyc
    out = objective.discriminator_loss(batch())
    assert {"d_loss", "d_a_loss", "d_b_loss", "d_a_real_accuracy", "d_a_fake_accuracy",
            "d_b_real_accuracy", "d_b_fake_accuracy"} == set(out.metrics)
    assert out.loss.item() == pytest.approx((out.metrics["d_a_loss"] + out.metrics["d_b_loss"]).item())
    assert _reached(objective, out.loss) == {"discriminator.a", "discriminator.b"}  # fakes detached
    out = objective.generator_loss(batch())
    m = out.metrics
    assert set(m) == {"g_loss", "g_adv_loss", "cycle_loss", "identity_loss"}
    want = m["g_adv_loss"] + 10.0 * m["cycle_loss"] + 5.0 * m["identity_loss"]
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    # both generators; the discriminators too (the trainer freezes them: EngineSet.only)
    assert {"generator.a_to_b", "generator.b_to_a"} <= _reached(objective, out.loss)
    assert objective.features(batch()).shape == (4, 32)
    assert objective.encoder() is objective.discriminator["a"].backbone


def test_identity_loss_off_and_bad_configs():
    out = CycleGAN(cfg(lambda_id=0.0)).generator_loss(batch())
    assert "identity_loss" not in out.metrics
    with pytest.raises(ValueError, match="adversarial_loss"):
        CycleGAN(cfg(adversarial_loss="wgan"))
    with pytest.raises(ValueError, match="disjoint"):
        CycleGAN(cfg(domain_b_classes=[7, 9]))


def test_translation_grid_png(tmp_path):
    from PIL import Image

    objective = CycleGAN(cfg())
    rows = objective.translate(batch())
    assert list(rows) == ["a", "G(a)", "F(G(a))", "b", "F(b)", "G(F(b))"]
    assert all(r.shape == (3, 1, 28, 28) and 0 <= r.min() and r.max() <= 1 for r in rows.values())
    assert torch.allclose(rows["a"], batch()["pixel_values"][:3].float() / 255)
    out = objective.write_images(batch(), tmp_path / "images" / "grid.png")
    assert Image.open(out).size == (2 * (3 * 30 - 2), 2 * (6 * 30 - 2))  # 2x upscaled, 2-pixel gaps


def _domain_stream(real_shards, positions=None, seed=0):
    from sslscale.data.domains import TwoDomainStream
    from sslscale.data.shards import load_manifest
    from sslscale.data.stream import ImageDecoder

    manifest = load_manifest(real_shards["train"])
    return TwoDomainStream(manifest, decode=ImageDecoder(28, 1), label_key="cls", classes_a=[7],
                           classes_b=[9, 5], num_streams=4, seed=seed, positions=positions, rank=0,
                           world_size=1, num_workers=1, batch_size=8, shuffle_buffer=64)


def test_two_domain_stream_is_unpaired_and_resumes_exactly(real_shards):
    batches = list(itertools.islice(iter(_domain_stream(real_shards)), 5))
    for b in batches:
        assert b["pixel_values"].shape == b["pixel_values_b"].shape == (8, 1, 28, 28)
        assert set(b["labels"].tolist()) == {7} and set(b["labels_b"].tolist()) <= {5, 9}
        assert sorted(b["stream_positions"][:, 0].tolist()) == list(range(8))  # A's 0-3, B's 4-7
    # independent draws: B's sample seeds are not A's
    assert not set(batches[0]["sample_seeds"].tolist()) & set(batches[0]["sample_seeds_b"].tolist())
    positions = [0] * 8
    for stream, k in batches[2]["stream_positions"].tolist():
        positions[stream] = k
    again = list(itertools.islice(iter(_domain_stream(real_shards, positions)), 2))
    for want, got in zip(batches[3:], again):
        for key in ("pixel_values", "pixel_values_b", "sample_seeds", "sample_seeds_b"):
            assert torch.equal(want[key], got[key])
    with pytest.raises(ValueError, match="need 8"):
        _domain_stream(real_shards, [0] * 4)


def test_class_lists_are_checked_against_the_manifest(real_shards):
    from sslscale.data.domains import check_classes
    from sslscale.data.shards import load_manifest

    manifest = load_manifest(real_shards["train"])
    check_classes(manifest, "objective.domain_a_classes", [0, 9])
    with pytest.raises(ValueError, match="objective.domain_b_classes"):
        check_classes(manifest, "objective.domain_b_classes", [10])
    with pytest.raises(ValueError, match="empty"):
        check_classes(manifest, "objective.domain_b_classes", [])
