"""Two ranks on gloo through `sslscale launch --nproc 2`: DeepSpeed ZeRO-2, a few MAE steps on
real shards, finite decreasing-or-not loss logged by rank 0, a checkpoint written by both."""

import json
import math
import subprocess

import pytest
import torch

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.distributed


def test_two_ranks_zero2(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = sslscale_cmd("launch", "--nproc", "2", str(DEMO_RECIPE),
                       *tiny_overrides(real_shards, run_dir, "deepspeed.zero_stage=2",
                                       "train.max_steps=4", "checkpoint.every_steps=0"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in train)
    assert train[-1]["samples_seen"] == 4 * 16
    marker = json.loads((run_dir / "checkpoints" / "step-00000004" / "complete.json").read_text())
    assert marker["world_size"] == 2
    # ZeRO-2 shards the optimizer state: one file per rank.
    assert sum("optim_states" in name for name in marker["files"]) == 2
    assert "eval/knn_top1" in rows[-1]
    # The data positions of both ranks' streams are in the checkpoint: 4 steps x 16 samples.
    state = torch.load(run_dir / "checkpoints" / "step-00000004" / "mp_rank_00_model_states.pt",
                       weights_only=True)
    assert state["data"]["num_streams"] == 4 and sum(state["data"]["positions"]) == 64
    assert all(p > 0 for p in state["data"]["positions"])  # streams of rank 1 too
