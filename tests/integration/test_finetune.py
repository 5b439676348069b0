"""Fine-tuning on real labeled shards: a pretraining run's encoder (MAE on images, MLM on text)
fine-tuned with the ``classify`` objective beside a from-scratch run of the same recipe
(``sslscale.finetune``), linear probes and kNN of it, and the errors a user meets first (shards
without classes, shards of the other modality)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import DEMO_RECIPE, MLM_RECIPE, ROOT, sslscale_cmd, tiny_overrides, tiny_text_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pretrained(real_shards, tmp_path_factory):
    """A 4-step tiny MAE pretraining run."""
    run_dir = tmp_path_factory.mktemp("finetune") / "pretrain"
    done = subprocess.run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, run_dir, "train.max_steps=4", "eval.train_shards=null", "eval.test_shards=null")),
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_pretrained_encoder_is_fine_tuned_beside_from_scratch(pretrained, real_shards):
    from sslscale.checkpoint import load_module_state

    run_dir = pretrained
    done = subprocess.run(sslscale_cmd(
        "eval", "finetune", str(run_dir), "--train-shards", str(real_shards["train"]),
        "--test-shards", str(real_shards["test"]), "--steps", "6", "--set", "eval.max_test_samples=64",
        "--set", "data.num_workers=1"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line; the runs' own lines went to stderr
    result = json.loads(lines[0])
    assert 0 <= result["finetune_top1"] <= 1 and 0 <= result["scratch_top1"] <= 1
    assert result["step"] == 4 and result["num_test"] == 64
    assert json.loads((run_dir / "eval" / "finetune-step-00000004.json").read_text()) == result
    tuned, scratch = run_dir / "finetune", run_dir / "finetune-scratch"
    cfg = (tuned / "config.yaml").read_text()
    assert "name: classify" in cfg and "num_classes: 10" in cfg and "layer_decay: 0.9" in cfg
    assert "lr: 0.002" in cfg  # RECIPES["image"], not the pretraining run's 0.001
    # The fine-tuned run started from the pretrained encoder, the other did not: after 6 small
    # steps the fine-tuned backbone is still close to the pretrained one, the scratch one is not.
    before = load_module_state(run_dir / "checkpoints" / "step-00000004")
    ends = [load_module_state(r / "checkpoints" / "step-00000006") for r in (tuned, scratch)]
    key = "embeddings.patch_embeddings.projection.weight"
    distance = [(end[f"backbone.{key}"] - before[f"model.vit.{key}"]).norm() for end in ends]
    assert distance[0] < distance[1] / 2, distance


def test_linear_probe_command_caches_features_and_reports_the_random_init(pretrained, real_shards):
    run_dir = pretrained
    args = ("eval", "linear", str(run_dir), "--train-shards", str(real_shards["train"]),
            "--test-shards", str(real_shards["test"]), "--baseline", "--max-train-samples", "256",
            "--max-test-samples", "64", "--epochs", "5")
    first = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)  # one JSON line
    assert result["num_train"] == 256 and result["num_test"] == 64 and result["epochs"] == 5
    assert 0 <= result["linear_top1"] <= 1 and 0 <= result["random_init_linear_top1"] <= 1
    assert "BatchNorm" in result["protocol"]
    cache = run_dir / "eval" / "linear-features-step-00000004.safetensors"
    assert json.loads((run_dir / "eval" / "linear-step-00000004.json").read_text()) == result
    stamp = cache.stat().st_mtime_ns
    again = subprocess.run(sslscale_cmd(*args[:-1], "7"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout)["epochs"] == 7
    assert cache.stat().st_mtime_ns == stamp  # the features were read back, not recomputed


def test_shards_without_classes_are_refused_before_training(real_shards, tmp_path):
    manifest = json.loads((real_shards["train"] / "manifest.json").read_text())
    manifest["meta"].pop("classes", None)
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in real_shards["train"].iterdir():
        (bare / shard.name).symlink_to(shard)
    (bare / "manifest.json").unlink()
    (bare / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, tmp_path / "run", "objective.name=classify", f"data.train_shards={bare}")),
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "objective.num_classes" in done.stderr and "meta.classes" in done.stderr


def test_mlm_encoder_is_fine_tuned_probed_and_scored_on_labeled_text(labeled_text_shards, real_shards, tmp_path):
    s = labeled_text_shards
    run_dir = tmp_path / "mlm"

    def sslscale(*args: str) -> dict:
        done = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1]) if args[0] == "eval" else {}

    sslscale("train", str(MLM_RECIPE), *tiny_text_overrides(s, run_dir, "train.max_steps=4", "eval.test_shards=null"))
    shards = ("--train-shards", str(s["labeled_train"]), "--test-shards", str(s["labeled_val"]))
    tuned = sslscale("eval", "finetune", str(run_dir), *shards, "--steps", "4", "--set", "data.num_workers=1")
    assert 0 <= tuned["finetune_top1"] <= 1 and 0 <= tuned["scratch_top1"] <= 1 and tuned["num_test"] == 128
    cfg = (run_dir / "finetune" / "config.yaml").read_text()
    assert "name: classify" in cfg and "num_classes: 3" in cfg and "pooling: cls" in cfg and "layer_decay: 0.8" in cfg
    probe = sslscale("eval", "linear", str(run_dir), *shards, "--baseline", "--epochs", "3",
                     "--max-train-samples", "256", "--max-test-samples", "64")
    assert probe["num_train"] == 256 and 0 <= probe["linear_top1"] <= 1 and "random_init_linear_top1" in probe
    knn = sslscale("eval", "knn", str(run_dir), *shards, "--max-train-samples", "256", "--max-test-samples", "64")
    assert 0 <= knn["knn_top1"] <= 1
    # image shards for a text encoder, unlabeled text: refused before anything runs, naming them
    for test_shards, error in ((real_shards["test"], "eval.test_shards"), (s["val"], "no labeled text")):
        done = subprocess.run(sslscale_cmd("eval", "linear", str(run_dir), "--train-shards", str(s["labeled_train"]),
                                           "--test-shards", str(test_shards)), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and error in done.stderr and str(test_shards) in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
