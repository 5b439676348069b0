"""GPT-style causal language modeling: next-token prediction on packed token blocks.

Follows Radford et al., "Improving Language Understanding by Generative Pre-Training" (GPT,
2018) and "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019): a decoder-only
transformer maximizes ``sum_t log p(x_t | x_<t)``. The model is transformers'
``GPT2LMHeadModel`` (attention from ``model.attn_implementation``, SDPA by default; sizes from
the recipe's ``model`` section; the vocabulary from the data's tokenizer as for MLM), its output
projection tied to the token embeddings as in GPT-2.

The data are the MLM token blocks (``sslscale data prepare text``: ``[CLS] ... [SEP]`` of
``seq_len`` tokens, documents packed with ``[SEP]`` between them, no padding), read uncorrupted
(``sslscale.data.text.TokenBlockDecoder``). The loss is the mean cross-entropy of the logits at
positions ``0 .. L-2`` against the tokens at ``1 .. L-1`` (every block is full: no padding, no
ignored label); the ``[SEP]`` document separators are predicted like any other token (GPT-2's
``<|endoftext|>``). The export is the ``GPT2LMHeadModel`` itself (``pipeline("text-generation")``;
``AutoModel`` loads its ``GPT2Model``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from sslscale.config_schema import CLMConfig
from sslscale.objectives.base import ObjectiveOutput
from sslscale.objectives.mlm import mean_over_tokens, vocab_size_for
from sslscale.registry import OBJECTIVES


def special_token_ids(cfg) -> dict[str, int | None]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` from the training manifest's
    tokenizer (``[CLS]``, ``[SEP]``, ``[PAD]``), so that ``generate`` stops at a document's end;
    None each when ``data.train_shards`` is no text manifest (``model.vocab_size`` given by
    hand), not GPT-2's 50256."""
    from sslscale.config import ConfigError
    from sslscale.data.shards import load_manifest_for

    try:
        special = load_manifest_for("data.train_shards", cfg.data.train_shards).meta.get("special_tokens", {})
    except ConfigError:
        special = {}
    names = {"bos_token_id": "cls", "eos_token_id": "sep", "pad_token_id": "pad"}
    return {key: None if special.get(name) is None else int(special[name]) for key, name in names.items()}


def gpt2_config(cfg) -> GPT2Config:
    """The ``GPT2Config`` of the recipe's ``model`` section (``model.name: gpt2``)."""
    m = cfg.model
    return GPT2Config(vocab_size=vocab_size_for(cfg), n_positions=m.max_position_embeddings,
                      n_embd=m.hidden_size, n_layer=m.num_hidden_layers, n_head=m.num_attention_heads,
                      n_inner=m.intermediate_size, attn_implementation=m.attn_implementation,
                      **special_token_ids(cfg))


IGNORE = -100  # the target of a padded position: F.cross_entropy's default ignore_index


def shifted_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits[:, :-1] (B, L-1, V) float32, input_ids[:, 1:] (B, L-1))``: each position's
    prediction beside the token that follows it; a padded target (``attention_mask[:, 1:] ==
    0``) is ``IGNORE``."""
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return logits[:, :-1].float(), targets


class CLMObjective(nn.Module):
    """Next-token prediction on ``batch["input_ids"]`` ``(B, L)`` int64, ``L >= 2`` (optional
    ``attention_mask`` ``(B, L)``: padded hand-built or labeled batches, whose padded targets
    count nowhere; training blocks have none). ``forward``: the mean cross-entropy over the
    ``B x (L-1)`` predicted tokens (scalar),
    metric ``train/next_token_accuracy`` (detached, on the device: no host sync). ``features``:
    the mean of the last hidden states over attended tokens ``(B, hidden_size)``. Raises
    ``ConfigError`` (building) when the vocabulary size is unknown."""

    def __init__(self, cfg):
        super().__init__()
        self.model = GPT2LMHeadModel(gpt2_config(cfg))

    def next_token_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, L-1, vocab_size) float32, targets (B, L-1))`` of ``batch``."""
        mask = batch.get("attention_mask")
        logits = self.model(input_ids=batch["input_ids"], attention_mask=mask).logits
        return shifted_logits(logits, batch["input_ids"], mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits, targets = self.next_token_logits(batch)
        logits, targets = logits.flatten(0, 1), targets.flatten()
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
        correct = (logits.detach().argmax(dim=-1) == targets).sum()
        accuracy = correct / (targets != IGNORE).sum().clamp(min=1)
        return ObjectiveOutput(loss=loss, metrics={"next_token_accuracy": accuracy})

    def encoder(self) -> nn.Module:
        return self.model.transformer

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return mean_over_tokens(self.model.transformer(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state, mask)


@OBJECTIVES.register("clm", schema=CLMConfig)
def build_clm(cfg) -> CLMObjective:
    return CLMObjective(cfg)
