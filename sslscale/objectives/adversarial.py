"""Adversarial pretraining with several networks: ``gan`` and ``bigan``.

- ``gan``: Goodfellow et al., "Generative Adversarial Nets" (NeurIPS 2014, arXiv 1406.2661),
  with the non-saturating generator loss (their section 3) and a DCGAN-style generator (Radford,
  Metz & Chintala, ICLR 2016, arXiv 1511.06434: project and reshape, fractionally-strided
  convolutions, BatchNorm + ReLU, tanh output). The discriminator is a ViT (transformers'
  ``ViTModel``) with a linear real/fake head on its pooled tokens; as in DCGAN's section 5.1,
  the discriminator's features (the pooled tokens, before the head) are the representation,
  and its ``ViTModel`` is the exported encoder.
- ``bigan``: Donahue, Kraehenbuehl & Darrell, "Adversarial Feature Learning" (ICLR 2017, arXiv
  1605.09782). An encoder E (a ``ViTModel`` + a linear layer to the latent) is trained jointly
  with the generator G against a discriminator on pairs: (x, E(x)) for real images against
  (G(z), z). The discriminator sees x through its own ViT and z through a linear layer; a small
  MLP on both gives the logit. E's ``ViTModel`` is exported and its pooled tokens are the kNN
  features. G and E minimise the same (label-swapped, non-saturating) loss with one step, so
  they are one network here (``generator``: ``.generator`` and ``.encoder``) with one optimizer.
  Two additions give E a signal of its own: ``objective.reconstruction_weight`` adds ALICE's
  cycle consistency in image space, ``||G(E(x)) - x||^2`` on real images, to G and E's loss
  (Li et al., "ALICE: Towards Understanding Adversarial Learning for Joint Distribution
  Matching", NeurIPS 2017, arXiv 1709.01215); ``objective.unary_scores`` adds BigBiGAN's unary
  scores of x alone and z alone beside the joint one, the three losses summed (Donahue &
  Simonyan, "Large Scale Adversarial Representation Learning", NeurIPS 2019, arXiv 1907.02544).

Optional R1 penalty (Mescheder, Geiger & Nowozin, "Which Training Methods for GANs do actually
Converge?", ICML 2018, arXiv 1801.04406): ``objective.r1_gamma / 2 * E ||grad_x D(x)||^2`` on
real images, added to the discriminator's loss.

With ``objective.diff_augment``, the real images' random crop and flip (``crop_scale``,
``hflip``) is applied to the generated images too, differentiably (grid sampling), in both
steps: DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training",
NeurIPS 2020, arXiv 2006.10738), so the discriminator cannot tell fakes by the augmentation
alone and the generator is not pushed to draw crops.

Several networks: ``networks()`` names the submodules that get a DeepSpeed engine each (own
optimizer, own peak lr: ``objective.d_lr`` / ``objective.g_lr``); ``phases()`` lists the
optimizer steps of one trainer step: ``objective.d_steps_per_g`` discriminator steps, each on
fresh real micro-batches, then one generator step on the micro-batches the last discriminator
step read (``sslscale.trainer``). The latents are drawn from the samples' seeds, with one tag
for the discriminator's steps and another for the generator's.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel

from sslscale.config_schema import BiGANConfig, GANConfig
from sslscale.data.augment import LATENT, ViewAugment, ViewConfig, normal, random_seeds
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.registry import OBJECTIVES

D_LATENT, G_LATENT = LATENT + 300, LATENT + 301  # the latents' tags (discriminator / generator steps)
FAKE_SEED_FLIP = 1 << 40  # diff_augment: the generated images' crops and flips use seed XOR this


class Phase(NamedTuple):
    """One optimizer step of a trainer step: ``network`` (a key of ``networks()``) steps on
    ``loss(batch) -> ObjectiveOutput``; ``reads_data``: False reuses the micro-batches the phase
    before read; ``logs_loss``: its loss is ``train/loss``."""
    network: str
    loss: Callable[[dict], ObjectiveOutput]
    reads_data: bool
    logs_loss: bool


# ------------------------------------------------------------------------------------- losses
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``-log D(x) - log(1 - D(G(z)))``, meaned: logits ``(B,)`` each (fp32 scalar)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``-log D(G(z))``, meaned over ``(B,)`` logits."""
    return F.softplus(-fake_logits).mean()


def scores_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """``discriminator_loss`` of each column of scores ``(B, K)`` (BigBiGAN: the joint and the
    two unary scores), summed over the K columns, as Donahue & Simonyan (2019, eq. 3) sum them."""
    return sum(discriminator_loss(real_scores[:, k], fake_scores[:, k]) for k in range(real_scores.shape[1]))


