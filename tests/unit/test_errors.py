"""Errors a user can fix are one ``error:`` line naming the key or file, and where a value came
from (command line, recipe, defaults): config values out of range, malformed shard manifests, an
unknown objective. The CLI checks run the real command line up to its first check (no training)
and confirm no run dir is left behind."""

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sslscale.config import OBJECTIVE_NAMES, Config, ConfigError, load_config, validate
from sslscale.data.shards import ManifestError, load_manifest, load_manifest_for

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd

BAD_VALUES = [  # (override, key): each refused with the key, its value and "command line"
    ("optim.lr=-1", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("optim.min_lr=-1e-6", "optim.min_lr"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.weight_decay_end=-0.1", "optim.weight_decay_end"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.eps=0", "optim.eps"), ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[-0.1,0.95]", "optim.betas"), ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("eval.every_steps=-1", "eval.every_steps"), ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.stall_timeout_s=-1", "train.stall_timeout_s"), ("dist.timeout_s=0", "dist.timeout_s"),
    ("slurm.max_failures=-1", "slurm.max_failures"), ("slurm.signal_grace_s=0", "slurm.signal_grace_s"),
    ("objective.mask_ratio=1.0", "objective.mask_ratio"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_out_of_range_values_name_key_value_and_command_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_RECIPE, [override])
    msg = str(e.value)
    assert msg.startswith(f"command line: key '{key}'"), msg
    assert ", got " in msg, msg


def test_a_two_view_probability_out_of_range_names_the_element():
    recipe = ROOT / "configs" / "demo" / "simclr_vit_tiny_fmnist.yaml"  # blur_prob: two-view objectives
    with pytest.raises(ConfigError, match=r"^command line: key 'objective.blur_prob\[1\]' must be a "
                                          r"probability in \[0, 1\], got 2.0$"):
        load_config(recipe, ["objective.blur_prob=[0.5,2.0]"])


@pytest.mark.parametrize("override", ["train.stall_timeout_s=0", "train.stall_timeout_s=null",
                                      "optim.grad_clip=0", "optim.min_lr=0", "slurm.max_failures=0",
                                      "optim.betas=[0.0,0.999]", "train.max_bad_steps=1",
                                      "checkpoint.every_steps=0", "dist.timeout_s=1"])
def test_boundary_values_are_accepted(override):
    load_config(DEMO_RECIPE, [override])


def test_a_recipe_value_names_the_recipe_and_an_override_fixes_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: key 'optim.lr' must be > 0, got -1"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=rf"^{recipe}: key 'optim.lr'"):  # another key overridden
        load_config(recipe, ["optim.min_lr=0"])
    assert load_config(recipe, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_a_command_line_value_names_the_command_line_not_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  image_size: 28\n  patch_size: 7\n  num_channels: 1\n"
                      "data:\n  mean: [0.5]\n  std: [0.5]\n")
    with pytest.raises(ConfigError, match=r"^command line: key 'optim.lr' must be > 0, got -1"):
        load_config(recipe, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"^command line: key 'model.image_size' = 28 must be a "
                                          r"multiple of model.patch_size = 5"):  # one of two keys
        load_config(recipe, ["model.patch_size=5"])


def test_validate_keeps_its_signature():
    cfg = OmegaConf.structured(Config)
    cfg.optim.eps = 0.0
    with pytest.raises(ConfigError, match=r"^config: key 'optim.eps' must be > 0, got 0.0"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^r.yaml: key 'optim.eps'"):
        validate(cfg, source="r.yaml")
    with pytest.raises(ConfigError, match=r"^command line: key 'optim.eps'"):
        validate(cfg, source="r.yaml", overridden={"optim"})  # a whole section overridden


def test_light_objective_names_match_the_registry():
    from sslscale.objectives import OBJECTIVES

    assert sorted(OBJECTIVE_NAMES) == OBJECTIVES.names()


def _good_manifest() -> dict:
    return {"format": "webdataset", "version": 1, "source": "test", "license": "none",
            "num_samples": 5, "shards": [{"name": "shard-000000.tar", "num_samples": 3},
                                         {"name": "shard-000001.tar", "num_samples": 2, "sha256": None}]}


def _shard(i, **fields):
    def edit(m):
        m["shards"][i].update(fields)
    return edit


MALFORMED = [  # (edit of a good manifest, or raw text; what the message must name)
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (lambda m: m.pop("shards"), "missing field 'shards'"),
    (lambda m: m.pop("source"), "missing field 'source'"),
    (lambda m: m.update(shards={"a": 1}), "field 'shards' must be a list"),
    (lambda m: m.update(meta=[1]), "field 'meta' must be an object"),
    (_shard(1, num_samples="abc"), "shards[1]: field 'num_samples' must be an integer >= 0, got 'abc'"),
    (_shard(0, num_samples=-1), "shards[0]: field 'num_samples'"),
    (_shard(0, num_samples=2.5), "shards[0]: field 'num_samples'"),
    (_shard(0, name=7), "shards[0]: field 'name'"),
    (_shard(0, offsets="x"), "shards[0]: field 'offsets'"),
    (_shard(0, colour="red"), "shards[0]: unknown field 'colour'"),
    (lambda m: m["shards"][0].pop("num_samples"), "shards[0]: missing field 'num_samples'"),
    (lambda m: m["shards"].__setitem__(0, "shard-000000.tar"), "shards[0] must be an object"),
    (lambda m: m.update(num_samples=6), "field 'num_samples' is 6 but the shards sum to 5"),
    (lambda m: m.update(shards=[], num_samples=0), "lists no shards"),
]


def write_manifest(folder: Path, how) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(how, str):
        text = how
    else:
        manifest = _good_manifest()
        how(manifest)
        text = json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    return folder


def test_a_good_manifest_loads(tmp_path):
    assert load_manifest(write_manifest(tmp_path, lambda m: None)).num_samples == 5


@pytest.mark.parametrize("how, needle", MALFORMED)
def test_malformed_manifest_names_the_file_and_field(tmp_path, how, needle):
    folder = write_manifest(tmp_path / "m", how)
    with pytest.raises(ManifestError) as e:
        load_manifest(folder)
    assert str(e.value).startswith(str(folder / "manifest.json")) and needle in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:  # through the config key that pointed at it
        load_manifest_for("data.train_shards", str(folder))
    assert str(e.value).startswith(f"key 'data.train_shards' = {folder}: {folder / 'manifest.json'}")


# -- the command line: exit 2, one error line, nothing written --------------------------------


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(sslscale_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def corrupt_shards(real_shards, tmp_path) -> Path:
    """A copy of the real train manifest whose second shard says ``"num_samples": "abc"``."""
    manifest = json.loads((real_shards["train"] / "manifest.json").read_text())
    manifest["shards"][1]["num_samples"] = "abc"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "bad"


@pytest.mark.parametrize("command", [["launch", "--nproc", "2"], ["train"]])
def test_malformed_manifest_is_one_error_line_and_no_run_dir(command, corrupt_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(*command, str(DEMO_RECIPE), f"data.train_shards={corrupt_shards}", f"run_dir={run_dir}")
    one_error_line(proc, "data.train_shards", str(corrupt_shards / "manifest.json"),
                   "shards[1]: field 'num_samples'", "'abc'")
    assert proc.stderr.count("\n") == 1  # nothing else on stderr either
    assert not run_dir.exists()


def test_submit_dry_run_checks_the_manifest(corrupt_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run("submit", str(DEMO_RECIPE), f"data.train_shards={corrupt_shards}", f"run_dir={run_dir}",
               "--dry-run")
    one_error_line(proc, str(corrupt_shards / "manifest.json"), "num_samples")
    assert not run_dir.exists()


def test_data_plan_on_a_malformed_manifest(corrupt_shards):
    one_error_line(run("data", "plan", str(corrupt_shards), "--world-size", "2"),
                   str(corrupt_shards / "manifest.json"), "shards[1]: field 'num_samples'")
    one_error_line(run("data", "plan", str(corrupt_shards), "--world-size", "0"), "--world-size")


def test_launch_refuses_an_unknown_objective_before_any_rank(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run("launch", "--nproc", "2", str(DEMO_RECIPE), f"data.train_shards={real_shards['train']}",
               "objective.name=foo", f"run_dir={run_dir}")
    line = one_error_line(proc, "command line", "objective.name", "'foo'", *OBJECTIVE_NAMES)
    assert proc.stderr.count("\n") == 1, proc.stderr  # torchrun never started
    assert not run_dir.exists(), line


def test_launch_names_the_command_line_for_a_bad_override(tmp_path):
    run_dir = tmp_path / "run"
    proc = run("launch", "--nproc", "2", str(DEMO_RECIPE), "optim.lr=-1", f"run_dir={run_dir}")
    line = one_error_line(proc, "optim.lr", "-1")
    assert line.startswith("error: command line:") and str(DEMO_RECIPE) not in line
    assert not run_dir.exists()

