"""The autoencoder family on a ViT encoder: denoising autoencoder (``dae``) and VAE (``vae``).

- ``dae``: Vincent, Larochelle, Bengio & Manzagol, "Extracting and Composing Robust Features
  with Denoising Autoencoders" (ICML 2008). Each crop is corrupted, the encoder sees the
  corrupted image and a light decoder reconstructs the *clean* one (MSE over all pixels, [0, 1]
  pixel units). Corruption (``objective.noise``): ``masking`` sets each pixel (all channels) to
  black with probability ``objective.noise_level`` (the paper's masking noise), ``gaussian``
  adds N(0, ``noise_level``) per pixel and channel ([0, 1] units; Vincent et al. 2010's additive
  isotropic Gaussian noise). The noise is drawn from the sample's seed (``sslscale.data.augment``).
- ``vae``: Kingma & Welling, "Auto-Encoding Variational Bayes" (ICLR 2014, arXiv 1312.6114).
  The encoder's pooled representation gives the mean and log-variance of a diagonal Gaussian
  posterior over a latent of ``objective.latent_dim``; ``z = mu + sigma * eps`` (the
  reparameterization trick, ``eps`` from the sample's seed); the decoder maps ``z`` back to the
  image. Loss per image: squared error summed over pixels ([0, 1] units: a Gaussian decoder
  with variance 1/2) plus ``objective.beta`` x KL(q(z|x) || N(0, I)) (beta-VAE, Higgins et al.
  2017, when beta != 1), divided by the number of pixel values so that its scale does not
  depend on the image size. Logs ``train/recon_loss`` (MSE per pixel value) and
  ``train/kl_loss`` (nats per image) separately. kNN / linear probing use the posterior mean.

Both decoders are small pre-norm transformers over the patch grid (``model.decoder_*``, as MAE's)
with learned position embeddings and a linear layer to each patch's pixels; the DAE decodes the
encoder's patch tokens, the VAE one projected latent broadcast to every position (a spatial
broadcast decoder). The encoder is transformers' ``ViTModel``, exported as it is. Both
objectives implement ``reconstruct`` (and the VAE ``sample``) for ``sslscale samples``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel

from sslscale.config_schema import DAEConfig, VAEConfig
from sslscale.data.augment import LATENT, NOISE, ViewAugment, ViewConfig, normal, random_seeds, uniform
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.registry import OBJECTIVES


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, S, S)`` -> ``(B, N, patch_size**2 * C)``, patches in row-major order."""
    b, c, s, _ = images.shape
    g = s // patch_size
    x = images.reshape(b, c, g, patch_size, g, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, patch_size**2 * C)`` -> ``(B, C, S, S)``."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch_size, g * patch_size)


class PatchDecoder(nn.Module):
    """Tokens ``(B, N, in_dim)`` -> pixels per patch ``(B, N, patch_size**2 * C)``: a linear
    embedding, learned position embeddings, ``model.decoder_num_hidden_layers`` pre-norm
    transformer layers of width ``model.decoder_hidden_size``, a final norm and a linear layer."""

    def __init__(self, cfg, in_dim: int):
        super().__init__()
        m = cfg.model
        num_patches, patch_dim = (m.image_size // m.patch_size) ** 2, m.patch_size ** 2 * m.num_channels
        width = m.decoder_hidden_size
        self.embed = nn.Linear(in_dim, width)
        self.position = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, m.decoder_num_attention_heads, m.decoder_intermediate_size,
                                           dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, m.decoder_num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pixels = nn.Linear(width, patch_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pixels(self.norm(self.blocks(self.embed(tokens) + self.position)))


class _ImageAutoencoder(nn.Module):
    """Shared parts: the ViT encoder, the crop / flip transform, [0, 1] pixel conversions."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        if m.image_size % m.patch_size:
            raise ValueError(f"model.image_size={m.image_size} must be a multiple of "
                             f"model.patch_size={m.patch_size}")
        self.patch_size, self.channels = m.patch_size, m.num_channels
        self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        view = ViewConfig(crop_scale=tuple(cfg.objective.crop_scale), hflip=cfg.objective.hflip)
        self.transform = ViewAugment(m.image_size, cfg.data.mean, cfg.data.std, [view])

    def _dtype(self) -> torch.dtype:
        return self.backbone.embeddings.patch_embeddings.projection.weight.dtype

    def _clean(self, batch: dict[str, torch.Tensor], augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seeds (B,), crops in [0, 1] (B, C, S, S))``."""
        images = batch["pixel_values"]
        seeds = batch.get("sample_seeds")
        seeds = random_seeds(len(images), images.device) if seeds is None else seeds.to(images.device)
        x = self.transform(images, seeds, augment=augment)
        return seeds, x * self.transform.std + self.transform.mean

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels - self.transform.mean) / self.transform.std).to(self._dtype())

    def _image(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches.float(), self.patch_size, self.channels)

    def encoder(self) -> nn.Module:
        return self.backbone


