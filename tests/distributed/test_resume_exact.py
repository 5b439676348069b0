"""Bitwise resume (CPU, fp32): a run killed with SIGKILL after a checkpoint and resumed with
resume=auto logs exactly the same train/loss for every later step as an uninterrupted run, for
ZeRO 1, 2 and 3 on 1 and 2 ranks. Engine state, data positions and RNG states all matter here."""

import json
import subprocess
import time

import pytest

from ..conftest import DEMO_RECIPE, ROOT, kill_tree, process_tree, sslscale_cmd, wait_dead, tiny_overrides

pytestmark = pytest.mark.distributed
MAX_STEPS = 30


def command(nproc, shards, run_dir, stage):
    overrides = tiny_overrides(shards, run_dir, f"deepspeed.zero_stage={stage}",
                               f"train.max_steps={MAX_STEPS}", "checkpoint.every_steps=3",
                               "eval.train_shards=null", "eval.test_shards=null")
    if nproc == 1:
        return sslscale_cmd("train", str(DEMO_RECIPE), *overrides)
    return sslscale_cmd("launch", "--nproc", str(nproc), str(DEMO_RECIPE), *overrides)


def losses(run_dir):
    """step -> train/loss, the last value logged for each step (a resumed run logs again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_kill_and_resume_is_bitwise(real_shards, tmp_path, nproc, stage):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run(command(nproc, real_shards, full, stage), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    proc = subprocess.Popen(command(nproc, real_shards, cut, stage), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    ranks = process_tree(proc.pid)
    kill_tree(proc.pid)  # the launcher and every rank, mid-run
    proc.wait()
    wait_dead(ranks)  # none survives to write into the run dir while it resumes
    saved = int((cut / "checkpoints" / "latest").read_text().split("-")[1])
    assert saved < MAX_STEPS

    resumed = subprocess.run(command(nproc, real_shards, cut, stage), cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, got = losses(full), losses(cut)
    later = range(saved + 1, MAX_STEPS + 1)
    assert [got[s] for s in later] == [expected[s] for s in later]  # exactly, not approximately

    # Every checkpoint carries the encoder in Hugging Face format, gathered under ZeRO-3 too.
    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder_dir = cut / "checkpoints" / f"step-{MAX_STEPS:08d}" / "encoder"
    encoder = AutoModel.from_pretrained(encoder_dir)
    weights = load_file(encoder_dir / "model.safetensors")
    assert type(encoder).__name__ == "ViTMAEModel" and all(w.numel() > 0 for w in weights.values())
    assert weights["embeddings.patch_embeddings.projection.weight"].abs().sum() > 0
