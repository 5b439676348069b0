from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sslscale.config import ConfigError, grad_accum_steps, load_config, save_config

from ..conftest import DEMO_RECIPE


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.01\ntrain:\n  max_steps: 7\n")
    cfg = load_config(recipe, ["optim.lr=0.5", "data.num_workers=3"])
    assert cfg.optim.lr == 0.5  # override beats recipe
    assert cfg.train.max_steps == 7  # recipe beats default
    assert cfg.optim.weight_decay == 0.05  # default kept
    assert cfg.data.num_workers == 3
    assert cfg.run_dir == "runs/run"


def test_unknown_override_names_key_and_source():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.lrr'"):
        load_config(DEMO_RECIPE, ["optim.lrr=1"])


def test_unknown_recipe_key_names_key_and_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  hiden_size: 12\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert "model.hiden_size" in str(e.value) and str(recipe) in str(e.value)


@pytest.mark.parametrize("override, key", [("train.max_steps=abc", "train.max_steps"),
                                           ("train.precision=fp8", "train.precision"),
                                           ("objective.mask_ratio=1.5", "objective.mask_ratio"),
                                           ("deepspeed.zero_stage=4", "deepspeed.zero_stage")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_missing_recipe():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_grad_accum_steps():
    cfg = load_config(None, ["train.global_batch_size=256", "train.micro_batch_size=32"])
    assert grad_accum_steps(cfg, 1) == 8
    assert grad_accum_steps(cfg, 4) == 2
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        grad_accum_steps(cfg, 3)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEMO_RECIPE, ["optim.lr=0.123"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
