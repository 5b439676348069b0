"""Shards whose images differ from the model's input (issue 15, "Errors, help, warnings"): the
decoder converts them silently; a ``warning:`` line before the run names the manifest file,
its ``meta`` fields and the model keys."""

from __future__ import annotations

import subprocess

import pytest

from sslscale.config import load_config
from sslscale.data.shards import MANIFEST, Manifest, ShardInfo, image_shape_warning, image_shape_warnings

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides


def manifest(meta: dict, modality: str = "image") -> Manifest:
    return Manifest(shards=[ShardInfo("shard-000000.tar", 10)], source="test", license="MIT",
                    meta=meta, root="/data/x", modality=modality)


@pytest.mark.parametrize("meta, expected", [
    ({"channels": 1, "image_sizes": [[28, 28]]}, None),
    ({"channels": 3, "image_sizes": [[28, 28]]},
     "data.train_shards: /data/x/manifest.json records 3-channel images (meta.channels) but "
     "model.num_channels = 1: every image is converted to 1 channel when decoded"),
    ({"channels": 1, "image_sizes": [[32, 32]]},
     "data.train_shards: /data/x/manifest.json records 32x32 images (meta.image_sizes) but "
     "model.image_size = 28: every image is resized to 28x28 (its centered square) when decoded"),
    ({"channels": 3, "image_sizes": [[28, 28], [30, 40], [64, 48], [90, 90]]},
     "data.train_shards: /data/x/manifest.json records 3-channel 28x28, 30x40, 64x48, ... images "
     "(meta.channels, meta.image_sizes) but model.num_channels = 1 and model.image_size = 28: every "
     "image is converted to 1 channel and resized to 28x28 (its centered square) when decoded"),
    ({}, None),  # `sslscale data index` records neither: nothing to compare
    ({"channels": None, "image_sizes": []}, None),
])
def test_warning_names_the_file_the_fields_and_the_keys(meta, expected):
    assert image_shape_warning(manifest(meta), "data.train_shards", num_channels=1, image_size=28) == expected


def test_text_shards_are_not_images():
    assert image_shape_warning(manifest({"channels": 3}, "text"), "eval.test_shards",
                               num_channels=1, image_size=28) is None


RGB_35 = ["model.num_channels=3", "model.image_size=35", "data.mean=[0.3,0.3,0.3]", "data.std=[0.3,0.3,0.3]"]


def test_config_shards_that_differ(real_shards, tmp_path):
    cfg = load_config(DEMO_RECIPE, tiny_overrides(real_shards, tmp_path / "run"))
    assert image_shape_warnings(cfg) == []  # the demo's shards fit the demo's model
    cfg = load_config(DEMO_RECIPE, tiny_overrides(real_shards, tmp_path / "run", *RGB_35))
    lines = image_shape_warnings(cfg)
    assert [line.split(":")[0] for line in lines] == ["data.train_shards", "eval.train_shards", "eval.test_shards"]
    assert str(real_shards["test"] / MANIFEST) in lines[2]
    assert "model.num_channels = 3 and model.image_size = 35" in lines[0]
    missing = load_config(DEMO_RECIPE, [*tiny_overrides(real_shards, tmp_path / "run", *RGB_35),
                                        f"data.train_shards={tmp_path / 'none'}"])
    assert len(image_shape_warnings(missing)) == 2  # the missing one is the command's error to report


def test_submit_warns_before_it_renders(real_shards, tmp_path):
    done = subprocess.run(sslscale_cmd("submit", str(DEMO_RECIPE), *tiny_overrides(real_shards, tmp_path / "run", *RGB_35),
                                       "--dry-run"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, done.stderr
    assert warnings[0].startswith(f"warning: data.train_shards: {real_shards['train'] / MANIFEST} records 1-channel "
                                  "28x28 images (meta.channels, meta.image_sizes) but model.num_channels = 3")
    assert "#SBATCH" in done.stdout