class DenoisingAutoencoder(_ImageAutoencoder):
    """DAE on ``batch["pixel_values"]`` uint8 ``(B, C, H, W)`` (or [0, 1] float) with
    ``batch["sample_seeds"]`` ``(B,)`` int64 (optional).

    ``forward``: MSE between the reconstruction of the corrupted crop and the clean crop
    ([0, 1] pixel units, scalar). ``features``: mean of the encoder's patch tokens of the clean,
    un-augmented image ``(B, hidden_size)``. ``ValueError`` for an unknown ``objective.noise``
    or a ``noise_level`` outside [0, 1]."""

    NOISES = ("masking", "gaussian")

    def __init__(self, cfg):
        super().__init__(cfg)
        o = cfg.objective
        if o.noise not in self.NOISES:
            raise ValueError(f"objective.noise={o.noise!r}: use one of {', '.join(self.NOISES)}")
        if not 0.0 <= o.noise_level <= 1.0:
            raise ValueError(f"objective.noise_level={o.noise_level} must be in [0, 1]")
        self.noise, self.noise_level = o.noise, o.noise_level
        self.decoder = PatchDecoder(cfg, cfg.model.hidden_size)

    def corrupt(self, clean: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The corrupted copy of ``clean`` ``(B, C, S, S)`` in [0, 1] units, from ``seeds``."""
        b, c, h, w = clean.shape
        if self.noise == "masking":
            keep = uniform(seeds, h * w, NOISE).view(b, 1, h, w) >= self.noise_level
            return clean * keep
        return (clean + self.noise_level * normal(seeds, c * h * w, NOISE).view(b, c, h, w)).clamp(0, 1)

    def _decode(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=self._normalize(pixels)).last_hidden_state
        return self.decoder(hidden[:, 1:])

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds, clean = self._clean(batch, augment=self.training)
        predicted = self._decode(self.corrupt(clean, seeds))
        loss = F.mse_loss(predicted.float(), patchify(clean, self.patch_size))
        return ObjectiveOutput(loss=loss)

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of a picture grid, each ``(B, C, S, S)`` in [0, 1]: the un-augmented input, its
        corrupted copy and the reconstruction."""
        seeds, clean = self._clean(batch, augment=False)
        corrupted = self.corrupt(clean, seeds)
        return {"input": clean, "corrupted": corrupted,
                "reconstruction": self._image(self._decode(corrupted)).clamp(0, 1)}

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.transform(batch["pixel_values"], augment=False).to(self._dtype())
        return self.backbone(pixel_values=x).last_hidden_state[:, 1:].mean(dim=1).float()


class VariationalAutoencoder(_ImageAutoencoder):
    """VAE on ``batch["pixel_values"]`` uint8 ``(B, C, H, W)`` (or [0, 1] float) with
    ``batch["sample_seeds"]`` ``(B,)`` int64 (optional).

    ``forward``: the negative ELBO per pixel value (scalar, see the module docstring), metrics
    ``train/recon_loss`` and ``train/kl_loss``. ``features``: the posterior mean ``(B,
    latent_dim)`` of the un-augmented image. ``ValueError`` unless ``objective.latent_dim >= 1``
    and ``objective.beta >= 0``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        o, m = cfg.objective, cfg.model
        if o.latent_dim < 1 or o.beta < 0:
            raise ValueError(f"objective.latent_dim={o.latent_dim} must be >= 1 and "
                             f"objective.beta={o.beta} >= 0")
        self.latent_dim, self.beta = o.latent_dim, o.beta
        self.posterior = nn.Linear(m.hidden_size, 2 * o.latent_dim)
        self.decoder = PatchDecoder(cfg, o.latent_dim)
        self.num_patches = (m.image_size // m.patch_size) ** 2

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``(B, latent_dim)`` float32, of images in [0, 1] units."""
        hidden = self.backbone(pixel_values=self._normalize(pixels)).last_hidden_state
        mu, logvar = self.posterior(hidden[:, 1:].mean(dim=1)).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, latent_dim)`` -> predicted pixels per patch ``(B, N, patch_dim)``."""
        return self.decoder(z.to(self._dtype())[:, None, :].expand(-1, self.num_patches, -1))

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        seeds, clean = self._clean(batch, augment=self.training)
        mu, logvar = self.encode(clean)
        z = mu + torch.exp(0.5 * logvar) * normal(seeds, self.latent_dim, LATENT)
        target = patchify(clean, self.patch_size)
        squared = (self.decode(z).float() - target).pow(2).sum(dim=(1, 2))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        values = target.shape[1] * target.shape[2]
        loss = (squared + self.beta * kl).mean() / values
        return ObjectiveOutput(loss=loss, metrics={"recon_loss": squared.detach().mean() / values,
                                                   "kl_loss": kl.detach().mean()})

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of a picture grid, ``(B, C, S, S)`` in [0, 1]: the un-augmented input and the
        decoding of its posterior mean."""
        _, clean = self._clean(batch, augment=False)
        return {"input": clean, "reconstruction": self._image(self.decode(self.encode(clean)[0])).clamp(0, 1)}

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """``(num_samples, C, S, S)`` images in [0, 1] decoded from the prior N(0, I), the same
        for the same ``seed``."""
        seeds = torch.arange(num_samples, dtype=torch.int64, device=self.posterior.weight.device) + seed
        return self._image(self.decode(normal(seeds, self.latent_dim, LATENT))).clamp(0, 1)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        _, clean = self._clean(batch, augment=False)
        return self.encode(clean)[0]


@OBJECTIVES.register("dae", schema=DAEConfig)
def build_dae(cfg) -> DenoisingAutoencoder:
    return DenoisingAutoencoder(cfg)


@OBJECTIVES.register("vae", schema=VAEConfig)
def build_vae(cfg) -> VariationalAutoencoder:
    return VariationalAutoencoder(cfg)
