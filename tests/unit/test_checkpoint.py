import json

import pytest

from launcher.cli import _preflight
from sslscale import checkpoint
from sslscale.config import ConfigError, load_config, to_dict

from ..conftest import DEMO_RECIPE, tiny_overrides


def fake_checkpoint(run_dir, step, complete=True):
    folder = checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x" * 10)
    if complete:
        marker = {"tag": folder.name, "step": step, "files": {"model.pt": 10}, "world_size": 2, "zero_stage": 1}
        (folder / checkpoint.MARKER).write_text(json.dumps(marker))
    return folder


def steps(run_dir):
    return [checkpoint.step_of(p) for p in checkpoint.step_folders(run_dir)]


def test_retention_keeps_last_and_every_and_never_the_newest(tmp_path):
    for s in range(100, 1100, 100):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 250, complete=False)  # leftover of an interrupted save
    fake_checkpoint(tmp_path, 1100, complete=False)  # newer than the newest complete: left alone
    checkpoint.retain(tmp_path, keep_last=2, keep_every=500)
    assert steps(tmp_path) == [1100, 1000, 900, 500]
    checkpoint.retain(tmp_path, keep_last=0)
    assert steps(tmp_path) == [1100, 1000, 900, 500]


def test_truncated_file_makes_a_checkpoint_incomplete(tmp_path):
    old, new = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    assert checkpoint.find_latest(tmp_path) == new
    (new / "model.pt").write_bytes(b"x" * 3)
    assert checkpoint.find_latest(tmp_path) == old
    rows = checkpoint.describe(tmp_path)
    assert [(r["step"], r["complete"], r["world_size"]) for r in rows] == [(2, False, None), (1, True, 2)]


def config(*overrides):
    return to_dict(load_config(None, ["model.hidden_size=64", *overrides]))


def test_other_world_size_is_elastic_other_stage_or_shape_is_an_error(tmp_path):
    folder = fake_checkpoint(tmp_path, 10)  # 2 ranks, ZeRO-1
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    marker["model"] = checkpoint.model_signature(config())
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))

    assert checkpoint.check_compatible(folder, 2, 1, config()) is False
    assert checkpoint.check_compatible(folder, 1, 1, config()) is True
    assert checkpoint.check_compatible(folder, 4, 1) is True  # no config: shapes are not compared
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage.*ZeRO-1.*ZeRO-2"):
        checkpoint.check_compatible(folder, 1, 2, config())
    with pytest.raises(ConfigError, match=r"'model.hidden_size'.*64.*128"):
        checkpoint.check_compatible(folder, 1, 1, config("model.hidden_size=128"))
    simclr = fake_checkpoint(tmp_path / "simclr", 10)
    marker["model"] = checkpoint.model_signature(config("objective.name=simclr"))
    (simclr / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=r"'objective.projection_dim'.*256.*128"):
        checkpoint.check_compatible(simclr, 1, 1, config("objective.name=simclr", "objective.projection_dim=128"))
    with pytest.raises(ConfigError, match=r"'objective.name'.*'mae'.*'simclr'"):
        checkpoint.check_compatible(folder, 1, 1, config("objective.name=simclr"))
    # Not shapes: the attention kernel or the mask ratio may change on resume.
    assert checkpoint.check_compatible(folder, 1, 1, config("model.attn_implementation=eager",
                                                            "objective.mask_ratio=0.5")) is True


def test_a_checkpoint_of_the_flat_schema_resumes_under_the_per_objective_one(tmp_path):
    """Markers written before per-objective schemas hold every model key and every objective's
    ``*_dim`` keys; only the keys both sides have are compared."""
    folder = fake_checkpoint(tmp_path, 10)
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    marker["model"] = {**checkpoint.model_signature(config("objective.name=simclr")),
                       "model.vocab_size": 0, "model.max_position_embeddings": 512,
                       "objective.predictor_hidden_dim": 512}  # not simclr's, nor a ViT's
    (folder / checkpoint.MARKER).write_text(json.dumps(marker))
    assert checkpoint.check_compatible(folder, 2, 1, config("objective.name=simclr")) is False
    with pytest.raises(ConfigError, match=r"'model.hidden_size'"):  # shared keys still compared
        checkpoint.check_compatible(folder, 2, 1, config("objective.name=simclr", "model.hidden_size=32"))


def test_retention_deletes_the_universal_copy_with_its_checkpoint(tmp_path):
    for s in (1, 2, 3):
        fake_checkpoint(tmp_path, s)
        cache = checkpoint.universal_folder(checkpoint.checkpoints_dir(tmp_path) / checkpoint.tag_for(s))
        (cache / "zero").mkdir(parents=True)
    checkpoint.retain(tmp_path, keep_last=1)
    universal = checkpoint.checkpoints_dir(tmp_path) / checkpoint.UNIVERSAL
    assert steps(tmp_path) == [3]
    assert sorted(p.name for p in universal.iterdir()) == [checkpoint.tag_for(3)]


def test_preflight_allows_another_world_size_not_another_stage(real_shards, tmp_path):
    fake_checkpoint(tmp_path, 5)  # written by 2 ranks with ZeRO-1
    overrides = tiny_overrides(real_shards, tmp_path, "deepspeed.zero_stage=1")
    _preflight(str(DEMO_RECIPE), overrides, world_size=1)
    with pytest.raises(ConfigError, match="ZeRO-1.*ZeRO-3"):
        _preflight(str(DEMO_RECIPE), [*overrides, "deepspeed.zero_stage=3"], world_size=1)
