
import pytest
from omegaconf import OmegaConf

from sslscale.config import (ConfigError, grad_accum_steps, load_config, save_config, schema_keys,
                             warnings_for)

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


@pytest.mark.parametrize("override, wrong, right", [
    ("train.max_step=5", "train.max_step", "train.max_steps"),  # a letter missing
    ("trian.max_steps=5", "trian.max_steps", "train.max_steps"),  # the section misspelled
    ("max_steps=5", "max_steps", "train.max_steps"),  # the section left out
    ("lr=1e-3", "lr", "optim.lr"),
    ("wandb.nmae=x", "wandb.nmae", "wandb.name"),
])
def test_misspelled_override_suggests_the_key(override, wrong, right):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_RECIPE, [override])
    assert str(e.value) == f"command line: unknown key '{wrong}'; did you mean '{right}'?"


def test_misspelled_recipe_key_suggests_the_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert str(e.value) == f"{recipe}: unknown key 'train.max_step'; did you mean 'train.max_steps'?"


def test_unknown_key_without_a_close_one_says_so():
    with pytest.raises(ConfigError, match=r"unknown key 'zzzzqq'; check the spelling"):
        load_config(None, ["zzzzqq=1"])


def test_schema_keys_are_every_leaf():
    keys = schema_keys()
    assert {"train.max_steps", "optim.warmup_steps", "deepspeed.extra", "wandb.tags"} <= set(keys)
    assert "train" not in keys and len(keys) == len(set(keys))


@pytest.mark.parametrize("max_steps, warmup, warned", [(5, 10, True), (10, 10, True),
                                                       (11, 10, False), (5, 0, False)])
def test_warmup_longer_than_the_run_is_a_warning(max_steps, warmup, warned):
    cfg = load_config(None, [f"train.max_steps={max_steps}", f"optim.warmup_steps={warmup}"])
    found = warnings_for(cfg)  # a warning, not an error: the config loads
    assert bool(found) == warned
    if warned:
        assert len(found) == 1 and "\n" not in found[0]
        assert found[0].startswith(f"train.max_steps = {max_steps} <= optim.warmup_steps = {warmup}")


def test_demo_recipes_have_no_warnings():
    for recipe in sorted(DEMO_RECIPE.parent.glob("*.yaml")):
        assert warnings_for(load_config(recipe)) == [], recipe


def _isolate_wandb(monkeypatch, tmp_path) -> None:
    """Keep what open_wandb_run / wandb.init put in os.environ (wandb's dirs, the token of the
    service this process starts) out of the tests that run after: subprocesses would inherit
    them, and a later run would join this process's wandb service."""
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-state"))
    monkeypatch.setenv("WANDB_SERVICE", "")  # empty = none; restored (unset) after the test


def test_wandb_keys_reach_wandb_init(tmp_path, monkeypatch):
    import wandb

    from sslscale.metrics import open_wandb_run

    _isolate_wandb(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or "run")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(DEMO_RECIPE, [f"run_dir={tmp_path / 'lr3e-4'}", "wandb.tags=[mae,sweep]",
                                    "wandb.group=sweep-1", "wandb.notes=lower lr"])
    assert open_wandb_run(cfg.run_dir, cfg.wandb, {}, cfg.name) == "run"
    kwargs = calls[-1]
    # default name: the recipe's name and the run dir's folder, so two runs of a recipe differ
    assert kwargs["name"] == "mae_vit_tiny_fmnist-lr3e-4"
    assert (kwargs["tags"], kwargs["group"], kwargs["notes"]) == (["mae", "sweep"], "sweep-1", "lower lr")
    assert kwargs["project"] == "sslscale" and kwargs["mode"] == "offline"

    named = load_config(DEMO_RECIPE, [f"run_dir={tmp_path / 'mae_vit_tiny_fmnist'}", "wandb.name=my-run"])
    open_wandb_run(named.run_dir, named.wandb, {}, named.name)
    assert calls[-1]["name"] == "my-run" and calls[-1]["tags"] is None
    plain = load_config(DEMO_RECIPE, [f"run_dir={tmp_path / 'mae_vit_tiny_fmnist'}"])
    open_wandb_run(plain.run_dir, plain.wandb, {}, plain.name)
    assert calls[-1]["name"] == "mae_vit_tiny_fmnist"  # the folder is the name: not twice


def test_offline_wandb_run_carries_name_and_tags(tmp_path, monkeypatch):
    from sslscale.metrics import open_wandb_run

    import wandb

    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(DEMO_RECIPE, [f"run_dir={tmp_path / 'r1'}", "wandb.tags=[mae,tiny]",
                                    "wandb.group=g", "wandb.notes=n"])
    run = open_wandb_run(cfg.run_dir, cfg.wandb, {"a": 1}, cfg.name)
    try:
        assert (run.name, tuple(run.tags), run.group, run.notes) == \
            ("mae_vit_tiny_fmnist-r1", ("mae", "tiny"), "g", "n")
    finally:
        run.finish()
        wandb.teardown()  # stop the service this process started
    assert list((tmp_path / "r1" / "wandb").glob("offline-run-*"))
