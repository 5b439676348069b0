"""Supervised fine-tuning of a pretrained image encoder (``objective.name: classify``).

The fine-tuning recipe of MAE (He et al. 2022, arXiv 2111.06377, appendix A.3) and BEiT (Bao et
al. 2021, arXiv 2106.08254): the pretrained ViT encoder (``train.init_from``: any image
pretraining checkpoint of sslscale, MAE or contrastive; its heads and decoder are left behind)
plus a new linear head on the pooled representation (``objective.pooling``: ``mean`` of the patch
tokens behind a LayerNorm, MAE's choice, or the ``cls`` token), trained end to end on the shards'
labels with label-smoothed cross-entropy (``objective.label_smoothing``), random resized crop +
flip, warmup + cosine, and layer-wise learning-rate decay (``optim.layer_decay``: block ``i`` of
``L`` gets ``layer_decay ** (L + 1 - i)`` of the learning rate, the embeddings ``layer_decay **
(L + 1)``, the head 1; ``sslscale.engine.param_groups``). Without ``train.init_from`` it is the
from-scratch baseline of the same architecture and budget. Not applied: drop path (transformers'
ViT has no stochastic depth), RandAugment, mixup / cutmix.

The batch: ``pixel_values`` uint8 ``(B, C, H, W)``, ``labels`` ``(B,)`` int64 in ``[0,
objective.num_classes)`` (``-1``: no label, ignored), ``sample_seeds`` ``(B,)`` (optional).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import ViTModel

from sslscale.data.augment import ViewAugment, ViewConfig, random_seeds
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.registry import OBJECTIVES

# An encoder block's parameters: ``backbone.layers.N.`` (transformers 5) or
# ``backbone.encoder.layer.N.`` (transformers 4).
_BLOCK = re.compile(r"backbone\.(?:encoder\.layer|layers)\.(\d+)\.")
# Where each pretraining objective keeps its ViT encoder in its state dict.
ENCODER_PREFIXES = {"model.vit.": "mae", "backbone.": "simclr / moco_v3 / simsiam / classify"}


class ClassifyObjective(nn.Module):
    """A ViT encoder + linear head; ``forward`` returns the label-smoothed cross-entropy (scalar)
    and ``top1`` (fraction of the micro-batch classified right) as a metric. ``logits(batch)``:
    ``(B, num_classes)`` of un-augmented images; ``features(batch)``: the pooled representation
    ``(B, hidden_size)`` (kNN). ``layer_id(name)`` numbers parameters for layer-wise lr decay."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.objective.num_classes < 2:
            from sslscale.config import ConfigError
            raise ConfigError("key 'objective.num_classes' must be >= 2 for classify (0 takes it "
                              "from the training shards' manifest, meta.classes)")
        hidden = cfg.model.hidden_size
        self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.pooling = cfg.objective.pooling
        self.fc_norm = nn.LayerNorm(hidden, eps=1e-6) if self.pooling == "mean" else nn.Identity()
        self.head = nn.Linear(hidden, cfg.objective.num_classes)
        with torch.no_grad():  # MAE's fine-tuning head: trunc_normal(std=2e-5), zero bias
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        view = ViewConfig(crop_scale=tuple(cfg.objective.crop_scale), hflip=cfg.objective.hflip)
        self.transform = ViewAugment(cfg.model.image_size, cfg.data.mean, cfg.data.std, [view])
        self.label_smoothing = cfg.objective.label_smoothing
        self.num_layers = cfg.model.num_hidden_layers

    def _dtype(self) -> torch.dtype:
        return self.backbone.embeddings.patch_embeddings.projection.weight.dtype

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=x.to(self._dtype())).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        images, labels = batch["pixel_values"], batch["labels"]
        seeds = batch.get("sample_seeds")
        seeds = random_seeds(len(images), images.device) if seeds is None else seeds
        logits = self.head(self.fc_norm(self._pooled(self.transform(images, seeds, augment=self.training))))
        loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1,
                                           label_smoothing=self.label_smoothing)
        labeled = (labels >= 0).sum().clamp(min=1)
        top1 = ((logits.argmax(1) == labels) & (labels >= 0)).sum() / labeled
        return ObjectiveOutput(loss=loss, metrics={"top1": top1.detach()})

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.transform(batch["pixel_values"], augment=False)
        return self.head(self.fc_norm(self._pooled(x))).float()

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._pooled(self.transform(batch["pixel_values"], augment=False)).float()

    def encoder(self) -> nn.Module:
        return self.backbone

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, ``i + 1`` for encoder block ``i``, ``num_layers + 1`` for the
        final norm, pooling norm and head (BEiT's ``get_layer_id_for_vit``)."""
        if name.startswith("backbone.embeddings."):
            return 0
        block = _BLOCK.match(name)
        return int(block.group(1)) + 1 if block else self.num_layers + 1

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load the ViT encoder of a pretraining objective's ``state`` (MAE's ``model.vit.*``, the
        contrastive objectives' ``backbone.*``); heads, decoders and momentum encoders are left
        out, and this head stays new. Raises ``ValueError`` naming ``source`` when ``state`` has
        no encoder, or one whose weights do not fit this architecture."""
        for prefix in ENCODER_PREFIXES:
            encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if encoder:
                break
        else:
            raise ValueError(f"{source}: no ViT encoder weights (keys starting with "
                             f"{' or '.join(ENCODER_PREFIXES)}); is it an image pretraining run?")
        own = self.backbone.state_dict()
        wrong = [k for k, v in encoder.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in encoder]
        if wrong or missing:
            raise ValueError(f"{source}: its encoder does not fit model.* of this run: "
                             + (f"shapes differ for {wrong[:3]}" if wrong else f"missing {missing[:3]}"))
        self.backbone.load_state_dict({k: v for k, v in encoder.items() if k in own})


@OBJECTIVES.register("classify")
def build_classify(cfg) -> ClassifyObjective:
    return ClassifyObjective(cfg)
