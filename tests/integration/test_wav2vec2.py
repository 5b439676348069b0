"""wav2vec 2.0 end to end through the command line on real speech (Debian ktuberling-data): a
tiny model trains a few steps on 2 ranks with ZeRO-2, ``sslscale eval knn --baseline`` scores its
clip features beside the random-init encoder's, and the export loads with ``AutoModel``,
``AutoFeatureExtractor`` and ``pipeline("feature-extraction")``."""

import json

import numpy as np
import pytest

from ..conftest import W2V_RECIPE, run_ok, sslscale_cmd, tiny_audio_overrides

pytestmark = pytest.mark.integration


def test_wav2vec2_trains_evaluates_and_exports(audio_shards, tmp_path):
    run_dir, out = tmp_path / "w2v", tmp_path / "export"
    proc = run_ok(sslscale_cmd("launch", "--nproc", "2", str(W2V_RECIPE), *tiny_audio_overrides(
        audio_shards, run_dir, "train.max_steps=6", "checkpoint.every_steps=0", "deepspeed.zero_stage=2")))
    final = json.loads(proc.stdout.strip().splitlines()[-1])  # the evaluation's JSON line
    assert final["step"] == 6 and 0.0 <= final["knn_top1"] <= 1.0 and final["num_test"] >= 15
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "train/loss" in r]
    assert {"train/contrastive_loss", "train/diversity_loss", "train/codebook_perplexity",
            "train/gumbel_temperature", "train/masked_fraction", "train/contrastive_chance",
            "train/contrastive_accuracy"} <= train[-1].keys()
    assert train[-1]["train/codebook_perplexity"] > 1.0 and train[-1]["perf/model_tflops_per_device"] > 0
    assert train[-1]["train/gumbel_temperature"] < train[0]["train/gumbel_temperature"]
    assert "tokens_seen" not in train[-1]  # waveform samples are not tokens

    knn = json.loads(run_ok(sslscale_cmd("eval", "knn", str(run_dir), "--baseline")).stdout.strip().splitlines()[-1])
    assert knn["knn_top1"] == pytest.approx(final["knn_top1"], abs=1e-6)
    assert 0.0 <= knn["random_init_knn_top1"] <= 1.0

    run_ok(sslscale_cmd("export", str(run_dir), "--out", str(out)))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: feature-extraction" in card and "Wav2Vec2Model" in card
    assert "arxiv:2006.11477" in card and "audio-classification" in card and "GPL-2+" in card
    from transformers import AutoFeatureExtractor, AutoModel, pipeline

    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "Wav2Vec2Model"
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert extractor.sampling_rate == 16_000 and extractor.return_attention_mask
    extract = pipeline("feature-extraction", model=str(out), tokenizer=extractor)
    frames = np.array(extract(np.random.default_rng(0).standard_normal(16_000).astype(np.float32)))
    assert frames.shape == (1, 49, model.config.hidden_size)  # 49 frames per second of 16 kHz audio
