"""Supervised fine-tuning of a pretrained image or text encoder (``objective.name: classify``).

The fine-tuning recipe of MAE (He et al. 2022, arXiv 2111.06377, appendix A.3) and BEiT (Bao et
al. 2021, arXiv 2106.08254): the pretrained ViT encoder (``train.init_from``: any image
pretraining checkpoint of sslscale, MAE or contrastive; its heads and decoder are left behind)
plus a new linear head on the pooled representation (``objective.pooling``: ``mean`` of the patch
tokens behind a LayerNorm, MAE's choice, or the ``cls`` token), trained end to end on the shards'
labels with label-smoothed cross-entropy (``objective.label_smoothing``), random resized crop +
flip, drop path (``objective.drop_path_rate``: ``DropPath``), warmup + cosine, and layer-wise
learning-rate decay (``optim.layer_decay``: block ``i`` of ``L`` gets ``layer_decay ** (L + 1 -
i)`` of the learning rate, the embeddings ``layer_decay ** (L + 1)``, the head 1;
``sslscale.engine.param_groups``). Without ``train.init_from`` it is the from-scratch baseline of
the same architecture and budget. Not applied: RandAugment, mixup / cutmix.

Text (the training shards' manifest has ``modality: text``, from ``sslscale data prepare text
--labels``): the encoder is a ``BertModel`` (BERT's fine-tuning, Devlin et al. 2019, section 4:
the ``[CLS]`` token's last hidden state, ``objective.pooling: cls``, or the mean over attended
tokens), loaded from an MLM run's ``model.bert.*``; no augmentation.

The batch: ``pixel_values`` uint8 ``(B, C, H, W)`` (images) or ``input_ids`` ``(B, L)`` int64 +
``attention_mask`` ``(B, L)`` (text, 0 at padding), ``labels`` ``(B,)`` int64 in ``[0,
objective.num_classes)`` (``-1``: no label, ignored), ``sample_seeds`` ``(B,)`` (optional).
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import BertModel, ViTModel

from sslscale.config_schema import ClassifyConfig
from sslscale.data.augment import DROP_PATH, ViewAugment, ViewConfig, random_seeds, uniform
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.contrastive import vit_config
from sslscale.objectives.mlm import bert_config, mean_over_tokens
from sslscale.registry import OBJECTIVES

# An encoder block's parameters: ``backbone.layers.N.`` (transformers 5) or
# ``backbone.encoder.layer.N.`` (transformers 4).
_BLOCK = re.compile(r"backbone\.(?:encoder\.layer|layers)\.(\d+)\.")
# Where each pretraining objective keeps its encoder in its state dict, by modality.
ENCODER_PREFIXES = {"image": {"model.vit.": "mae", "backbone.": "simclr / moco_v3 / simsiam / classify"},
                    "text": {"model.bert.": "mlm", "backbone.": "classify"}}
# The last linear layer of an encoder block's two residual branches (attention, MLP):
# transformers 5's ViT (``layers.N``), BERT (``encoder.layer.N``).
_BRANCH_ENDS = (("attention.o_proj", "mlp.fc2"), ("attention.output.dense", "output.dense"))


class DropPath(nn.Module):
    """Stochastic depth on an encoder's residual branches (Huang et al. 2016, arXiv 1603.09382),
    as DeiT and MAE fine-tune a ViT (timm's ``DropPath``): inside ``sampled(seeds)``, block ``i``
    of ``L`` drops each of its two branches (attention, MLP) of each sample with probability
    ``drop_path_rate * i / (L - 1)`` and scales the kept ones by ``1 / (1 - that)``. A forward
    hook scales the output ``(B, tokens, hidden)`` of the branch's last linear layer
    (``_BRANCH_ENDS``) per sample; the dropout and residual add after it are transformers' own.
    The draws are a pure function of the samples' seeds (tag ``DROP_PATH``), so elastic resume
    stays exact. Raises ``ValueError`` for blocks without a known branch end."""

    def __init__(self, blocks: Sequence[nn.Module], drop_path_rate: float):
        super().__init__()
        depth = len(blocks)
        rates = torch.tensor([drop_path_rate * i / max(1, depth - 1) for i in range(depth)])
        self.register_buffer("rates", rates.repeat_interleave(2), persistent=False)  # (2 L,)
        self.scales: torch.Tensor | None = None  # (B, 2 L) inside sampled()
        for i, block in enumerate(blocks):
            modules = dict(block.named_modules())
            ends = next((e for e in _BRANCH_ENDS if all(name in modules for name in e)), None)
            if ends is None:
                raise ValueError(f"drop path: encoder block {i} ({type(block).__name__}) has none "
                                 f"of the branch ends {_BRANCH_ENDS}")
            for j, name in enumerate(ends):
                modules[name].register_forward_hook(self._hook(2 * i + j))

    def _hook(self, column: int):
        def scale(module, inputs, output):
            if self.scales is None:
                return None
            return output * self.scales[:, column, None, None].to(output.dtype)
        return scale

    @contextmanager
    def sampled(self, seeds: torch.Tensor) -> Iterator[None]:
        """Drop branches for the samples of ``seeds`` ``(B,)`` int64 in forwards inside."""
        keep = uniform(seeds.to(self.rates.device), len(self.rates), DROP_PATH) >= self.rates
        self.scales = keep.float() / (1 - self.rates)
        try:
            yield
        finally:
            self.scales = None


def train_modality(cfg) -> str:
    """``text`` or ``image``: the modality of ``data.train_shards`` (its manifest; ``image``
    when unset, as in a model built without data)."""
    from sslscale.data.shards import load_manifest_for

    if not cfg.data.train_shards:
        return "image"
    return load_manifest_for("data.train_shards", cfg.data.train_shards).modality


class ClassifyObjective(nn.Module):
    """A ViT (``modality="image"``) or BERT (``"text"``) encoder + linear head; ``forward``
    returns the label-smoothed cross-entropy (scalar) and ``top1`` (fraction of the micro-batch
    classified right) as a metric. ``logits(batch)``: ``(B, num_classes)`` of un-augmented
    inputs; ``features(batch)``: the pooled representation ``(B, hidden_size)`` (kNN, probes).
    ``layer_id(name)`` numbers parameters for layer-wise lr decay."""

    def __init__(self, cfg, modality: str = "image"):
        super().__init__()
        if cfg.objective.num_classes < 2:
            from sslscale.config import ConfigError
            raise ConfigError("key 'objective.num_classes' must be >= 2 for classify (0 takes it "
                              "from the training shards' manifest, meta.classes)")
        hidden = cfg.model.hidden_size
        self.modality = modality
        if modality == "text":
            self.backbone = BertModel(bert_config(cfg), add_pooling_layer=False)
        else:
            self.backbone = ViTModel(vit_config(cfg), add_pooling_layer=False)
        self.pooling = cfg.objective.pooling
        self.fc_norm = nn.LayerNorm(hidden, eps=1e-6) if self.pooling == "mean" else nn.Identity()
        self.head = nn.Linear(hidden, cfg.objective.num_classes)
        with torch.no_grad():  # MAE's fine-tuning head: trunc_normal(std=2e-5), zero bias
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        if modality == "image":  # text: no augmentation (and no model.image_size)
            view = ViewConfig(crop_scale=tuple(cfg.objective.crop_scale), hflip=cfg.objective.hflip)
            self.transform = ViewAugment(cfg.model.image_size, cfg.data.mean, cfg.data.std, [view])
        self.label_smoothing = cfg.objective.label_smoothing
        self.num_layers = cfg.model.num_hidden_layers
        rate = cfg.objective.drop_path_rate
        self.drop_path = DropPath(self.blocks(), rate) if rate > 0 else None

    def blocks(self) -> nn.ModuleList:
        """The encoder's transformer blocks, input side first."""
        return self.backbone.encoder.layer if self.modality == "text" else self.backbone.layers

    def _dropping(self, batch: dict[str, torch.Tensor], train: bool):
        """``DropPath.sampled`` for the batch's ``sample_seeds`` (or seeds drawn from torch's RNG)
        when ``train`` and drop path is on; else a context that does nothing."""
        if not train or self.drop_path is None:
            return nullcontext()
        seeds = batch.get("sample_seeds")
        inputs = batch["input_ids" if self.modality == "text" else "pixel_values"]
        return self.drop_path.sampled(random_seeds(len(inputs), inputs.device) if seeds is None else seeds)

    def _pooled(self, batch: dict[str, torch.Tensor], train: bool = False) -> torch.Tensor:
        """The pooled representation ``(B, hidden_size)`` of a batch (when ``train``: images
        augmented and branches dropped, with the batch's ``sample_seeds``)."""
        with self._dropping(batch, train):
            if self.modality == "text":
                mask = batch.get("attention_mask")
                hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
                return hidden[:, 0] if self.pooling == "cls" else mean_over_tokens(hidden, mask).to(hidden.dtype)
            x = self.transform(batch["pixel_values"], batch.get("sample_seeds"), augment=train)
            dtype = self.backbone.embeddings.patch_embeddings.projection.weight.dtype
            hidden = self.backbone(pixel_values=x.to(dtype)).last_hidden_state
            return hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        logits = self.head(self.fc_norm(self._pooled(batch, train=self.training)))
        loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1,
                                           label_smoothing=self.label_smoothing)
        labeled = (labels >= 0).sum().clamp(min=1)
        top1 = ((logits.argmax(1) == labels) & (labels >= 0)).sum() / labeled
        return ObjectiveOutput(loss=loss, metrics={"top1": top1.detach()})

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.fc_norm(self._pooled(batch))).float()

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._pooled(batch).float()

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
        """Load the encoder of a pretraining objective's ``state`` (images: MAE's
        ``model.vit.*``, the contrastive objectives' ``backbone.*``; text: MLM's
        ``model.bert.*``); heads, decoders and momentum encoders are left out, and this head
        stays new. Raises ``ValueError`` naming ``source`` when ``state`` has no encoder of this
        modality, or one whose weights do not fit this architecture."""
        prefixes = ENCODER_PREFIXES[self.modality]
        for prefix in prefixes:
            encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if encoder:
                break
        else:
            raise ValueError(f"{source}: no {self.modality} encoder weights (keys starting with "
                             f"{' or '.join(prefixes)}); is it a {self.modality} pretraining run?")
        own = self.backbone.state_dict()
        wrong = [k for k, v in encoder.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in encoder]
        if wrong or missing:
            raise ValueError(f"{source}: its encoder does not fit model.* of this run: "
                             + (f"shapes differ for {wrong[:3]}" if wrong else f"missing {missing[:3]}"))
        self.backbone.load_state_dict({k: v for k, v in encoder.items() if k in own})


@OBJECTIVES.register("classify", schema=ClassifyConfig)
def build_classify(cfg) -> ClassifyObjective:
    """A ``bert`` (``model.name``) on text or a ``vit`` on images; ``ConfigError`` when
    ``data.train_shards`` holds the other modality."""
    modality = "text" if cfg.model.name == "bert" else "image"
    if cfg.data.train_shards and train_modality(cfg) != modality:
        from sslscale.config import ConfigError

        raise ConfigError(f"key 'model.name' = {cfg.model.name!r}: data.train_shards = "
                          f"{cfg.data.train_shards} holds {train_modality(cfg)} shards")
    return ClassifyObjective(cfg, modality)
