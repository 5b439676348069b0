"""Each objective trains end to end through the command line on real data (a few tiny steps),
evaluates (kNN for images, held-out masked-token accuracy for text) and checkpoints its encoder
in Hugging Face format."""

import json
import math
import subprocess

import pytest
import torch

from ..conftest import DEMO_RECIPE, MLM_RECIPE, ROOT, sslscale_cmd, tiny_overrides, tiny_text_overrides

pytestmark = pytest.mark.integration
HEADS = ["objective.projection_hidden_dim=64", "objective.projection_dim=16",
         "objective.predictor_hidden_dim=32"]


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["simclr", "simsiam"])
def test_two_view_objective_trains_and_evaluates(real_shards, tmp_path, name):
    run_dir = tmp_path / name
    heads = [h for h in HEADS if name != "simclr" or "predictor" not in h]  # SimCLR has none
    run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, run_dir, f"objective.name={name}", *heads, "train.max_steps=4",
        "checkpoint.every_steps=0")))
    logged = rows(run_dir)
    train = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["train/loss"]) for r in train)
    assert 0.0 < logged[-1]["eval/knn_top1"] <= 1.0
    if name == "simsiam":
        assert all(0.0 < r["train/z_std"] for r in train)  # the collapse monitor is logged
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(run_dir / "checkpoints" / "step-00000004" / "encoder")
    assert type(encoder).__name__ == "ViTModel"


@pytest.mark.parametrize("name, extra", [("rotnet", ["objective.rotations_per_image=2"]),
                                         ("dae", ["objective.noise=gaussian"]),
                                         ("vae", ["objective.latent_dim=8"]),
                                         # two engines on 1 rank, ZeRO-0 (the recipe's)
                                         ("gan", ["objective.latent_dim=8", "objective.generator_width=8",
                                                  "objective.d_steps_per_g=2"]),
                                         ("bigan", ["objective.latent_dim=8", "objective.generator_width=8",
                                                    "objective.reconstruction_weight=1.0"])])
def test_pretext_and_autoencoder_objectives_train_evaluate_and_draw(real_shards, tmp_path, name, extra):
    from PIL import Image

    run_dir = tmp_path / name
    run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, run_dir, f"objective.name={name}", *extra, "train.max_steps=3",
        "checkpoint.every_steps=0")))
    logged = rows(run_dir)
    train = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["train/loss"]) for r in train)
    assert 0.0 < logged[-1]["eval/knn_top1"] <= 1.0 and train[-1]["perf/model_tflops_per_device"] > 0
    term = {"rotnet": "train/rotation_accuracy", "vae": "train/kl_loss", "dae": "train/loss",
            "gan": "train/d_real_accuracy", "bigan": "train/reconstruction_loss"}[name]
    assert all(term in r for r in train)
    out = tmp_path / "pictures" / "grid.png"
    if name == "rotnet":  # nothing to draw: the error names the objective
        proc = subprocess.run(sslscale_cmd("samples", str(run_dir), "--out", str(out)), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "objective rotnet neither reconstructs nor generates images" in proc.stderr
        return
    printed = json.loads(run(sslscale_cmd("samples", str(run_dir), "--out", str(out), "--num-images", "4")).stdout)
    assert printed["step"] == 3 and Image.open(out).size == (2 * (4 * 30 - 2), 2 * (len(printed["rows"]) * 30 - 2))
    if name in ("gan", "bigan"):  # generated images only; two discriminator steps per step
        assert printed["rows"] == ["generated"] * 4 and "prior_out" not in printed
        assert train[-1]["samples_seen"] == 3 * 16 * (2 if name == "gan" else 1)
        assert (run_dir / "checkpoints" / "step-00000003" / "discriminator").is_dir()
        if name == "gan":  # the encoder export reads the several-engine checkpoint (round-trip checked)
            exported = json.loads(run(sslscale_cmd("export", str(run_dir), "--out", str(tmp_path / "hf"))).stdout)
            assert exported["class"] == "ViTModel" and exported["step"] == 3
        return
    if name == "vae":
        assert Image.open(printed["prior_out"]).size == (2 * (4 * 30 - 2), 2 * (4 * 30 - 2))
    else:
        assert printed["rows"] == ["input", "corrupted", "reconstruction"] and "prior_out" not in printed


def test_cyclegan_trains_writes_translation_grids_and_exports(real_shards, tmp_path):
    """Two unpaired domains (sneakers, ankle boots), two engines of two networks each; PNG grids
    of translations every 2 steps and at the last; D_A's ViT is the kNN-scored, exported encoder."""
    from PIL import Image

    run_dir = tmp_path / "cyclegan"
    run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, run_dir, "objective.name=cyclegan", "objective.generator_width=4",
        "objective.generator_blocks=1", "objective.image_every_steps=2", "objective.image_grid_size=4",
        "train.max_steps=3", "checkpoint.every_steps=0")))
    logged = rows(run_dir)
    train = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["train/loss"]) for r in train)
    assert all(k in train[-1] for k in ("train/d_loss", "train/g_loss", "train/cycle_loss", "train/identity_loss",
                                        "train/d_a_real_accuracy", "train/d_b_fake_accuracy"))
    assert 0.0 < logged[-1]["eval/knn_top1"] <= 1.0 and train[-1]["perf/model_tflops_per_device"] > 0
    grids = sorted(p.name for p in (run_dir / "images").iterdir())
    assert grids == ["step-00000002.png", "step-00000003.png"]
    assert Image.open(run_dir / "images" / grids[-1]).size == (2 * (4 * 30 - 2), 2 * (6 * 30 - 2))
    folder = run_dir / "checkpoints" / "step-00000003"
    assert (folder / "discriminator").is_dir() and (folder / "generator").is_dir()
    exported = json.loads(run(sslscale_cmd("export", str(run_dir), "--out", str(tmp_path / "hf"))).stdout)
    assert exported["class"] == "ViTModel" and exported["step"] == 3


