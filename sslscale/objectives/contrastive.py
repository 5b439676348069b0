"""Two-view objectives on a ViT: SimCLR, MoCo v3 and SimSiam.

- ``simclr``: Chen et al., "A Simple Framework for Contrastive Learning of Visual
  Representations" (ICML 2020, arXiv 2002.05709): projection MLP, NT-Xent with ``temperature``
  against the 2N views of the global batch.
- ``moco_v3``: Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
  Transformers" (ICCV 2021, arXiv 2104.02057): projector + predictor on the online encoder, a
  momentum (EMA) copy of encoder + projector gives the keys; symmetric InfoNCE against the keys of
  the global batch; the EMA momentum rises from ``objective.momentum`` to 1.0 on a cosine in step.
- ``simsiam``: Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021,
  arXiv 2011.10566): projector + predictor, stop-gradient, negative cosine; no negatives.

The encoder is transformers' ``ViTModel`` (SDPA attention, no pooler); its representation is
the final-norm CLS token (``objective.pooling=cls``) or the mean of the patch tokens (``mean``).
Both views are made on the device from each sample's seed (``sslscale.data.augment``).

Negatives and BatchNorm statistics span all ranks' current micro-batches
(``objective.negatives=global``; ``local`` keeps them per rank). Under gradient accumulation
they span one micro-step (world size x ``micro_batch_size`` samples), not the whole
``global_batch_size``: each micro-step's loss and its backward are complete before the next.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from sslscale.config_schema import MoCoV3Config, SimCLRConfig, SimSiamConfig
from sslscale.data.augment import ViewAugment, ViewConfig, random_seeds
from sslscale.dist import gathered
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.losses import mlp, moco_infonce, negative_cosine, nt_xent
from sslscale.registry import OBJECTIVES


def vit_config(cfg) -> ViTConfig:
    """transformers ``ViTConfig`` from the recipe's ``model`` section."""
    m = cfg.model
    return ViTConfig(image_size=m.image_size, patch_size=m.patch_size, num_channels=m.num_channels,
                     hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                     num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
                     attn_implementation=m.attn_implementation)


def view_configs(cfg) -> list[ViewConfig]:
    o = cfg.objective
    return [ViewConfig(crop_scale=tuple(o.crop_scale), hflip=o.hflip, color_jitter=o.color_jitter,
                       color_jitter_prob=o.color_jitter_prob, grayscale_prob=o.grayscale_prob,
                       blur_prob=o.blur_prob[v], solarize_prob=o.solarize_prob[v]) for v in (0, 1)]


class TwoViewObjective(nn.Module):
    """Shared parts: the ViT encoder, the two-view transform, pooling, ``features``.

    ``batch["pixel_values"]``: uint8 ``(B, C, H, W)``; ``batch["sample_seeds"]`` ``(B,)`` int64
    (optional). ``features`` returns the pooled representation ``(B, hidden_size)`` of the
    un-augmented, resized images (no heads).
    """

    def __init__(self, cfg):
        super().__init__()
        self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.transform = ViewAugment(cfg.model.image_size, cfg.data.mean, cfg.data.std, view_configs(cfg))
        self.pooling = cfg.objective.pooling
        o = cfg.objective
        self.temperature = o.get("temperature")  # simclr, moco_v3
        self.global_negatives = o.negatives == "global"
        self.head_dims = (cfg.model.hidden_size, o.projection_hidden_dim, o.projection_dim,
                          o.get("predictor_hidden_dim"))  # moco_v3, simsiam

    def _head(self, kind: str) -> nn.Sequential:
        d, hidden, out, pred_hidden = self.head_dims
        if kind == "projector2":  # SimCLR
            return mlp(d, hidden, out, 2, last_bn=False, global_stats=self.global_negatives)
        if kind == "projector3":  # MoCo v3 / SimSiam
            return mlp(d, hidden, out, 3, last_bn=True, global_stats=self.global_negatives)
        return mlp(out, pred_hidden, out, 2, last_bn=False, global_stats=self.global_negatives)

    def _dtype(self) -> torch.dtype:
        return self.backbone.embeddings.patch_embeddings.projection.weight.dtype

    def represent(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Pooled representation ``(B, hidden_size)`` of normalized images ``(B, C, S, S)``."""
        hidden = (backbone or self.backbone)(pixel_values=x).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def views(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Both augmented views stacked ``(2B, C, S, S)``: view 1 rows, then view 2 rows."""
        images = batch["pixel_values"]
        seeds = batch.get("sample_seeds")
        seeds = random_seeds(len(images), images.device) if seeds is None else seeds
        x = torch.cat([self.transform(images, seeds, view=v) for v in (0, 1)])
        return x.to(self._dtype())

    def encoder(self) -> nn.Module:
        return self.backbone

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.transform(batch["pixel_values"], augment=False).to(self._dtype())
        return self.represent(x).float()


class SimCLR(TwoViewObjective):
    """NT-Xent on projections of two views; ``train/loss`` is the full-batch NT-Xent."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector = self._head("projector2")

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        h1, h2 = self.represent(self.views(batch)).chunk(2)
        loss = nt_xent(self.projector(h1), self.projector(h2), self.temperature,
                       gather=self.global_negatives)
        return ObjectiveOutput(loss=loss)


class SimSiam(TwoViewObjective):
    """Symmetric negative cosine between predictions and stop-gradient projections."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector, self.predictor = self._head("projector3"), self._head("predictor")

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        h1, h2 = self.represent(self.views(batch)).chunk(2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        # collapse monitor: per-dimension std of normalized z, 1/sqrt(dim) when healthy, 0 collapsed
        std = torch.nn.functional.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return ObjectiveOutput(loss=loss, metrics={"z_std": std})


def moco_momentum(step: int, max_steps: int, base: float) -> float:
    """MoCo v3's EMA momentum at ``step``: ``1 - (1 - base) * (1 + cos(pi * step / max_steps)) / 2``."""
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps)) / 2.0


