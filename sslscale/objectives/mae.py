"""Masked autoencoder (MAE) pretraining of a ViT.

Follows He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022,
arXiv 2111.06377) and its reference code: random resized crop + horizontal flip, a random
``mask_ratio`` of patches hidden from the encoder, a light decoder reconstructing the pixels of
the hidden patches, MSE on the masked patches only, optionally against per-patch normalized
pixels (``norm_pix_loss``). The model is transformers' ``ViTMAEForPreTraining`` with SDPA
attention, so the encoder exports as a ``ViTMAEModel`` that ``AutoModel`` loads.

Initialization follows the reference ``models_mae.initialize_weights`` explicitly: transformers
5.23 builds ``ViTMAEForPreTraining`` with all-zero (frozen) encoder and decoder position
embeddings and zero cls / mask tokens, which leaves the model blind to where patches are.
"""

from __future__ import annotations

import contextlib

import kornia.augmentation as K
import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from sslscale.objectives.base import ObjectiveOutput
from sslscale.registry import OBJECTIVES


def vit_mae_config(cfg) -> ViTMAEConfig:
    """The transformers ``ViTMAEConfig`` for the recipe's ``model`` and ``objective`` sections."""
    m = cfg.model
    return ViTMAEConfig(
        image_size=m.image_size, patch_size=m.patch_size, num_channels=m.num_channels,
        hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
        decoder_hidden_size=m.decoder_hidden_size,
        decoder_num_hidden_layers=m.decoder_num_hidden_layers,
        decoder_num_attention_heads=m.decoder_num_attention_heads,
        decoder_intermediate_size=m.decoder_intermediate_size,
        mask_ratio=cfg.objective.mask_ratio, norm_pix_loss=cfg.objective.norm_pix_loss,
        attn_implementation=m.attn_implementation,
    )


def sincos_position_embedding(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embeddings ``(1, 1 + grid_size**2, dim)``, a zero row for the CLS token,
    in the half order of MAE's released weights (``[sin_w|cos_w|sin_h|cos_h]``, as transformers)."""
    pos = build_2d_sinusoidal_position_embedding(grid_size, grid_size, dim, cls_token=True)
    half = dim // 2
    return torch.cat([pos[..., half:], pos[..., :half]], dim=-1).unsqueeze(0)


def _gathered(params: list[nn.Parameter]):
    """Full parameters to modify in place, also when ZeRO-3 partitioned them at construction."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def init_mae_weights(model: ViTMAEForPreTraining) -> None:
    """He et al.'s initialization: xavier-uniform linears (and patch projection as a linear),
    unit LayerNorms, N(0, 0.02) cls and mask tokens, fixed sin-cos position embeddings."""
    with _gathered(list(model.parameters())):
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        embeddings = model.vit.embeddings
        projection = embeddings.patch_embeddings.projection.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
        nn.init.zeros_(embeddings.patch_embeddings.projection.bias)
        grid = int(embeddings.patch_embeddings.num_patches ** 0.5)
        embeddings.position_embeddings.copy_(
            sincos_position_embedding(grid, embeddings.position_embeddings.shape[-1]))
        decoder_pos = model.decoder.decoder_pos_embed
        decoder_pos.copy_(sincos_position_embedding(grid, decoder_pos.shape[-1]))
        nn.init.normal_(embeddings.cls_token, std=0.02)
        nn.init.normal_(model.decoder.mask_token, std=0.02)


class PixelTransform(nn.Module):
    """uint8 images ``(B, C, H, W)`` -> normalized float ``(B, C, S, S)`` on their device.

    With ``augment`` applies kornia's random resized crop (``crop_scale`` of the area, aspect
    3/4..4/3) and horizontal flip; without, only resizes. Normalizes with ``mean``/``std``
    given in [0, 1] pixel units, per channel.
    """

    def __init__(self, image_size: int, mean, std, crop_scale=(0.2, 1.0), hflip: bool = True):
        super().__init__()
        self.size = (image_size, image_size)
        augs = [K.RandomResizedCrop(self.size, scale=tuple(crop_scale))]
        if hflip:
            augs.append(K.RandomHorizontalFlip())
        self.augment = K.AugmentationSequential(*augs)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if augment:
            x = self.augment(x)
        elif x.shape[-2:] != self.size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", antialias=True)
        return (x - self.mean) / self.std


class MAEObjective(nn.Module):
    """MAE on ``batch["pixel_values"]``: uint8 ``(B, C, H, W)`` or float in [0, 1].

    ``forward`` returns the masked-patch reconstruction loss (scalar). ``features`` returns the
    mean of the encoder's final patch tokens over *all* patches (no masking), shape
    ``(B, hidden_size)``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.model = ViTMAEForPreTraining(vit_mae_config(cfg))
        init_mae_weights(self.model)
        self.transform = PixelTransform(cfg.model.image_size, cfg.data.mean, cfg.data.std,
                                        cfg.objective.crop_scale, cfg.objective.hflip)

    def _inputs(self, batch: dict[str, torch.Tensor], augment: bool) -> torch.Tensor:
        dtype = self.model.vit.embeddings.patch_embeddings.projection.weight.dtype
        return self.transform(batch["pixel_values"], augment).to(dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        out = self.model(pixel_values=self._inputs(batch, augment=self.training))
        return ObjectiveOutput(loss=out.loss)

    def encoder(self) -> nn.Module:
        return self.model.vit

    @contextlib.contextmanager
    def _unmasked(self):
        config = self.model.vit.config
        ratio, config.mask_ratio = config.mask_ratio, 0.0
        try:
            yield
        finally:
            config.mask_ratio = ratio

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._inputs(batch, augment=False)
        num_patches = self.model.vit.embeddings.patch_embeddings.num_patches
        # Increasing noise keeps every patch in its place: the encoder sees the whole image.
        noise = torch.arange(num_patches, device=x.device, dtype=torch.float32).expand(len(x), -1)
        with self._unmasked():
            hidden = self.model.vit(pixel_values=x, noise=noise).last_hidden_state
        return hidden[:, 1:].mean(dim=1).float()


@OBJECTIVES.register("mae")
def build_mae(cfg) -> MAEObjective:
    return MAEObjective(cfg)
