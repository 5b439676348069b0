"""RotNet: self-supervised learning by predicting image rotations, on a ViT.

Follows Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations" (ICLR 2018, arXiv 1803.07728): every image is rotated by 0, 90, 180 and 270 degrees
and the network classifies which rotation it sees (4-way cross-entropy). The paper feeds all four
rotated copies of an image in the same batch, which it found best; ``objective.rotations_per_image``
= 4 does that, a smaller value takes that many distinct rotations per image, drawn from the
sample's seed (``sslscale.data.augment``), like every other augmentation. Before rotating, each
image gets the usual random resized crop and horizontal flip (``crop_scale``, ``hflip``).

The encoder is transformers' ``ViTModel`` (SDPA, no pooler), exported as it is; the head is a
linear layer on the pooled representation (``objective.pooling``: the final-norm CLS token or
the mean of the patch tokens), which is also the kNN feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel

from sslscale.config_schema import RotNetConfig
from sslscale.data.augment import ROTATE, ViewAugment, ViewConfig, random_seeds, uniform
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.registry import OBJECTIVES

NUM_ROTATIONS = 4


def rotations(seeds: torch.Tensor, per_image: int) -> torch.Tensor:
    """``(B, per_image)`` int64 rotation classes (quarter turns, 0-3) for ``seeds`` ``(B,)``:
    ``0, 1, 2, 3`` for every image when ``per_image`` is 4, else that many distinct classes
    drawn from each seed (the first ``per_image`` of a seeded permutation). ``ValueError``
    unless ``1 <= per_image <= 4``."""
    if not 1 <= per_image <= NUM_ROTATIONS:
        raise ValueError(f"objective.rotations_per_image={per_image} must be between 1 and 4")
    if per_image == NUM_ROTATIONS:
        return torch.arange(NUM_ROTATIONS, device=seeds.device).expand(len(seeds), -1)
    return uniform(seeds, NUM_ROTATIONS, ROTATE).argsort(dim=1)[:, :per_image]


def rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Square images ``(B, C, S, S)`` each rotated counter-clockwise by ``quarter_turns`` ``(B,)``
    x 90 degrees (``torch.rot90``'s result; no interpolation): one gather of each image's
    pixels through the source-index map of its turn, so no host sync and no copy per turn."""
    batch, channels, size, _ = images.shape
    grid = torch.arange(size * size, device=images.device).view(1, 1, size, size)
    sources = torch.cat([torch.rot90(grid, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)]).flatten(1)  # (4, S*S)
    index = sources[quarter_turns].unsqueeze(1).expand(-1, channels, -1)
    return images.flatten(2).gather(2, index).view(batch, channels, size, size)


class RotNet(nn.Module):
    """Rotation prediction on ``batch["pixel_values"]`` uint8 ``(B, C, H, W)`` (or [0, 1]
    float) with ``batch["sample_seeds"]`` ``(B,)`` int64 (optional).

    ``forward``: mean cross-entropy over the ``B x rotations_per_image`` rotated crops (scalar),
    metric ``train/rotation_accuracy``. ``features``: the pooled representation ``(B,
    hidden_size)`` of the un-augmented, unrotated images."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.model.image_size % cfg.model.patch_size:
            raise ValueError(f"model.image_size={cfg.model.image_size} must be a multiple of "
                             f"model.patch_size={cfg.model.patch_size}")
        self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.head = nn.Linear(cfg.model.hidden_size, NUM_ROTATIONS)
        view = ViewConfig(crop_scale=tuple(cfg.objective.crop_scale), hflip=cfg.objective.hflip)
        self.transform = ViewAugment(cfg.model.image_size, cfg.data.mean, cfg.data.std, [view])
        self.pooling = cfg.objective.pooling
        self.per_image = cfg.objective.rotations_per_image
        rotations(torch.zeros(1, dtype=torch.int64), self.per_image)  # checks the key early

    def _dtype(self) -> torch.dtype:
        return self.backbone.embeddings.patch_embeddings.projection.weight.dtype

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled representation ``(B, hidden_size)`` of normalized images ``(B, C, S, S)``."""
        hidden = self.backbone(pixel_values=x).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        images = batch["pixel_values"]
        seeds = batch.get("sample_seeds")
        seeds = random_seeds(len(images), images.device) if seeds is None else seeds.to(images.device)
        x = self.transform(images, seeds)
        labels = rotations(seeds, self.per_image)  # (B, R): image i's copies are rows i, B+i, ...
        x = torch.cat([rotate(x, labels[:, r]) for r in range(labels.shape[1])]).to(self._dtype())
        labels = labels.t().reshape(-1)
        logits = self.head(self.represent(x)).float()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"rotation_accuracy": accuracy})

    def encoder(self) -> nn.Module:
        return self.backbone

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.transform(batch["pixel_values"], augment=False).to(self._dtype())
        return self.represent(x).float()


@OBJECTIVES.register("rotnet", schema=RotNetConfig)
def build_rotnet(cfg) -> RotNet:
    return RotNet(cfg)
