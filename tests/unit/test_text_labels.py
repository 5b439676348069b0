"""Labeled text for fine-tuning and linear probing (``data prepare text --labels section``):
paragraphs of real documentation labeled by section, held out by whole documents (the MLM data's
held-out documents), and the BERT classifier that reads them."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from sslscale.config import load_config
from sslscale.data.shards import load_manifest
from sslscale.data.corpus import Document
from sslscale.data.stream import eval_batches
from sslscale.data.text import LabeledTextDecoder, document_section, paragraphs, section_classes
from sslscale.objectives import build_objective

from ..conftest import TINY_BERT


def _documents(folder) -> list[str]:
    return (folder / "documents.txt").read_text().split()


def test_labels_come_from_held_out_documents_only(labeled_text_shards):
    s = labeled_text_shards
    train, val = _documents(s["labeled_train"]), _documents(s["labeled_val"])
    assert train and val and not set(train) & set(val)  # no document in both splits
    assert val == _documents(s["val"])  # the documents the MLM data held out
    assert len(train) + len(val) == 18
    meta = load_manifest(s["labeled_val"]).meta
    assert meta["classes"] == ["c-api", "howto", "tutorial"] and meta["labels"] == "section"
    train_meta = load_manifest(s["labeled_train"]).meta
    assert train_meta["tokenizer_sha256"] == load_manifest(s["train"]).meta["tokenizer_sha256"]
    # every held-out paragraph's label is its document's section: count them from the pages
    want = np.zeros(3, int)
    for key in val:
        text = (s["docs"] / key).read_text()
        want[meta["classes"].index(document_section(key))] += len(paragraphs(text))
    assert meta["class_counts"] == want.tolist() and sum(want) == load_manifest(s["labeled_val"]).num_samples


def test_paragraphs_decode_padded_with_their_label(labeled_text_shards):
    manifest = load_manifest(labeled_text_shards["labeled_val"])
    special = manifest.meta["special_tokens"]
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=64,
                              decode=LabeledTextDecoder.for_manifest(manifest)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (64, 64) and (ids[:, 0] == special["cls"]).all()
    lengths = mask.sum(1)
    assert (ids.gather(1, (lengths - 1)[:, None]) == special["sep"]).all()  # [SEP] ends each paragraph
    assert ((ids == special["pad"]) == (mask == 0)).all() and (lengths < 64).any()
    assert set(batch["labels"].tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="no labeled text"):
        LabeledTextDecoder.for_manifest(load_manifest(labeled_text_shards["val"]))


def test_sections_and_paragraphs():
    assert document_section("library/os.rst.txt") == "library"
    assert document_section("1:howto/sockets.rst.txt") == "howto"  # several inputs: prefix dropped
    assert document_section("glossary.rst.txt") is None
    docs = [Document(f"{s}/{i}.rst", "x") for s, n in (("a", 5), ("b", 6), ("c", 4)) for i in range(n)]
    assert section_classes(docs + [Document("root.rst", "x")]) == ["a", "b"]  # c: < 5 documents
    with pytest.raises(ValueError, match="labels need two"):
        section_classes(docs[:5])
    assert paragraphs("Title\n=====\n\nOne two three four five six seven eight.\n  \nshort one") == [
        "One two three four five six seven eight."]


def test_text_classifier_loads_the_mlm_encoder_and_pools_cls(labeled_text_shards):
    s = labeled_text_shards
    common = [*TINY_BERT, "model.vocab_size=0"]
    torch.manual_seed(1)
    mlm = build_objective(load_config(None, [*common, f"data.train_shards={s['train']}", "objective.name=mlm"]))
    torch.manual_seed(2)
    cfg = load_config(None, [*common, f"data.train_shards={s['labeled_train']}", "objective.name=classify",
                             "objective.num_classes=3", "objective.label_smoothing=0"])
    objective = build_objective(cfg).eval()
    objective.load_pretrained(mlm.state_dict())
    want = mlm.model.bert.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in objective.backbone.state_dict().items())
    manifest = load_manifest(s["labeled_val"])
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=8,
                              decode=LabeledTextDecoder.for_manifest(manifest)))
    out = objective(batch)
    hidden = objective.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = objective.head(hidden.last_hidden_state[:, 0])  # the [CLS] token
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, batch["labels"]))
    torch.testing.assert_close(objective.logits(batch), logits)
    # layer-wise lr decay numbers BERT's blocks as ViT's
    ids = {objective.layer_id(n) for n, _ in objective.named_parameters()}
    assert ids == set(range(cfg.model.num_hidden_layers + 2))
    with pytest.raises(ValueError, match="no text encoder weights"):
        objective.load_pretrained({"model.vit.embeddings.cls_token": torch.zeros(1)}, source="ckpt-z")
