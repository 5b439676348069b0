"""The model card's evaluation table and ``model-index``: linear-probe and fine-tuning rows from
``RUN_DIR/eval/linear-*.json`` / ``finetune-*.json``, for image and MLM runs, only where measured."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from sslscale.config import load_config
from sslscale.modelcard import _eval_rows, card_facts, render_card

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
RUNS = {  # kind: (overrides, model, classification task of the labeled data)
    "image": ([], lambda: ViTModel(ViTConfig(image_size=28, patch_size=7, num_channels=1, **SMALL)),
              "image-classification"),
    "mlm": (["objective.name=mlm"],
            lambda: BertModel(BertConfig(vocab_size=64, max_position_embeddings=64, **SMALL)),
            "text-classification"),
}


def _write_evals(run_dir, *, baseline=True, finetuned=True):
    (run_dir / "eval").mkdir(exist_ok=True)
    for step, top1 in [(4, 0.8125), (2, 0.5)]:  # the card's step wins over another probe
        probe = {"step": step, "linear_top1": top1, "num_train": 1200, "num_test": 300, "epochs": 90,
                 "train_shards": "/data/l/train", "test_shards": "/data/l/test",
                 "protocol": "linear probe (MAE)"}
        if baseline:
            probe["random_init_linear_top1"] = 0.3
        (run_dir / "eval" / f"linear-step-{step:08d}.json").write_text(json.dumps(probe) + "\n")
    tuned = {"run_dir": str(run_dir), "step": 4, "steps": 500, "train_shards": "/data/l/train",
             "test_shards": "/data/l/test", "scratch_top1": 0.6, "num_test": 300,
             "scratch_run_dir": str(run_dir / "finetune-scratch")}
    if finetuned:
        tuned.update(finetune_top1=0.9375, finetune_run_dir=str(run_dir / "finetune"))
    (run_dir / "eval" / "finetune-step-00000004.json").write_text(json.dumps(tuned) + "\n")


def _card(run_dir, kind):
    overrides, model, _ = RUNS[kind]
    (run_dir / "manifest.json").write_text("{}")
    facts = card_facts(run_dir, load_config(None, overrides), step=4, client={},
                       marker={"world_size": 1, "zero_stage": 0}, model=model(),
                       manifest=SimpleNamespace(source="fashion-mnist", license="MIT", num_samples=64,
                                                shards=["s0"]),
                       manifest_file=run_dir / "manifest.json", round_trip_diff=0.0, repo_id=None,
                       published_class="ViTModel" if kind == "image" else "BertModel")
    card = render_card(facts)
    return card, yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]


@pytest.mark.parametrize("kind", list(RUNS))
def test_card_shows_linear_probe_and_finetuning_where_measured(tmp_path, kind):
    card, results = _card(tmp_path, kind)
    assert "linear probe top-1" not in card and "fine-tuned top-1" not in card
    assert ("| kNN top-1 | not measured |" in card) == (kind == "image")  # unchanged kNN row

    _write_evals(tmp_path)
    card, results = _card(tmp_path, kind)
    noun = "images" if kind == "image" else "paragraphs"
    assert ("| linear probe top-1 | 0.8125 | 0.3000 (same architecture at random init) | linear probe "
            f"(MAE): 1,200 labeled training {noun}, 300 test {noun}, 90 epochs, step 4 |") in card
    assert ("| fine-tuned top-1 | 0.9375 | 0.6000 (same architecture from scratch, same recipe and 500 "
            "steps) | all weights fine-tuned from step 4 for 500 steps") in card
    assert f"300 test {noun} of the shards `test`" in card
    # model-index: one result per task type, dataset and split, named by all its methods
    [classify] = [r for r in results if r["task"]["type"] == RUNS[kind][2]]
    assert classify["dataset"]["name"] == "Fashion-MNIST"  # labeled shards gone: the training source
    assert {m["name"]: m["value"] for m in classify["metrics"]} == {"linear probe top-1": 0.8125,
                                                                   "fine-tuned top-1": 0.9375}
    assert classify["task"]["name"] == "Linear probe of frozen features; Fine-tuning"
    assert [r["task"]["type"] for r in results] == [RUNS[kind][2]]  # kNN / MLM: not measured

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/knn_top1": 0.75,
                                                        "eval/mlm_accuracy": 0.25}) + "\n")
    names = {r["task"]["type"]: (r["task"]["name"], [m["name"] for m in r["metrics"]])
             for r in _card(tmp_path, kind)[1]}
    assert names == ({"image-classification": (
        "kNN classification of frozen features; Linear probe of frozen features; Fine-tuning",
        ["kNN top-1", "linear probe top-1", "fine-tuned top-1"])} if kind == "image" else {
        "fill-mask": ("Masked Language Modeling", ["masked-token accuracy (held-out)"]),
        "text-classification": ("Linear probe of frozen features; Fine-tuning",
                                ["linear probe top-1", "fine-tuned top-1"])})


def test_rows_without_a_baseline_or_a_finetuned_run_say_not_measured(tmp_path):
    cfg = load_config(None, [])
    assert [r["metric"] for r in _eval_rows(tmp_path, cfg, 4)] == ["kNN top-1"]
    _write_evals(tmp_path, baseline=False, finetuned=False)
    linear, tuned = _eval_rows(tmp_path, cfg, 4)[1:]
    assert linear["baseline"] == "not measured (run `sslscale eval linear RUN_DIR --baseline`)"
    assert linear["raw"] == 0.8125 and "step 4" in linear["protocol"]
    assert tuned["value"].startswith("not measured") and tuned["raw"] is None  # not in the model-index
    assert tuned["baseline"].startswith("0.6000 (same architecture from scratch")
    at_2 = _eval_rows(tmp_path, cfg, 2)
    assert [r["metric"] for r in at_2][1:] == ["linear probe top-1", "fine-tuned top-1"]
    assert at_2[1]["value"] == "0.5000"  # the probe of the card's step
