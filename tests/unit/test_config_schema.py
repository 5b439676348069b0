"""Per-objective and per-model-family config sections (issue 17): every recipe resolves as it
did with the flat schema, another objective's key is an error naming its owner, keys merely
present (defaults, a run's config.yaml loaded for another objective) are dropped, ``model.name``
is inferred, and ``sslscale config show`` prints the chosen objective's keys with defaults."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from launcher.cli import main
from sslscale.config import ConfigError, load_config, save_config, to_dict
from sslscale.config_schema import MODEL_SCHEMAS, OBJECTIVE_MODELS, OBJECTIVE_SCHEMAS, defaults

from ..conftest import DEMO_RECIPE, ROOT

RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))
SIMCLR = ROOT / "configs" / "demo" / "simclr_vit_tiny_fmnist.yaml"
MLM = ROOT / "configs" / "demo" / "mlm_bert_tiny_pydocs.yaml"
# The flat schema's defaults before per-objective sections (sslscale/config.py at ed81cad): the
# oracle the resolved recipes are compared with.
FLAT_OBJECTIVE = dict(
    name="mae", mask_ratio=0.75, norm_pix_loss=True, crop_scale=[0.2, 1.0], hflip=True,
    mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1, color_jitter=0.5,
    color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=[1.0, 0.1], solarize_prob=[0.0, 0.2],
    pooling="cls", projection_hidden_dim=2048, projection_dim=256, predictor_hidden_dim=512,
    temperature=0.1, momentum=0.99, negatives="global", num_classes=0, label_smoothing=0.1)
FLAT_MODEL = dict(
    image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, decoder_hidden_size=512,
    decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048,
    attn_implementation="sdpa", vocab_size=0, max_position_embeddings=512)


def _fields(schema) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def _flat_resolution(recipe: Path) -> dict:
    """What the flat schema resolved ``recipe`` to: every key of every objective and model."""
    stated = yaml.safe_load(recipe.read_text())
    cfg = to_dict(load_config(recipe))
    cfg["objective"] = {**FLAT_OBJECTIVE, **stated.get("objective", {})}
    cfg["model"] = {**FLAT_MODEL, **stated.get("model", {})}
    return cfg


def _error(recipe, overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    return str(e.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_resolves_to_its_flat_values_with_only_its_own_keys(recipe):
    cfg = load_config(recipe)
    name, family = cfg.objective.name, cfg.model.name
    assert family == OBJECTIVE_MODELS[name][0]  # mlm: bert, clm: gpt2, the image objectives: vit
    assert set(cfg.objective) == _fields(OBJECTIVE_SCHEMAS[name])  # only the objective's keys
    assert set(cfg.model) == _fields(MODEL_SCHEMAS[family])
    stated = yaml.safe_load(recipe.read_text())
    schemas = {"objective": OBJECTIVE_SCHEMAS[name], "model": MODEL_SCHEMAS[family]}
    for section, flat in (("objective", FLAT_OBJECTIVE), ("model", FLAT_MODEL)):
        added = {k: v for k, v in defaults(schemas[section]).items() if k not in flat}  # keys the flat schema lacked
        want = {**flat, **added, **stated.get(section, {})}
        got = to_dict(cfg)[section]
        assert {k: v for k, v in got.items() if k != "name"} == \
            {k: want[k] for k in got if k != "name"}, (recipe, section)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_flat_run_config_yaml_still_loads(recipe, tmp_path):
    """A run's config.yaml written before per-objective sections lists every flat key."""
    flat = _flat_resolution(recipe)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(flat))
    cfg = load_config(saved)
    assert to_dict(cfg) == to_dict(load_config(recipe))


@pytest.mark.parametrize("recipe, override, message", [
    (DEMO_RECIPE, "objective.momentum=0.5",
     "command line: key 'objective.momentum' belongs to objective moco_v3, not mae"),
    (DEMO_RECIPE, "objective.temperature=0.2",
     "command line: key 'objective.temperature' belongs to objective moco_v3 / simclr, not mae"),
    (SIMCLR, "objective.mask_ratio=0.5",
     "command line: key 'objective.mask_ratio' belongs to objective mae, not simclr"),
    (SIMCLR, "objective.predictor_hidden_dim=64",
     "command line: key 'objective.predictor_hidden_dim' belongs to objective moco_v3 / simsiam, "
     "not simclr"),
    (DEMO_RECIPE, "model.vocab_size=100", "command line: key 'model.vocab_size' belongs to model bert / gpt2, not vit"),
    (MLM, "model.image_size=28", "command line: key 'model.image_size' belongs to model vit, not bert"),
    (MLM, "model.name=vit", "command line: key 'model.name' = 'vit'; objective mlm runs on model bert"),
])
def test_a_key_of_another_objective_or_model_names_its_owner(recipe, override, message):
    assert _error(recipe, [override]) == message


def test_a_recipe_key_of_another_objective_names_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective:\n  name: mae\n  momentum: 0.9\n")
    assert _error(recipe, []) == f"{recipe}: key 'objective.momentum' belongs to objective moco_v3, not mae"


