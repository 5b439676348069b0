"""CLM (GPT next-token prediction): the loss is the shifted cross-entropy, the accuracy metric
stays on the device, the data are the blocks uncorrupted, the held-out evaluation's perplexity
and unigram baseline are what they say, and the config picks the gpt2 family."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslscale.config import ConfigError, load_config
from sslscale.data.shards import load_manifest
from sslscale.data.stream import decoder_for, eval_batches
from sslscale.evaluate_lm import clm_eval, unigram_baseline
from sslscale.objectives import build_objective

from ..conftest import CLM_RECIPE, TINY_GPT2

V, L, B = 50, 12, 3


def tiny(*extra: str):
    return load_config(None, ["objective.name=clm", f"model.vocab_size={V}", *TINY_GPT2, *extra])


def test_loss_is_the_shifted_cross_entropy_and_accuracy_a_device_tensor():
    torch.manual_seed(0)
    objective = build_objective(tiny()).eval()
    ids = torch.randint(0, V, (B, L))
    out = objective({"input_ids": ids})
    logits = objective.model(input_ids=ids).logits.float()  # (B, L, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    by_hand = -torch.stack([log_probs[b, t, ids[b, t + 1]] for b in range(B) for t in range(L - 1)]).mean()
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    correct = sum(int(logits[b, t].argmax() == ids[b, t + 1]) for b in range(B) for t in range(L - 1))
    accuracy = out.metrics["next_token_accuracy"]
    assert isinstance(accuracy, torch.Tensor) and not accuracy.requires_grad and accuracy.dim() == 0
    assert accuracy.item() == pytest.approx(correct / (B * (L - 1)))
    out.loss.backward()
    assert objective.model.transformer.wte.weight.grad.abs().sum() > 0


def test_padded_targets_count_nowhere():
    """Right-padded rows (attention_mask 0): the loss and accuracy are those of the real tokens
    alone, the same as the unpadded rows give."""
    torch.manual_seed(0)
    objective = build_objective(tiny()).eval()
    ids = torch.randint(0, V, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 5:] = 0
    out = objective({"input_ids": ids, "attention_mask": mask})
    full, short = objective({"input_ids": ids[:1]}), objective({"input_ids": ids[1:, :5]})
    n_full, n_short = L - 1, 4
    want = (full.loss * n_full + short.loss * n_short) / (n_full + n_short)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    want_acc = (full.metrics["next_token_accuracy"] * n_full + short.metrics["next_token_accuracy"] * n_short)
    assert out.metrics["next_token_accuracy"].item() == pytest.approx(want_acc.item() / (n_full + n_short))


def test_a_perfect_predictor_has_accuracy_one():
    """A block whose every next token is predictable: train a few steps, accuracy reaches 1."""
    torch.manual_seed(0)
    objective = build_objective(tiny())
    ids = torch.arange(L).repeat(B, 1)  # 0, 1, 2, ...: the next token is the position + 1
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    for _ in range(100):
        out = objective({"input_ids": ids})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.metrics["next_token_accuracy"].item() == 1.0


def test_features_and_encoder():
    objective = build_objective(tiny()).eval()  # no dropout
    ids = torch.randint(0, V, (B, L))
    assert type(objective.encoder()).__name__ == "GPT2Model"
    assert objective.features({"input_ids": ids}).shape == (B, 32)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, L // 2:] = 0  # right padding changes nothing before it (causal), mean over the rest
    hidden = objective.encoder()(input_ids=ids[:, :L // 2]).last_hidden_state
    torch.testing.assert_close(objective.features({"input_ids": ids, "attention_mask": mask}),
                               hidden.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_config_picks_gpt2_and_maps_its_sizes(text_shards):
    cfg = load_config(CLM_RECIPE, [f"data.train_shards={text_shards['train']}"])
    assert cfg.objective.name == "clm" and cfg.model.name == "gpt2"
    assert set(cfg.objective) == {"name"}
    config = build_objective(cfg).model.config
    meta = load_manifest(text_shards["train"]).meta
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner, config.n_positions) == \
        (128, 4, 4, 512, 128)
    assert config.vocab_size == meta["vocab_size"] and config._attn_implementation == "sdpa"
    special = meta["special_tokens"]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (special["cls"], special["sep"], special["pad"])
    with pytest.raises(ConfigError, match="'objective.mlm_probability' belongs to objective mlm, not clm"):
        load_config(CLM_RECIPE, ["objective.mlm_probability=0.2"])
    with pytest.raises(ConfigError, match="objective clm runs on model gpt2"):
        load_config(CLM_RECIPE, ["model.name=bert"])


def test_decoder_gives_the_blocks_uncorrupted(text_shards):
    cfg = load_config(CLM_RECIPE, [f"data.train_shards={text_shards['train']}"])
    manifest = load_manifest(text_shards["train"])
    raw = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8, limit=8, decode=lambda s, seed: {
        "ids": torch.from_numpy(np.load(io.BytesIO(s["input_ids.npy"])).astype(np.int64))}))["ids"]
    decoded = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8,
                                decode=decoder_for(cfg, manifest), limit=8))
    assert set(decoded) == {"input_ids", "sample_seeds"}
    assert decoded["input_ids"].dtype == torch.int64 and torch.equal(decoded["input_ids"], raw)
    assert raw.shape == (8, manifest.meta["seq_len"])
    special = manifest.meta["special_tokens"]
    ids = decoded["input_ids"]
    assert (ids[:, 0] == special["cls"]).all() and (ids[:, -1] == special["sep"]).all()
    assert not (decoded["input_ids"] == special["mask"]).any()  # no MLM corruption


def test_unigram_baseline_math():
    counts = torch.tensor([3, 1, 0, 0])
    perplexity, accuracy = unigram_baseline(counts)
    assert perplexity == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert accuracy == 0.75
    assert unigram_baseline(torch.tensor([0, 5, 0])) == (pytest.approx(1.0), 1.0)  # one token: certain
    with pytest.raises(ValueError, match="no tokens"):
        unigram_baseline(torch.zeros(3))


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1 / V: perplexity exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def next_token_logits(self, batch):
        ids = batch["input_ids"]
        return torch.zeros(*ids[:, :-1].shape, self.vocab), ids[:, 1:]


def test_held_out_perplexity_of_a_uniform_model_is_the_vocabulary_size(text_shards):
    cfg = load_config(CLM_RECIPE, [f"data.train_shards={text_shards['train']}"])
    held_out = load_manifest(text_shards["val"])
    vocab = held_out.meta["vocab_size"]
    result = clm_eval(Uniform(vocab), held_out, decoder_for(cfg, held_out), device="cpu",
                      batch_size=16, limit=40)
    assert result["clm_perplexity"] == pytest.approx(vocab, rel=1e-5)  # float32 log-softmax
    assert result["clm_accuracy"] == 0.0  # argmax of ties is id 0 ([PAD]), never a target
    assert result["num_predicted_tokens"] == 40 * (held_out.meta["seq_len"] - 1)
    assert 1.0 < result["unigram_perplexity"] < vocab and 0.0 < result["unigram_accuracy"] < 1.0