def reconstruction_loss(reconstructed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ALICE's cycle consistency in image space (Li et al., "ALICE: Towards Understanding
    Adversarial Learning for Joint Distribution Matching", NeurIPS 2017, arXiv 1709.01215,
    section 3.2): the mean squared error of ``G(E(x))`` against ``x``, both normalized images
    ``(B, C, S, S)`` (units of the data's std), fp32 scalar; it trains E and G."""
    return F.mse_loss(reconstructed.float(), real.float())


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` over the batch (``real_inputs`` ``(B, ...)`` must require grad);
    differentiable (``create_graph``) so that it trains the discriminator."""
    grad, = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


def accuracies(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The discriminator's accuracy on real (logit > 0) and on fake (logit < 0) inputs."""
    return {"d_real_accuracy": (real_logits.detach() > 0).float().mean(),
            "d_fake_accuracy": (fake_logits.detach() < 0).float().mean()}


# ------------------------------------------------------------------------------------ networks
def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """Latents ``(B, latent_dim)`` -> images ``(B, C, S, S)`` in [0, 1]: a linear projection to
    ``2 * width`` maps of ``S/4 x S/4``, then two fractionally-strided 4x4 convolutions (stride 2)
    with BatchNorm + ReLU before each, tanh at the end. BatchNorm always uses the batch's
    statistics (no running buffers: nothing per rank to checkpoint). ``ValueError`` unless S is
    a multiple of 4."""

    def __init__(self, latent_dim: int, width: int, channels: int, image_size: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"model.image_size={image_size} must be a multiple of 4 for the generator")
        self.start, self.width = image_size // 4, width
        self.project = nn.Linear(latent_dim, 2 * width * self.start ** 2, bias=False)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width, track_running_stats=False), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width, track_running_stats=False), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1), nn.Tanh())
        _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z.to(self.project.weight.dtype)).view(len(z), 2 * self.width, self.start, self.start)
        return (self.blocks(x) + 1) / 2


class PooledViT(nn.Module):
    """A ``ViTModel`` and its pooled representation ``(B, hidden_size)`` of normalized images
    (``cls``: the final-norm CLS token; ``mean``: the mean of the patch tokens). ``eager``: eager
    attention, whatever ``model.attn_implementation`` says (R1's double backward: torch's CPU
    scaled-dot-product kernels have no second derivative)."""

    def __init__(self, cfg, eager: bool = False):
        super().__init__()
        if cfg.model.image_size % cfg.model.patch_size:
            raise ValueError(f"model.image_size={cfg.model.image_size} must be a multiple of "
                             f"model.patch_size={cfg.model.patch_size}")
        if cfg.objective.pooling not in ("cls", "mean"):
            raise ValueError(f"objective.pooling={cfg.objective.pooling!r}: use cls or mean")
        config = vit_config(cfg)
        if eager:
            config._attn_implementation = "eager"
        self.backbone = ViTModel(config, add_pooling_layer=False)
        self.pooling = cfg.objective.pooling

    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.patch_embeddings.projection.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=x.to(self.dtype())).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)


class Discriminator(PooledViT):
    """``gan``'s discriminator: normalized images ``(B, C, S, S)`` -> logits ``(B,)`` fp32."""

    def __init__(self, cfg):
        super().__init__(cfg, eager=cfg.objective.r1_gamma > 0)
        self.head = nn.Linear(cfg.model.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x)).squeeze(1).float()


class ConvImages(nn.Module):
    """DCGAN's discriminator trunk (Radford et al. 2016, section 3: strided convolutions,
    LeakyReLU 0.2; no BatchNorm here: nothing per rank to keep): normalized images ``(B, C, S,
    S)`` -> two 4x4 stride-2 convolutions (``width / 2``, ``width`` channels) -> a linear layer
    -> ``(B, width)``."""

    def __init__(self, channels: int, width: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width // 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
            nn.Linear(width * (image_size // 4) ** 2, width))
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


class JointDiscriminator(nn.Module):
    """``bigan``'s discriminator on pairs: images ``(B, C, S, S)`` through a ViT (or, with
    ``objective.discriminator: dcgan``, DCGAN's convolutional trunk), latents ``(B,
    latent_dim)`` through a linear layer, both (LeakyReLU 0.2) into a 2-layer MLP -> the joint
    score. Returns fp32 scores ``(B, 1)``, or with ``objective.unary_scores`` ``(B, 3)``: the
    joint score s_xz, then BigBiGAN's unary scores s_x (a linear layer on the image features)
    and s_z (a linear layer on the latent features; Donahue & Simonyan 2019, section 2).
    ``ValueError`` for another ``objective.discriminator``."""

    def __init__(self, cfg):
        super().__init__()
        width, kind = cfg.model.hidden_size, cfg.objective.get("discriminator", "vit")
        if kind not in ("vit", "dcgan"):
            raise ValueError(f"objective.discriminator={kind!r}: use vit or dcgan")
        self.images = PooledViT(cfg, eager=cfg.objective.r1_gamma > 0) if kind == "vit" else \
            ConvImages(cfg.model.num_channels, width, cfg.model.image_size)
        self.latents = nn.Linear(cfg.objective.latent_dim, width)
        self.joint = nn.Sequential(nn.Linear(2 * width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
        self.unary = nn.ModuleList([nn.Linear(width, 1), nn.Linear(width, 1)]) \
            if cfg.objective.get("unary_scores", False) else None

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.images(x), 0.2)
        hz = F.leaky_relu(self.latents(z.to(h.dtype)), 0.2)
        scores = [self.joint(torch.cat([h, hz], dim=1))]
        if self.unary is not None:
            scores += [self.unary[0](h), self.unary[1](hz)]
        return torch.cat(scores, dim=1).float()


class Encoder(PooledViT):
    """``bigan``'s E: normalized images -> latents ``(B, latent_dim)`` fp32 (a linear layer on
    the pooled tokens)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.to_latent = nn.Linear(cfg.model.hidden_size, cfg.objective.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(super().forward(x)).float()


class GeneratorEncoder(nn.Module):
    """``bigan``'s G and E, one network (one engine, one optimizer): they share one loss."""

    def __init__(self, generator: DCGANGenerator, encoder: Encoder):
        super().__init__()
        self.generator, self.encoder = generator, encoder


# ---------------------------------------------------------------------------------- objectives
class GAN(nn.Module):
    """``gan`` on ``batch["pixel_values"]`` uint8 ``(B, C, H, W)`` (or [0, 1] float) with
    ``batch["sample_seeds"]`` ``(B,)`` int64 (optional).

    ``discriminator_loss``: the discriminator's loss (+ R1), metrics ``d_loss``,
    ``d_real_accuracy``, ``d_fake_accuracy`` (and ``r1_penalty``); ``generator_loss``: the
    non-saturating loss, metric ``g_loss``. ``features``: the discriminator's pooled tokens of the
    un-augmented image ``(B, hidden_size)``. ``ValueError`` for an image size that is not a
    multiple of the patch size and of 4."""

    def __init__(self, cfg):
        super().__init__()
        o, m = cfg.objective, cfg.model
        self.latent_dim, self.d_steps, self.r1_gamma = o.latent_dim, o.d_steps_per_g, o.r1_gamma
        self.diff_augment = o.diff_augment
        self.lr = {"discriminator": o.d_lr or None, "generator": o.g_lr or None}
        view = ViewConfig(crop_scale=tuple(o.crop_scale), hflip=o.hflip)
        self.transform = ViewAugment(m.image_size, cfg.data.mean, cfg.data.std, [view])
        self.generator = DCGANGenerator(o.latent_dim, o.generator_width, m.num_channels, m.image_size)
        self.discriminator = self._build_discriminator(cfg)

    def _build_discriminator(self, cfg) -> nn.Module:
        return Discriminator(cfg)

    # the several-networks protocol (sslscale.engine.EngineSet, sslscale.trainer)
    def networks(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator, "generator": self.generator}

    def phases(self) -> list[Phase]:
        d = Phase("discriminator", self.discriminator_loss, reads_data=True, logs_loss=False)
        return [d] * self.d_steps + [Phase("generator", self.generator_loss, reads_data=False, logs_loss=True)]

    # pieces
    def _seeds(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, seeds = batch["pixel_values"], batch.get("sample_seeds")
        return random_seeds(len(images), images.device) if seeds is None else seeds.to(images.device)

    def _real(self, batch: dict[str, torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        return self.transform(batch["pixel_values"], seeds, augment=self.training)

    def _latents(self, seeds: torch.Tensor, tag: int) -> torch.Tensor:
        return normal(seeds, self.latent_dim, tag)

    def _generate(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized generated images ``(B, C, S, S)`` fp32."""
        return (self._draw(z).float() - self.transform.mean) / self.transform.std

    def _draw(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def _fake(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Normalized generated images for the discriminator: cropped and flipped as the real
        ones (other draws: a bit of the seeds flipped) with ``diff_augment``."""
        if self.diff_augment and self.training:
            return self.transform(self._draw(z).float(), seeds ^ FAKE_SEED_FLIP, augment=True)
        return self._generate(z)

    def _r1(self, loss, metrics, real_logits, real) -> torch.Tensor:
        if not self.r1_gamma:
            return loss
        penalty = r1_penalty(real_logits, real)
        metrics["r1_penalty"] = penalty.detach()
        return loss + 0.5 * self.r1_gamma * penalty

    # losses
    def discriminator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds = self._seeds(batch)
        real = self._real(batch, seeds).requires_grad_(bool(self.r1_gamma))
        with torch.no_grad():
            fake = self._fake(self._latents(seeds, D_LATENT), seeds)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        loss = discriminator_loss(real_logits, fake_logits)
        metrics = {"d_loss": loss.detach(), **accuracies(real_logits, fake_logits)}
        return ObjectiveOutput(loss=self._r1(loss, metrics, real_logits, real), metrics=metrics)

    def generator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds = self._seeds(batch)
        fake = self._fake(self._latents(seeds, G_LATENT), seeds)
        loss = generator_loss(self.discriminator(fake))
        return ObjectiveOutput(loss=loss, metrics={"g_loss": loss.detach()})

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """The discriminator's loss (the trainer steps each network through ``phases()``)."""
        return self.discriminator_loss(batch)

    # the Objective protocol
    def encoder(self) -> nn.Module:
        return self.discriminator.backbone

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return PooledViT.forward(self.discriminator, self.transform(batch["pixel_values"], augment=False)).float()

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """``(num_samples, C, S, S)`` generated images in [0, 1], the same for the same ``seed``."""
        device = self.transform.mean.device
        seeds = torch.arange(num_samples, dtype=torch.int64, device=device) + seed
        return self.generator(self._latents(seeds, G_LATENT)).float().clamp(0, 1)


class BiGAN(GAN):
    """``bigan`` (batches as ``gan``'s). ``discriminator_loss``: real pairs (x, E(x)) against
    fake pairs (G(z), z), metrics as ``gan``'s (the accuracies of the joint score; ``d_loss``
    summed over the scores with ``unary_scores``); ``generator_loss`` (G and E together): the
    label-swapped non-saturating loss ``-log(1 - D(x, E(x))) - log D(G(z), z)``, metric
    ``g_loss``, + ``reconstruction_weight`` x ``reconstruction_loss(G(E(x)), x)`` (metric
    ``reconstruction_loss``). ``features``: E's pooled tokens ``(B, hidden_size)``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.generator = GeneratorEncoder(self.generator, Encoder(cfg))
        self.reconstruction_weight = cfg.objective.get("reconstruction_weight", 0.0)

    def _build_discriminator(self, cfg) -> nn.Module:
        return JointDiscriminator(cfg)

    def _draw(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator.generator(z)

    def discriminator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds = self._seeds(batch)
        real = self._real(batch, seeds).requires_grad_(bool(self.r1_gamma))
        z = self._latents(seeds, D_LATENT)
        with torch.no_grad():
            encoded, fake = self.generator.encoder(real), self._fake(z, seeds)
        real_scores, fake_scores = self.discriminator(real, encoded), self.discriminator(fake, z)
        loss = scores_loss(real_scores, fake_scores)
        metrics = {"d_loss": loss.detach(), **accuracies(real_scores[:, 0], fake_scores[:, 0])}
        return ObjectiveOutput(loss=self._r1(loss, metrics, real_scores.sum(dim=1), real), metrics=metrics)

    def generator_loss(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds = self._seeds(batch)
        real = self._real(batch, seeds)
        z = self._latents(seeds, G_LATENT)
        encoded = self.generator.encoder(real)
        real_scores = self.discriminator(real, encoded)
        loss = scores_loss(self.discriminator(self._fake(z, seeds), z), real_scores)  # the labels swapped
        metrics = {"g_loss": loss.detach()}
        if self.reconstruction_weight:
            reconstruction = reconstruction_loss(self._generate(encoded), real)
            metrics["reconstruction_loss"] = reconstruction.detach()
            loss = loss + self.reconstruction_weight * reconstruction
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def encoder(self) -> nn.Module:
        return self.generator.encoder.backbone

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.transform(batch["pixel_values"], augment=False)
        return PooledViT.forward(self.generator.encoder, x).float()

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        device = self.transform.mean.device
        seeds = torch.arange(num_samples, dtype=torch.int64, device=device) + seed
        return self.generator.generator(self._latents(seeds, G_LATENT)).float().clamp(0, 1)


@OBJECTIVES.register("gan", schema=GANConfig)
def build_gan(cfg) -> GAN:
    return GAN(cfg)


@OBJECTIVES.register("bigan", schema=BiGANConfig)
def build_bigan(cfg) -> BiGAN:
    return BiGAN(cfg)
