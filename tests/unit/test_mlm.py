"""MLM: BERT's 80/10/10 corruption in the workers (statistics, specials, determinism) and the
masked-positions-only head (same loss as transformers' full head)."""

import numpy as np
import pytest
import torch

from sslscale.config import load_config
from sslscale.data.masking import IGNORE_INDEX, MLMDecoder
from sslscale.data.shards import load_manifest
from sslscale.data.stream import decoder_for, eval_batches
from sslscale.objectives import build_objective

from ..conftest import MLM_RECIPE, TINY_BERT


def test_masking_follows_80_10_10_and_never_touches_special_tokens():
    decoder = MLMDecoder(seq_len=512, vocab_size=1000, mask_id=4, special_ids=[0, 2, 3, 4])
    ids = np.random.default_rng(0).integers(5, 1000, size=512)
    ids[0], ids[-1], ids[100:110] = 2, 3, 0  # [CLS] ... [PAD] ... [SEP]
    selected = kept = masked = randomized = 0
    for seed in range(400):
        out, labels = decoder.mask(ids, seed)
        sel = labels != IGNORE_INDEX
        assert not sel[[0, -1, *range(100, 110)]].any()  # specials never selected
        assert (labels[sel] == ids[sel]).all() and (out[~sel] == ids[~sel]).all()
        selected += sel.sum()
        masked += (out[sel] == 4).sum()
        kept += (out[sel] == ids[sel]).sum()
        randomized += ((out[sel] != 4) & (out[sel] != ids[sel])).sum()
    maskable = 400 * (512 - 12)
    assert abs(selected / maskable - 0.15) < 0.005
    assert abs(masked / selected - 0.8) < 0.01
    assert abs(randomized / selected - 0.1) < 0.01  # (a random id equal to the original counts as kept)
    assert abs(kept / selected - 0.1) < 0.01
    a, b = decoder.mask(ids, 7), decoder.mask(ids, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # a pure function of the seed
    assert not np.array_equal(decoder.mask(ids, 8)[1], a[1])


@pytest.fixture(scope="module")
def tiny_mlm(text_shards):
    cfg = load_config(MLM_RECIPE, [f"data.train_shards={text_shards['train']}", *TINY_BERT])
    manifest = load_manifest(text_shards["train"])
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8,
                              decode=decoder_for(cfg, manifest)))
    torch.manual_seed(0)
    return build_objective(cfg), batch, manifest


def test_batches_hold_corrupted_blocks(tiny_mlm):
    _, batch, manifest = tiny_mlm
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (8, manifest.meta["seq_len"])
    special = manifest.meta["special_tokens"]
    assert (ids[:, 0] == special["cls"]).all() and (labels[:, 0] == IGNORE_INDEX).all()
    assert 0 < (labels != IGNORE_INDEX).sum() < labels.numel() * 0.3


def test_masked_only_head_equals_the_full_head(tiny_mlm):
    objective, batch, manifest = tiny_mlm
    objective.eval()  # no dropout: both forwards see the same network
    assert objective.model.config.vocab_size == manifest.meta["vocab_size"]
    ours = objective(batch)
    full = objective.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours.loss, full, atol=1e-6, rtol=1e-6)
    ours.loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters()}
    objective.zero_grad()
    full.backward()
    for n, p in objective.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)
    assert 0.0 <= ours.metrics["mlm_accuracy"] <= 1.0
    assert type(objective.encoder()).__name__ == "BertModel"
