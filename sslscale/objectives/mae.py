"""Masked autoencoder (MAE) pretraining of a ViT.

Follows He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022,
arXiv 2111.06377) and its reference code: random resized crop + horizontal flip, a random
``mask_ratio`` of patches hidden from the encoder (crop, flip and mask drawn per sample from
its seed, see ``sslscale.data.augment``), a light decoder reconstructing the pixels of
the hidden patches, MSE on the masked patches only, optionally against per-patch normalized
pixels (``norm_pix_loss``). The model is transformers' ``ViTMAEForPreTraining`` with SDPA
attention, so the encoder exports as a ``ViTMAEModel`` that ``AutoModel`` loads.

Initialization follows the reference ``models_mae.initialize_weights`` explicitly: transformers
5.23 builds ``ViTMAEForPreTraining`` with all-zero (frozen) encoder and decoder position
embeddings and zero cls / mask tokens, which leaves the model blind to where patches are.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from sslscale.config_schema import MAEConfig
from sslscale.data.augment import MASK, ViewAugment, ViewConfig, random_seeds, uniform
from sslscale.dist import gathered
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


@torch.no_grad()
def init_mae_weights(model: ViTMAEForPreTraining) -> None:
    """He et al.'s initialization: xavier-uniform linears (and patch projection as a linear),
    unit LayerNorms, N(0, 0.02) cls and mask tokens, fixed sin-cos position embeddings."""
    with gathered(model.parameters()):
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


class MAEObjective(nn.Module):
    """MAE on ``batch["pixel_values"]``: uint8 ``(B, C, H, W)`` or float in [0, 1], with
    ``batch["sample_seeds"]`` ``(B,)`` int64 (optional): crop, flip and patch mask are drawn per
    sample from it (``sslscale.data.augment``), from torch's RNG without it.

    ``forward`` returns the masked-patch reconstruction loss (scalar). ``features`` returns the
    mean of the encoder's final patch tokens over *all* patches (no masking), shape
    ``(B, hidden_size)``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.model = ViTMAEForPreTraining(vit_mae_config(cfg))
        init_mae_weights(self.model)
        view = ViewConfig(crop_scale=tuple(cfg.objective.crop_scale), hflip=cfg.objective.hflip)
        self.transform = ViewAugment(cfg.model.image_size, cfg.data.mean, cfg.data.std, [view])

    def _dtype(self) -> torch.dtype:
        return self.model.vit.embeddings.patch_embeddings.projection.weight.dtype

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        images = batch["pixel_values"]
        seeds = batch.get("sample_seeds")
        seeds = random_seeds(len(images), images.device) if seeds is None else seeds
        x = self.transform(images, seeds, augment=self.training).to(self._dtype())
        # ViTMAE keeps the patches with the smallest noise: a per-sample random mask
        noise = uniform(seeds, self.model.vit.embeddings.patch_embeddings.num_patches, MASK)
        out = self.model(pixel_values=x, noise=noise)
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
        x = self.transform(batch["pixel_values"], augment=False).to(self._dtype())
        num_patches = self.model.vit.embeddings.patch_embeddings.num_patches
        # Increasing noise keeps every patch in its place: the encoder sees the whole image.
        noise = torch.arange(num_patches, device=x.device, dtype=torch.float32).expand(len(x), -1)
        with self._unmasked():
            hidden = self.model.vit(pixel_values=x, noise=noise).last_hidden_state
        return hidden[:, 1:].mean(dim=1).float()


@OBJECTIVES.register("mae", schema=MAEConfig)
def build_mae(cfg) -> MAEObjective:
    return MAEObjective(cfg)
