"""BERT-style masked language modeling (Devlin et al. 2019, arXiv 1810.04805).

The model is transformers' ``BertForMaskedLM`` (SDPA attention; sizes from the recipe's
``model`` section, the vocabulary from the data's tokenizer). Inputs arrive already corrupted
by the data workers (``sslscale.data.masking``). The prediction head runs on the masked
positions only (as NVIDIA's ``dense_seq_output`` and MosaicBERT): hidden states ``(B, L, H)``
are gathered to ``(K, H)`` for the K predicted tokens before the transform + vocabulary
projection, which gives the same loss as the full head at ~K/(B*L) of its FLOPs and memory.
The export is the ``BertForMaskedLM`` itself (encoder and trained head; ``AutoModel`` loads its ``BertModel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from sslscale.data.masking import IGNORE_INDEX
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


def bert_config(cfg) -> BertConfig:
    m = cfg.model
    return BertConfig(vocab_size=vocab_size_for(cfg), hidden_size=m.hidden_size,
                      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                      intermediate_size=m.intermediate_size,
                      max_position_embeddings=m.max_position_embeddings,
                      attn_implementation=m.attn_implementation)


class MLMObjective(nn.Module):
    """MLM on ``batch["input_ids"]`` ``(B, L)`` with ``batch["labels"]`` ``(B, L)`` (-100 = not
    predicted) and optional ``attention_mask``. ``forward`` returns the mean cross-entropy over
    predicted tokens and ``mlm_accuracy``; ``features`` the mean of the last hidden states over
    attended tokens ``(B, hidden_size)``."""

    def __init__(self, cfg):
        super().__init__()
        self.model = BertForMaskedLM(bert_config(cfg))

    def predict_masked(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(K, vocab_size)`` (float32) and targets ``(K,)`` of the K predicted tokens."""
        hidden = self.model.bert(input_ids=batch["input_ids"],
                                 attention_mask=batch.get("attention_mask")).last_hidden_state
        selected = batch["labels"] != IGNORE_INDEX
        return self.model.cls(hidden[selected]).float(), batch["labels"][selected]

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits, targets = self.predict_masked(batch)
        if len(targets) == 0:  # nothing masked in this micro-batch: a zero loss that keeps the graph
            return ObjectiveOutput(loss=logits.sum() * 0.0, metrics={"mlm_accuracy": logits.new_zeros(())})
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"mlm_accuracy": accuracy})

    def encoder(self) -> nn.Module:
        return self.model.bert

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        hidden = self.model.bert(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        if mask is None:
            return hidden.mean(dim=1).float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)).float()


@OBJECTIVES.register("mlm")
def build_mlm(cfg) -> MLMObjective:
    return MLMObjective(cfg)
