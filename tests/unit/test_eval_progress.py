"""Progress of kNN and held-out MLM evaluation (issue 15, "Output and progress"): with a label,
rank 0 reports its progress (a plain line every ``SSLSCALE_PROGRESS_EVERY_S`` seconds when
stderr is not a terminal); without one (the evaluation inside training) it stays silent."""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from sslscale.data.shards import load_manifest
from sslscale.evaluate import knn_eval, mlm_eval

from ..conftest import MLM_RECIPE, tiny_text_overrides

PROGRESS = re.compile(r"\[rank 0\] INFO (.+?): (\d+)(?:/(\d+))? (images|blocks)")


class SlowFeatures(nn.Module):
    """Mean gray level per image as a 1-d feature, 50 ms per batch."""

    def features(self, batch):
        time.sleep(0.05)
        return batch["pixel_values"].float().mean(dim=(1, 2, 3))[:, None]


def test_knn_progress_lines_and_silence_without_a_label(real_shards, monkeypatch, capsys):
    monkeypatch.setenv("SSLSCALE_PROGRESS_EVERY_S", "0.1")
    bank, queries = load_manifest(real_shards["train"]), load_manifest(real_shards["test"])
    common = dict(device="cpu", image_size=28, num_channels=1, k=5, batch_size=16,
                  max_train_samples=128, max_test_samples=64)
    silent = knn_eval(SlowFeatures(), bank, queries, **common)
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    shown = knn_eval(SlowFeatures(), bank, queries, **common, progress="step 5")
    assert shown == silent
    out, err = capsys.readouterr()
    assert out == ""
    seen = [m.groups() for m in map(PROGRESS.search, err.splitlines()) if m]
    assert {what for what, *_ in seen} == {"kNN bank (step 5)", "kNN queries (step 5)"}, err
    assert ("kNN bank (step 5)", "128", None, "images") in seen  # the last line: all done
    assert all(int(done) <= int(total) for _, done, total, _ in seen if total)


class GuessZero(nn.Module):
    """Predicts token 0 at every masked position, 50 ms per batch."""

    def predict_masked(self, batch):
        time.sleep(0.05)
        targets = batch["labels"][batch["labels"] != -100]
        return torch.zeros(len(targets), 1000), targets


def test_mlm_progress_lines(text_shards, tmp_path, monkeypatch, capsys):
    from sslscale.config import load_config
    from sslscale.data.stream import decoder_for

    monkeypatch.setenv("SSLSCALE_PROGRESS_EVERY_S", "0.1")
    cfg = load_config(MLM_RECIPE, tiny_text_overrides(text_shards, tmp_path / "run"))
    held_out = load_manifest(text_shards["val"])
    result = mlm_eval(GuessZero(), held_out, decoder_for(cfg, held_out), device="cpu", batch_size=8,
                      limit=64, progress="held-out MLM (step 5)")
    assert result["num_masked_tokens"] > 0
    out, err = capsys.readouterr()
    assert out == ""
    seen = [m.groups() for m in map(PROGRESS.search, err.splitlines()) if m]
    assert seen and seen[-1] == ("held-out MLM (step 5)", "64", None, "blocks"), err