def test_keys_of_another_objective_at_their_default_are_dropped(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("objective:\n  name: mae\n  temperature: 0.1\n  pooling: cls\n"
                      "model:\n  max_position_embeddings: 512\n")
    cfg = load_config(recipe, ["objective.momentum=0.99", "model.vocab_size=0"])
    assert set(cfg.objective) == _fields(OBJECTIVE_SCHEMAS["mae"])
    assert "vocab_size" not in cfg.model and "max_position_embeddings" not in cfg.model


def test_an_unknown_key_still_suggests_the_closest(tmp_path):
    assert _error(None, ["objective.mask_rato=0.5"]) == \
        "command line: unknown key 'objective.mask_rato'; did you mean 'objective.mask_ratio'?"
    assert _error(None, ["objective.momentun=0.5"]).endswith("did you mean 'objective.momentum'?")
    dae = ROOT / "configs" / "demo" / "dae_vit_tiny_fmnist.yaml"  # a misspelled choice: at load, not on the ranks
    assert _error(dae, ["objective.noise=gausian"]) == \
        "command line: key 'objective.noise' = 'gausian'; expected one of ['masking', 'gaussian']"


def test_a_run_config_reloads_for_fine_tuning(tmp_path):
    """``sslscale eval finetune`` loads the run's config.yaml with objective.name=classify: the
    run's own objective keys (non-default temperature, projector) are dropped, not errors."""
    from sslscale.finetune import finetune_overrides

    run = load_config(SIMCLR, [f"run_dir={tmp_path}"])
    assert run.objective.temperature == 0.2  # not the default: would be an error if set by hand
    save_config(run, tmp_path / "config.yaml")
    overrides = finetune_overrides(run, None, run_dir=tmp_path / "finetune", train_shards=str(tmp_path / "none"),
                                   test_shards=str(tmp_path / "none"), steps=10)
    tuned = load_config(tmp_path / "config.yaml", overrides)
    assert tuned.objective.name == "classify" and tuned.model.name == "vit"
    assert set(tuned.objective) == _fields(OBJECTIVE_SCHEMAS["classify"])
    assert tuned.objective.pooling == "mean" and tuned.objective.crop_scale == [0.9, 1.0]  # RECIPES["image"]
    assert tuned.optim.lr == 2e-3 and tuned.optim.layer_decay == 0.9  # not the run's 1e-3 / 1.0
    assert tuned.objective.label_smoothing == 0.0  # not the objective's default 0.1
    assert to_dict(tuned)["model"] == to_dict(run)["model"]
    # a key of another objective set on the command line is still an error
    assert "belongs to objective moco_v3 / simclr, not classify" in _error(
        tmp_path / "config.yaml", [*overrides, "objective.temperature=0.5"])


def test_a_flat_mlm_run_config_fine_tunes_a_bert(tmp_path):
    flat = tmp_path / "config.yaml"
    flat.write_text(yaml.safe_dump(_flat_resolution(MLM)))
    text = tmp_path / "labeled"
    text.mkdir()
    (text / "manifest.json").write_text(json.dumps({"modality": "text"}))
    for shards in (text, tmp_path / "not-prepared-yet"):  # the manifest, else the run's objective
        cfg = load_config(flat, ["objective.name=classify", f"data.train_shards={shards}"])
        assert cfg.model.name == "bert" and cfg.model.max_position_embeddings == 128
        assert "image_size" not in cfg.model


@pytest.mark.parametrize("overrides, family", [
    (["objective.name=mlm"], "bert"), (["objective.name=mae"], "vit"), (["objective.name=simclr"], "vit"),
    (["objective.name=moco_v3"], "vit"), (["objective.name=simsiam"], "vit"),
    (["objective.name=classify"], "vit"),  # no data: a ViT
    (["objective.name=classify", "model.vocab_size=100"], "bert"),  # a key only BERT has
    (["objective.name=classify", "data.train_shards={text}"], "bert"),
    (["objective.name=classify", "data.train_shards={image}"], "vit"),
    (["objective.name=classify", "data.train_shards={text}", "model.name=vit"], "vit"),  # stated wins
])
def test_model_name_is_inferred_when_absent(tmp_path, overrides, family):
    for modality in ("text", "image"):
        (tmp_path / modality).mkdir()
        (tmp_path / modality / "manifest.json").write_text(json.dumps({"modality": modality}))
    overrides = [o.format(text=tmp_path / "text", image=tmp_path / "image") for o in overrides]
    assert load_config(None, overrides).model.name == family


def test_config_show_prints_every_key_of_the_objective_with_defaults(capsys):
    assert main(["config", "show", str(SIMCLR), "objective.temperature=0.3"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert set(shown["objective"]) == _fields(OBJECTIVE_SCHEMAS["simclr"])
    assert set(shown["model"]) == _fields(MODEL_SCHEMAS["vit"])
    assert shown == OmegaConf.to_container(load_config(SIMCLR, ["objective.temperature=0.3"]), resolve=True)
    assert "  temperature: 0.3  # default: 0.1\n" in out
    assert "  pooling: mean  # default: \"cls\"\n" in out  # the recipe's value, the schema's default
    assert "  negatives: global\n" in out  # at its default: no comment
    assert "mask_ratio" not in out and "momentum" not in out


def test_config_show_refuses_another_objectives_key(capsys):
    assert main(["config", "show", str(SIMCLR), "objective.momentum=0.5"]) == 2
    assert capsys.readouterr().err == \
        "error: command line: key 'objective.momentum' belongs to objective moco_v3, not simclr\n"


def test_each_objective_registers_its_schema_and_the_table_needs_no_torch():
    from sslscale.objectives import OBJECTIVES

    assert {name: OBJECTIVES.schema(name) for name in OBJECTIVES.names()} == OBJECTIVE_SCHEMAS
    code = "import sys, sslscale.config; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
