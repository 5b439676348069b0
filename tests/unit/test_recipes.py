"""Every recipe in configs/ loads and builds its objective (big ones on the meta device)."""

from pathlib import Path

import pytest
import torch

from sslscale.config import load_config
from sslscale.engine import build_ds_config
from sslscale.objectives import build_objective

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "mae_vit_tiny_fmnist.yaml" for p in RECIPES)
    assert any(p.name == "mae_vit_base_16.yaml" for p in RECIPES)
    names = {p.stem for p in RECIPES}
    assert {"mlm_bert_tiny_pydocs", "clm_gpt2_tiny_pydocs", "mlm_bert_base", "simclr_vit_base_16"} <= names
    assert {f"{o}_vit_tiny_fmnist" for o in ("simclr", "moco_v3", "simsiam")} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds(recipe):
    cfg = load_config(recipe)
    if cfg.objective.name in ("mlm", "clm") and not cfg.model.vocab_size:  # else read from the data's manifest
        cfg = load_config(recipe, ["model.vocab_size=8192"])
    with torch.device("meta"):
        objective = build_objective(cfg)
    params = sum(p.numel() for p in objective.parameters())
    assert params > 0
    world = max(1, cfg.train.global_batch_size // cfg.train.micro_batch_size)
    ds = build_ds_config(cfg, world, "bf16" if cfg.train.precision == "bf16" else "fp32")
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    if recipe.stem == "mae_vit_base_16":  # ViT-B encoder (86M) + 8-block 512-wide decoder
        assert 105e6 < params < 115e6
    if recipe.stem == "mlm_bert_base":  # BERT-base with its MLM head: 110M
        assert 105e6 < params < 115e6
    if recipe.stem == "simclr_vit_base_16":  # ViT-B/16 (86M) + projection MLP
        assert 86e6 < params < 100e6
