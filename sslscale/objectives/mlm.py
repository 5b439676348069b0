"""BERT-style masked language modeling (Devlin et al. 2019, arXiv 1810.04805).

The model is transformers' ``BertForMaskedLM`` (SDPA attention; sizes from the recipe's
``model`` section, the vocabulary from the data's tokenizer). Inputs arrive already corrupted
by the data workers (``sslscale.data.masking``), with the predicted positions as a fixed-size
padded list ``masked_positions`` / ``masked_labels`` ``(B, K)`` (NVIDIA DeepLearningExamples
BERT's ``masked_lm_positions`` padded to ``max_predictions_per_seq``). The prediction head runs
on those K rows per block only (as NVIDIA's ``dense_seq_output`` and MosaicBERT): hidden states
``(B, L, H)`` are gathered to ``(B, K, H)`` before the transform + vocabulary projection, and the
cross-entropy ignores the padding (-100). Every shape is static: no boolean-mask gather, no host
sync, no ``torch.compile`` graph break; the loss equals the full head's on the same tokens.
The export is the ``BertForMaskedLM`` itself (encoder and trained head; ``AutoModel`` loads its ``BertModel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from sslscale.config_schema import MLMConfig
from sslscale.data.masking import IGNORE_INDEX, masked_positions_of
from sslscale.objectives.base import ObjectiveOutput
from sslscale.registry import OBJECTIVES


def vocab_size_for(cfg) -> int:
    """``model.vocab_size``, or (0) the training data's tokenizer size from its manifest."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from sslscale.config import ConfigError
    from sslscale.data.shards import load_manifest_for

    meta = load_manifest_for("data.train_shards", cfg.data.train_shards).meta
    if "vocab_size" not in meta:
        raise ConfigError(f"key 'data.train_shards' = {cfg.data.train_shards}: not a text manifest "
                          "(no vocab_size); set model.vocab_size or prepare text shards")
    return int(meta["vocab_size"])


def mean_over_tokens(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float32 ``(B, H)``: the mean of ``hidden`` ``(B, L, H)`` over the tokens ``mask`` ``(B, L)``
    attends (all of them when None)."""
    if mask is None:
        return hidden.mean(dim=1).float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)).float()


def bert_config(cfg) -> BertConfig:
    m = cfg.model
    return BertConfig(vocab_size=vocab_size_for(cfg), hidden_size=m.hidden_size,
                      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                      intermediate_size=m.intermediate_size,
                      max_position_embeddings=m.max_position_embeddings,
                      attn_implementation=m.attn_implementation)


class MLMObjective(nn.Module):
    """MLM on ``batch["input_ids"]`` ``(B, L)`` with ``batch["masked_positions"]`` and
    ``batch["masked_labels"]`` ``(B, K)`` int64 (-100 = padding slot) and optional
    ``attention_mask``; a batch with only ``labels`` ``(B, L)`` (-100 = not predicted; hand-built
    batches) gets its positions from them at the cost of one host sync. ``forward`` returns the
    mean cross-entropy over predicted tokens (0 when none) and ``mlm_accuracy``; ``features``
    the mean of the last hidden states over attended tokens ``(B, hidden_size)``."""

    def __init__(self, cfg):
        super().__init__()
        self.model = BertForMaskedLM(bert_config(cfg))

    def masked_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, K, vocab_size)`` (float32) and targets ``(B, K)`` (-100 = padding) of the
        K prediction slots per block; static shapes when the batch has ``masked_positions``."""
        hidden = self.model.bert(input_ids=batch["input_ids"],
                                 attention_mask=batch.get("attention_mask")).last_hidden_state
        if "masked_positions" in batch:
            positions, targets = batch["masked_positions"], batch["masked_labels"]
        else:  # hand-built batch: K = the largest count of a row (one host sync)
            labels = batch["labels"]
            k = int((labels != IGNORE_INDEX).sum(dim=1).max()) if labels.numel() else 0
            positions, targets = masked_positions_of(labels, k)
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.model.cls(hidden.gather(1, index)).float(), targets

    def predict_masked(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, vocab_size)`` (float32) and targets ``(N,)`` of the N predicted tokens,
        in batch then position order (evaluation and export checks: N is data-dependent)."""
        logits, targets = self.masked_logits(batch)
        keep = targets != IGNORE_INDEX
        return logits[keep], targets[keep]

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits, targets = self.masked_logits(batch)
        logits, targets = logits.flatten(0, 1), targets.flatten()
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp_min(1)  # nothing predicted: a zero loss that keeps the graph
        losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        correct = (logits.detach().argmax(dim=-1) == targets) & valid
        return ObjectiveOutput(loss=losses.sum() / count,
                               metrics={"mlm_accuracy": correct.sum().float() / count})

    def encoder(self) -> nn.Module:
        return self.model.bert

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return mean_over_tokens(self.model.bert(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state, mask)


@OBJECTIVES.register("mlm", schema=MLMConfig)
def build_mlm(cfg) -> MLMObjective:
    return MLMObjective(cfg)
