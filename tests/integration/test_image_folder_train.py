"""A 400-image ImageNet-layout folder (class sub-folders of real Fashion-MNIST / MNIST images as
JPEGs), prepared with the defaults, trains with the default ``data.num_streams`` and
``data.num_workers`` on 2 ranks.

``sslscale data prepare image-folder`` reaches the same defaults once the CLI passes
``--samples-per-shard`` through unset (it sends 5000 today); this test prepares through
``sslscale.data.sources.prepare`` with the defaults."""

import json
import subprocess

import pytest
from PIL import Image

from sslscale.config import DataConfig
from sslscale.data.sources import open_source, prepare

from ..conftest import DEMO_RECIPE, ROOT, TINY, real_source, sslscale_cmd

pytestmark = pytest.mark.integration


def test_400_image_folder_with_defaults_trains_on_2_ranks(tmp_path):
    src = real_source()
    folder = tmp_path / "imagenet-layout"
    for i, ex in zip(range(400), open_source(src, "test").examples):
        cls = folder / f"n{ex.label:08d}"
        cls.mkdir(parents=True, exist_ok=True)  # 40 x 30 RGB JPEGs: the decoder crops and resizes
        Image.fromarray(ex.image).resize((40, 30)).convert("RGB").save(cls / f"{i:04d}.JPEG", quality=90)
    manifest = prepare("image-folder", tmp_path / "shards", input_dir=str(folder), progress=False)
    assert manifest.num_samples == 400 and manifest.meta["passthrough"] == 400
    assert len(manifest.shards) >= DataConfig().num_streams

    data_keys = ("data.num_workers=", "data.num_streams=", "data.shuffle_buffer=")
    tiny = [o for o in TINY if not o.startswith(data_keys)]  # the data defaults stay
    run_dir = tmp_path / "run"
    done = subprocess.run(sslscale_cmd(
        "launch", "--nproc", "2", str(DEMO_RECIPE), *tiny, f"data.train_shards={tmp_path / 'shards'}",
        f"eval.train_shards={tmp_path / 'shards'}", f"eval.test_shards={tmp_path / 'shards'}",
        f"run_dir={run_dir}", "train.max_steps=3", "eval.max_train_samples=64",
        "eval.max_test_samples=32"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [1, 2, 3]
