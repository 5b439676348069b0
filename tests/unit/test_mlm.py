"""MLM: BERT's 80/10/10 corruption in the workers (statistics, specials, determinism), the
fixed-size padded prediction slots ``masked_positions`` / ``masked_labels`` (B, K) and the head
on those slots only (same loss as transformers' full head and as a boolean-mask gather, with
static shapes: one graph under ``torch.compile(fullgraph=True)`` with no data-dependent size)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslscale.config import load_config
from sslscale.data.masking import (IGNORE_INDEX, MLMDecoder, masked_positions_of, max_predictions_per_seq,
                                   pad_positions)
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


def bernoulli_mask(decoder: MLMDecoder, ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The corruption before the K slots existed (uncapped): checkpoints resumed across the
    change must see the same masks, so the draws and their use may not move."""
    u = np.random.default_rng(seed).random((3, len(ids)))
    selected = (u[0] < decoder.p) & ~np.isin(ids, decoder.special)
    out = ids.copy()
    out[selected & (u[1] < decoder.p_mask)] = decoder.mask_id
    random = selected & (u[1] >= decoder.p_mask) & (u[1] < decoder.p_mask + decoder.p_random)
    out[random] = (u[2][random] * decoder.vocab_size).astype(np.int64)
    return out, np.where(selected, ids, IGNORE_INDEX)


def test_max_predictions_bound_the_binomial_tail():
    assert [max_predictions_per_seq(n, 0.15) for n in (64, 128, 512)] == [24, 40, 120]
    assert max_predictions_per_seq(16, 0.15) == 16 and max_predictions_per_seq(3, 0.15) == 3  # <= L
    assert max_predictions_per_seq(128, 0.0) == 8 and max_predictions_per_seq(128, 1.0) == 128

    def tail(n, p, k):  # P(Binomial(n, p) > k), exact
        return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1, n + 1))
    for n, p in ((64, 0.15), (128, 0.15), (128, 0.3), (512, 0.15)):
        k = max_predictions_per_seq(n, p)
        assert k % 8 == 0 and tail(n, p, k) <= 1e-5 < tail(n, p, k - 8)
    with pytest.raises(ValueError, match="seq_len=0"):
        max_predictions_per_seq(0, 0.15)


def test_fixed_slots_are_a_pure_function_of_the_seed_and_keep_the_bernoulli_masks():
    decoder = MLMDecoder(seq_len=128, vocab_size=1000, mask_id=4, special_ids=[0, 2, 3, 4])
    assert decoder.max_predictions == 40
    ids = np.random.default_rng(1).integers(5, 1000, size=128)
    ids[0], ids[-1] = 2, 3
    counts = set()
    for seed in range(300):
        ex = decoder.mask_block(ids, seed)
        want_ids, want_labels = bernoulli_mask(decoder, ids, seed)
        np.testing.assert_array_equal(ex["input_ids"].numpy(), want_ids)
        np.testing.assert_array_equal(ex["labels"].numpy(), want_labels)
        pos, tgt = ex["masked_positions"].numpy(), ex["masked_labels"].numpy()
        n = int((want_labels != IGNORE_INDEX).sum())
        counts.add(n)
        assert pos.shape == tgt.shape == (40,) and pos.dtype == tgt.dtype == np.int64
        np.testing.assert_array_equal(pos[:n], np.flatnonzero(want_labels != IGNORE_INDEX))
        np.testing.assert_array_equal(tgt[:n], ids[pos[:n]])
        assert (pos[n:] == 0).all() and (tgt[n:] == IGNORE_INDEX).all()
        again = decoder.mask_block(ids, seed)
        assert all(torch.equal(ex[k], again[k]) for k in ("input_ids", "labels", "masked_positions",
                                                           "masked_labels"))
    assert len(counts) > 10  # different counts, one shape


def test_a_block_over_k_keeps_the_k_smallest_draws_and_counts_truthfully():
    decoder = MLMDecoder(seq_len=64, vocab_size=1000, mask_id=4, special_ids=[0, 2, 3, 4],
                         mlm_probability=0.5, max_predictions=8)
    ids = np.arange(10, 74)
    for seed in range(20):
        out, labels = decoder.mask(ids, seed)
        u = np.random.default_rng(seed).random((3, 64))
        drawn = np.flatnonzero(u[0] < 0.5)
        assert len(drawn) > 8
        kept = np.sort(drawn[np.argsort(u[0][drawn], kind="stable")[:8]])
        np.testing.assert_array_equal(np.flatnonzero(labels != IGNORE_INDEX), kept)
        unkept = np.setdiff1d(np.arange(64), kept)
        assert (out[unkept] == ids[unkept]).all()  # only predicted tokens are corrupted
        ex = decoder.mask_block(ids, seed)
        assert int((ex["masked_labels"] != IGNORE_INDEX).sum()) == 8
    with pytest.raises(ValueError, match="do not fit max_predictions=2"):
        pad_positions(np.array([5, -100, 6, 7]), 2)