def test_mlm_trains_and_scores_held_out_text(text_shards, tmp_path):
    run_dir = tmp_path / "mlm"
    proc = run(sslscale_cmd("train", str(MLM_RECIPE), *tiny_text_overrides(
        text_shards, run_dir, "train.max_steps=6", "checkpoint.every_steps=0")))
    final = json.loads(proc.stdout.strip().splitlines()[-1])  # the evaluation's JSON line
    assert final["step"] == 6 and 0.0 <= final["mlm_accuracy"] <= 1.0
    logged = rows(run_dir)
    train = [r for r in logged if "train/loss" in r]
    assert train[-1]["tokens_seen"] == 6 * 16 * 64 and train[-1]["perf/tokens_per_sec"] > 0
    evaluated = json.loads(run(sslscale_cmd("eval", "mlm", str(run_dir))).stdout)
    assert evaluated["mlm_accuracy"] == pytest.approx(final["mlm_accuracy"])  # same held-out masks
    assert 0.0 < evaluated["mlm_baseline_accuracy"] < 0.5 and evaluated["num_masked_tokens"] > 100
    assert evaluated["mlm_perplexity"] > 1.0
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(run_dir / "checkpoints" / "step-00000006" / "encoder")
    assert type(encoder).__name__ == "BertModel"


def test_init_from_starts_a_run_from_another_runs_weights(text_shards, tmp_path):
    """BERT's second phase: a fresh run (own step, optimizer, data) from a checkpoint's weights;
    with lr 1e-30 (lr 0 is refused) its weights stay those, to 1e-20."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    run(sslscale_cmd("train", str(MLM_RECIPE), *tiny_text_overrides(
        text_shards, first, "train.max_steps=2", "checkpoint.every_steps=0", "eval.test_shards=null")))
    source = first / "checkpoints" / "step-00000002"
    proc = run(sslscale_cmd("train", str(MLM_RECIPE), *tiny_text_overrides(
        text_shards, second, "train.max_steps=1", "checkpoint.every_steps=0", "eval.test_shards=null",
        "optim.lr=1e-30", "optim.min_lr=0.0", "optim.weight_decay=0.0", f"train.init_from={source}")))
    assert f"initialized the model from {source}" in proc.stderr
    before = load_file(source / "encoder" / "model.safetensors")
    after = load_file(second / "checkpoints" / "step-00000001" / "encoder" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-20) for k in before)


def test_compiled_objective_matches_eager(real_shards, tmp_path):
    """train.compile=true goes through torch.compile (aot_eager: graph capture without code
    generation, fast on CPU) and trains to the same losses as eager mode."""
    losses = {}
    for mode in ("eager", "compiled"):
        run_dir = tmp_path / mode
        extra = ["train.compile=true", "train.compile_backend=aot_eager"] if mode == "compiled" else []
        run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
            real_shards, run_dir, "train.max_steps=3", "checkpoint.every_steps=0",
            "eval.train_shards=null", "eval.test_shards=null", *extra)))
        losses[mode] = [r["train/loss"] for r in rows(run_dir) if "train/loss" in r]
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
