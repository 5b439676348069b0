"""Shards written by ``webdataset.ShardWriter`` (``KEY.jpg``, ``KEY.cls``), indexed with
``sslscale.data.index``, train a few MAE steps; a resume from a mid-run checkpoint (streams
inside their shards: they seek with the per-shard indexes) logs bitwise the same losses."""

import json
import shutil
import subprocess

import pytest
import webdataset as wds

from sslscale.data.index import index_shards

from ..conftest import DEMO_RECIPE, ROOT, TINY, sslscale_cmd
from ..unit.test_index import jpeg

pytestmark = pytest.mark.integration
STEPS = 8


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_indexed_webdataset_shards_train_and_resume_bitwise(tmp_path):
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "train-%04d.tar"), maxcount=32, verbose=0) as sink:
        for i in range(128):  # 4 shards of 32 gray 28x28 JPEGs, labels 0-3
            sink.write({"__key__": f"img{i:05d}", "jpg": jpeg(i), "cls": i % 4})
    summary = index_shards([str(tmp_path / "wds" / "train-{0000..0003}.tar")], tmp_path / "idx",
                           workers=2, quiet=True)
    assert summary["num_samples"] == 128 and summary["keys"]["image"] == "jpg"
    idx = tmp_path / "idx"

    def train(run_dir):
        args = ["train", str(DEMO_RECIPE), *TINY, f"data.train_shards={idx}", f"eval.train_shards={idx}",
                f"eval.test_shards={idx}", f"run_dir={run_dir}", f"train.max_steps={STEPS}",
                "checkpoint.every_steps=3", "data.shuffle_buffer=8", "eval.max_train_samples=64",
                "eval.max_test_samples=32"]
        done = subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return done

    train(tmp_path / "run")
    full = losses(tmp_path / "run")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert json.loads((tmp_path / "run" / "eval" / f"knn-step-{STEPS:08d}.json").read_text())["knn_top1"] >= 0

    # Resume from step 3 (each stream 12 samples into its 32-sample shard) in a copy of the run.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "run", cut)
    for later in (cut / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 3:
            shutil.rmtree(later)
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= 3))
    assert "resumed from" in train(cut).stderr
    got = losses(cut)
    assert [got[s] for s in range(4, STEPS + 1)] == [full[s] for s in range(4, STEPS + 1)]