class MoCoV3(TwoViewObjective):
    """Online encoder + projector + predictor; momentum encoder + projector give the keys.

    The momentum copies are parameters without gradient (so checkpoints hold them); the trainer
    calls ``on_step_start(step, max_steps)`` once per optimizer step, which applies the EMA with
    ``moco_momentum(step)``. In bf16 the EMA accumulates in an fp32 master copy (updates of
    ``1 - m`` ~ 1e-4 vanish in bf16); after a bf16 resume or rollback (``on_restore``) the master
    restarts from the restored bf16 weights. Under ZeRO-3 the EMA gathers both encoders for the
    update (one full copy of each while it runs; in bf16 the fp32 master is a full copy too).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.projector, self.predictor = self._head("projector3"), self._head("predictor")
        self.momentum_backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.momentum_projector = self._head("projector3")
        self.base_momentum = cfg.objective.momentum
        self._master: list[torch.Tensor] | None = None
        for p in self._momentum_params():
            p.requires_grad_(False)
        self._ema(0.0)  # start as an exact copy

    def _pairs(self):
        online = list(self.backbone.parameters()) + list(self.projector.parameters())
        return list(zip(self._momentum_params(), online))

    def _momentum_params(self) -> list[nn.Parameter]:
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    @torch.no_grad()
    def _ema(self, m: float) -> None:
        pairs = self._pairs()  # ZeRO-3: on the gathered weights (the online ones read only)
        with gathered([o for _, o in pairs], modifier_rank=None), gathered([t for t, _ in pairs]):
            self._ema_pairs([(t.data, o.data) for t, o in pairs], m)

    def _ema_pairs(self, pairs, m: float) -> None:
        if pairs and pairs[0][0].dtype == torch.float32:
            for t, o in pairs:
                t.mul_(m).add_(o, alpha=1.0 - m)
            return
        if self._master is None:
            self._master = [t.float() for t, _ in pairs]
        for master, (t, o) in zip(self._master, pairs):
            master.mul_(m).add_(o.float(), alpha=1.0 - m)
            t.copy_(master)

    def on_restore(self) -> None:
        """Weights were loaded from a checkpoint: the fp32 EMA master restarts from them."""
        self._master = None

    def on_step_start(self, step: int, max_steps: int) -> None:
        """EMA update of the momentum encoder + projector before optimizer step ``step``."""
        if step > 0:
            self._ema(moco_momentum(step, max_steps, self.base_momentum))

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        x = self.views(batch)  # the ViT has no batch statistics: both views go in one pass
        q1, q2 = (self.predictor(self.projector(h)) for h in self.represent(x).chunk(2))
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(h)
                      for h in self.represent(x, self.momentum_backbone).chunk(2))
        t, g = self.temperature, self.global_negatives
        loss = moco_infonce(q1, k2, t, gather=g) + moco_infonce(q2, k1, t, gather=g)
        return ObjectiveOutput(loss=loss)


@OBJECTIVES.register("simclr", schema=SimCLRConfig)
def build_simclr(cfg) -> SimCLR:
    return SimCLR(cfg)


@OBJECTIVES.register("moco_v3", schema=MoCoV3Config)
def build_moco_v3(cfg) -> MoCoV3:
    return MoCoV3(cfg)


@OBJECTIVES.register("simsiam", schema=SimSiamConfig)
def build_simsiam(cfg) -> SimSiam:
    return SimSiam(cfg)