def test_positions_from_labels_have_static_shapes():
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, [2, 5]] = torch.tensor([7, 8])
    labels[2, [0, 1, 9]] = torch.tensor([1, 2, 3])
    pos, tgt = masked_positions_of(labels, 4)
    assert pos.shape == tgt.shape == (3, 4)
    assert pos[0, :2].tolist() == [2, 5] and tgt[0].tolist() == [7, 8, -100, -100]
    assert (tgt[1] == IGNORE_INDEX).all() and pos[2, :3].tolist() == [0, 1, 9]
    pos, tgt = masked_positions_of(labels, 12)  # k > L: padded with position 0, label -100
    assert pos.shape == (3, 12) and tgt[:, 10:].eq(IGNORE_INDEX).all() and pos[:, 10:].eq(0).all()


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
    k = max_predictions_per_seq(manifest.meta["seq_len"], 0.15)
    assert batch["masked_positions"].shape == batch["masked_labels"].shape == (8, k)
    # the slots hold exactly the labelled positions: gathering the labels gives masked_labels
    slots = batch["masked_labels"] != IGNORE_INDEX
    assert torch.equal(labels.gather(1, batch["masked_positions"])[slots], batch["masked_labels"][slots])
    assert slots.sum() == (labels != IGNORE_INDEX).sum()


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


def boolean_gather_loss(objective, batch) -> torch.Tensor:
    """The reference: the head on ``hidden[labels != -100]`` (a data-dependent shape)."""
    hidden = objective.model.bert(input_ids=batch["input_ids"]).last_hidden_state
    selected = batch["labels"] != IGNORE_INDEX
    return F.cross_entropy(objective.model.cls(hidden[selected]).float(), batch["labels"][selected])


def test_fixed_slots_loss_equals_the_boolean_gather(tiny_mlm):
    objective, batch, _ = tiny_mlm
    objective.eval()
    ours = objective(batch).loss
    torch.testing.assert_close(ours, boolean_gather_loss(objective, batch), atol=1e-6, rtol=1e-6)
    # a hand-built batch with labels only takes the same slots from them
    plain = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    torch.testing.assert_close(objective(plain).loss, ours, atol=1e-6, rtol=1e-6)
    logits, targets = objective.predict_masked(batch)
    assert len(targets) == (batch["labels"] != IGNORE_INDEX).sum() and (targets != IGNORE_INDEX).all()
    torch.testing.assert_close(F.cross_entropy(logits, targets), ours, atol=1e-6, rtol=1e-6)
    # nothing predicted: a zero loss with a graph, no NaN
    empty = {**batch, "masked_labels": torch.full_like(batch["masked_labels"], IGNORE_INDEX)}
    out = objective(empty)
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.metrics["mlm_accuracy"] == 0.0


def static_graphs(fn, *batches) -> tuple[list[torch.fx.GraphModule], list]:
    """The FX graphs and outputs of ``torch.compile(fn, fullgraph=True, dynamic=False)`` over
    ``batches`` (a recompile is an error). torch 2.13's ``fullgraph`` traces ``nonzero`` /
    boolean indexing as unbacked sizes instead of failing, so callers check the sizes."""
    import torch._dynamo

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = [compiled(b) for b in batches]
    torch._dynamo.reset()
    return graphs, outs


def data_dependent_sizes(gm: torch.fx.GraphModule) -> list[str]:
    bad = []
    for node in gm.graph.nodes:
        val = node.meta.get("example_value")
        vals = val if isinstance(val, (tuple, list)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape):
                bad.append(f"{node.name}: {tuple(v.shape)}")
        if "nonzero" in str(node.target) or "sym_size" in str(node.target):
            bad.append(f"{node.name}: {node.target}")
    return bad


def test_forward_is_one_static_graph_across_masked_counts(tiny_mlm, text_shards):
    objective, first, manifest = tiny_mlm
    objective.eval()
    cfg = load_config(MLM_RECIPE, [f"data.train_shards={text_shards['train']}", *TINY_BERT])
    batches = list(zip(range(3), eval_batches(manifest, rank=0, world_size=1, batch_size=8,
                                              decode=decoder_for(cfg, manifest))))
    batches = [{k: v for k, v in b.items() if k != "sample_seeds"} for _, b in batches]
    counts = {int((b["labels"] != IGNORE_INDEX).sum()) for b in batches}
    assert len(counts) > 1 and len({b["masked_positions"].shape for b in batches}) == 1
    graphs, outs = static_graphs(lambda b: objective(b).loss, *batches)
    assert len(graphs) == 1 and data_dependent_sizes(graphs[0]) == []
    for batch, out in zip(batches, outs):
        torch.testing.assert_close(out, boolean_gather_loss(objective, batch), atol=1e-6, rtol=1e-6)
    # the check bites: the boolean-mask reference traces a data-dependent size
    graphs, _ = static_graphs(lambda b: boolean_gather_loss(objective, b), batches[0])
    assert any(data_dependent_sizes(g) for g in graphs)
