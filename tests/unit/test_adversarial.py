"""gan / bigan (sslscale.objectives.adversarial): the losses against their formulas, R1, the
networks and phases the trainer alternates, which parameters each loss reaches, and the
several-engines wrapper's freezing (sslscale.engine_set)."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from sslscale.objectives.adversarial import (BiGAN, DCGANGenerator, GAN, accuracies, discriminator_loss,
                                             generator_loss, r1_penalty)


def cfg(name="gan", **objective):
    return OmegaConf.create({
        "model": {"image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                  "attn_implementation": "eager"},
        "objective": {"name": name, "crop_scale": [1.0, 1.0], "hflip": True, "latent_dim": 8,
                      "generator_width": 8, "d_steps_per_g": 2, "d_lr": 1e-4, "g_lr": 0.0,
                      "r1_gamma": 0.0, "diff_augment": False, "pooling": "mean", **objective},
        "data": {"mean": [0.5], "std": [0.25]}})


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            "sample_seeds": torch.arange(n, dtype=torch.int64) + 100}


def test_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    want_d = -(torch.log(sig(real))).mean() - torch.log(1 - sig(fake)).mean()
    assert discriminator_loss(real, fake).item() == pytest.approx(want_d.item(), rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(-torch.log(sig(fake)).mean().item(), rel=1e-6)
    acc = accuracies(real, fake)
    assert acc["d_real_accuracy"].item() == 0.5 and acc["d_fake_accuracy"].item() == 0.5
    # at D = 1/2 everywhere the discriminator's loss is 2 log 2 (Goodfellow et al., Theorem 1)
    assert discriminator_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))


def test_r1_penalty_is_the_squared_input_gradient():
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5)
    penalty = r1_penalty((x * w).sum(dim=1) ** 2 / 2, x)  # grad = (x . w) w
    want = (((x * w).sum(dim=1, keepdim=True) * w) ** 2).sum(dim=1).mean()
    assert penalty.item() == pytest.approx(want.item(), rel=1e-5)
    penalty.backward()  # differentiable: it trains the discriminator
    assert x.grad is not None


def test_generator_shapes_and_range():
    g = DCGANGenerator(latent_dim=8, width=4, channels=1, image_size=28)
    images = g(torch.randn(5, 8))
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert not any(True for _ in g.buffers())  # no running statistics to keep per rank
    with pytest.raises(ValueError, match="multiple of 4"):
        DCGANGenerator(8, 4, 1, 30)


def _reached(objective, loss) -> set[str]:
    objective.zero_grad(set_to_none=True)
    loss.backward()
    return {name for name, net in objective.networks().items()
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())}


@pytest.mark.parametrize("cls,name", [(GAN, "gan"), (BiGAN, "bigan")])
def test_phases_and_the_networks_each_loss_reaches(cls, name):
    torch.manual_seed(0)
    objective = cls(cfg(name))
    assert list(objective.networks()) == ["discriminator", "generator"]
    phases = objective.phases()
    assert [p.network for p in phases] == ["discriminator", "discriminator", "generator"]
    assert [p.reads_data for p in phases] == [True, True, False]
    assert [p.logs_loss for p in phases] == [False, False, True]
    assert objective.lr == {"discriminator": 1e-4, "generator": None}  # 0: optim.lr
    out = objective.discriminator_loss(batch())
    assert set(out.metrics) == {"d_loss", "d_real_accuracy", "d_fake_accuracy"}
    assert _reached(objective, out.loss) == {"discriminator"}  # fakes (and E(x)) are detached
    out = objective.generator_loss(batch())
    assert set(out.metrics) == {"g_loss"} and torch.isfinite(out.loss)
    # through the discriminator: the trainer freezes it while the generator steps (EngineSet.only)
    assert "generator" in _reached(objective, out.loss)
    if name == "bigan":  # E is trained by the generator's step
        assert objective.generator.encoder.to_latent.weight.grad is not None
    assert objective.features(batch()).shape == (4, 32)
    assert objective.sample(3, seed=1).shape == (3, 1, 28, 28)
    assert torch.equal(objective.sample(3, seed=1), objective.sample(3, seed=1))


def test_r1_adds_to_the_discriminators_loss():
    torch.manual_seed(0)
    plain = GAN(cfg())
    torch.manual_seed(0)
    with_r1 = GAN(cfg(r1_gamma=10.0))
    a, b = plain.discriminator_loss(batch()), with_r1.discriminator_loss(batch())
    assert "r1_penalty" in b.metrics and b.metrics["r1_penalty"] > 0
    assert b.loss.item() == pytest.approx(a.loss.item() + 5.0 * b.metrics["r1_penalty"].item(), rel=1e-4)
    assert _reached(with_r1, b.loss) == {"discriminator"}


def test_engine_set_only_freezes_the_other_networks():
    from sslscale.engine_set import EngineSet

    objective = GAN(cfg())

    class FakeEngine:
        def __init__(self, module):
            self.module, self.precision, self.ds_config = module, "fp32", {}

    engines = EngineSet({n: FakeEngine(m) for n, m in objective.networks().items()}, objective, {})
    assert engines.main() == "generator" and engines.module is objective and engines.ds is engines
    with engines.only("generator"):
        assert not any(p.requires_grad for p in objective.discriminator.parameters())
        assert all(p.requires_grad for p in objective.generator.parameters())
        out = objective.generator_loss(batch())
        assert _reached(objective, out.loss) == {"generator"}
    assert all(p.requires_grad for p in objective.parameters())


def test_diff_augment_crops_the_generated_images_differentiably():
    torch.manual_seed(0)
    objective = GAN(cfg(diff_augment=True, crop_scale=[0.35, 1.0]))
    seeds = batch()["sample_seeds"]
    z = objective._latents(seeds, 0)
    plain, cropped = objective._generate(z), objective._fake(z, seeds)
    assert cropped.shape == plain.shape and not torch.allclose(cropped, plain)
    objective.eval()  # evaluation and sampling: no augmentation
    assert torch.equal(objective._fake(z, seeds), plain)
    objective.train()
    out = objective.generator_loss(batch())
    assert _reached(objective, out.loss) >= {"generator"}  # through the crop (grid sampling)


def test_bigan_with_a_convolutional_discriminator():
    from sslscale.objectives.adversarial import ConvImages

    torch.manual_seed(0)
    objective = BiGAN(cfg("bigan", discriminator="dcgan", r1_gamma=1.0))
    assert isinstance(objective.discriminator.images, ConvImages)
    assert ConvImages(1, 32, 28)(torch.rand(3, 1, 28, 28)).shape == (3, 32)
    out = objective.discriminator_loss(batch())
    assert out.metrics["r1_penalty"] > 0 and _reached(objective, out.loss) == {"discriminator"}
    out = objective.generator_loss(batch())
    assert "generator" in _reached(objective, out.loss)
    assert objective.generator.encoder.to_latent.weight.grad is not None  # E learns through D
    assert objective.features(batch()).shape == (4, 32)
    with pytest.raises(ValueError, match="objective.discriminator"):
        BiGAN(cfg("bigan", discriminator="mlp"))


def test_bigan_unary_scores_give_the_encoder_its_own_signal():
    from sslscale.objectives.adversarial import scores_loss

    real, fake = torch.tensor([[2.0, 0.5], [-1.0, 1.0]]), torch.tensor([[0.5, 0.0], [-3.0, 2.0]])
    want = discriminator_loss(real[:, 0], fake[:, 0]) + discriminator_loss(real[:, 1], fake[:, 1])
    assert scores_loss(real, fake).item() == pytest.approx(want.item(), rel=1e-6)
    torch.manual_seed(0)
    objective = BiGAN(cfg("bigan", unary_scores=True))
    z = torch.randn(4, 8)
    assert objective.discriminator(objective._generate(z), z).shape == (4, 3)  # s_xz, s_x, s_z
    out = objective.discriminator_loss(batch())
    assert _reached(objective, out.loss) == {"discriminator"}
    # the joint score silenced, E still learns: through s_z of (x, E(x)) (BigBiGAN's unary term)
    for net in (BiGAN(cfg("bigan")), objective):
        torch.nn.init.zeros_(net.discriminator.joint[-1].weight)
        net.zero_grad(set_to_none=True)
        net.generator_loss(batch()).loss.backward()
        grad = net.generator.encoder.to_latent.weight.grad
        reached = grad is not None and grad.abs().sum() > 0
        assert reached == (net is objective)


def test_bigan_reconstruction_trains_the_encoder_on_real_images():
    from sslscale.objectives.adversarial import reconstruction_loss

    x = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    assert reconstruction_loss(x + torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]]), x).item() == pytest.approx(2.5)
    torch.manual_seed(0)
    plain = BiGAN(cfg("bigan"))
    torch.manual_seed(0)
    objective = BiGAN(cfg("bigan", reconstruction_weight=3.0))
    a, b = plain.generator_loss(batch()), objective.generator_loss(batch())
    reconstruction = b.metrics["reconstruction_loss"]
    assert reconstruction > 0 and "reconstruction_loss" not in a.metrics
    assert b.loss.item() == pytest.approx(a.loss.item() + 3.0 * reconstruction.item(), rel=1e-5)
    assert b.metrics["g_loss"].item() == pytest.approx(a.loss.item(), rel=1e-6)  # the adversarial part
    # G(E(x)) against x: without the discriminator E and G still learn
    torch.nn.init.zeros_(objective.discriminator.joint[-1].weight)
    objective.zero_grad(set_to_none=True)
    objective.generator_loss(batch()).loss.backward()
    assert objective.generator.encoder.to_latent.weight.grad.abs().sum() > 0
    assert objective.generator.generator.project.weight.grad.abs().sum() > 0
