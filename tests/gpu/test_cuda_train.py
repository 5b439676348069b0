"""The CUDA path (bf16, torch's fused AdamW in DeepSpeed, nccl): a few MAE steps. Skipped
without a GPU."""

import json
import math
import subprocess

import pytest
import torch

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_steps(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(sslscale_cmd("train", str(DEMO_RECIPE),
                                       *tiny_overrides(real_shards, run_dir, "train.max_steps=4")),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert "bf16, cuda" in proc.stderr and "AdamW" in proc.stderr  # precision=auto on CUDA
