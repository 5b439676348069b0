"""Instability is counted: optimizer steps that DeepSpeed skips for non-finite gradients show in
`train/skipped_steps` (a run with a learning rate of 1e3 and no clipping diverges at once)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.integration


def test_overflow_skipped_steps_are_counted(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(sslscale_cmd("train", str(DEMO_RECIPE), *tiny_overrides(
        real_shards, run_dir, "deepspeed.zero_stage=2", "optim.lr=1e3", "optim.grad_clip=0",
        "optim.warmup_steps=0", "train.max_steps=8", "data.num_workers=0", "eval.train_shards=null",
        "eval.test_shards=null")), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r]
    assert skipped[-1] > 0 and skipped == sorted(skipped), skipped  # counted, cumulative
    assert rows[-1]["train/nonfinite_micro_batches"] == 0  # the losses stayed finite: a separate count
