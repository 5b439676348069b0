import pytest
import torch

from sslscale.config import ConfigError, load_config
from sslscale.engine import apply_schedules, build_ds_config, build_optimizer, param_groups, resolve_precision
from sslscale.objectives import build_objective

from ..conftest import TINY


@pytest.fixture
def cfg():
    return load_config(None, [*TINY, "model.image_size=28", "model.num_channels=1",
                              "data.mean=[0.3]", "data.std=[0.35]", "optim.lr=0.01",
                              "train.max_steps=10"])


def test_mae_loss_backward_and_features(cfg):
    torch.manual_seed(0)
    objective = build_objective(cfg)
    batch = {"pixel_values": torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)}
    out = objective(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in objective.encoder().parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    objective.eval()
    with torch.no_grad():
        f1, f2 = objective.features(batch), objective.features(batch)
    assert f1.shape == (4, cfg.model.hidden_size)
    torch.testing.assert_close(f1, f2)  # no masking, no augmentation: deterministic
    assert objective.encoder().config.mask_ratio == cfg.objective.mask_ratio  # restored


def test_unknown_objective_lists_valid_names(cfg):
    with pytest.raises(ConfigError, match="command line: key 'objective.name' = 'mea'.*'mae'"):
        load_config(None, ["objective.name=mea"])


def test_ds_config_maps_batch_sizes(cfg):
    ds = build_ds_config(cfg, world_size=1, precision="fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (16, 8, 2)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_precision_rules():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_precision("fp16", "cpu")


def test_no_weight_decay_on_biases_and_norms(cfg):
    objective = build_objective(cfg)
    decay, no_decay = param_groups(objective)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"]) and no_decay["wd_scale"] == 0.0
    optimizer = build_optimizer(objective, cfg)
    hp = apply_schedules(optimizer, 0, cfg)
    assert hp["lr"] == pytest.approx(0.01 / 2)  # first of 2 warmup steps
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_mae_position_embeddings_are_sincos_not_zero(cfg):
    objective = build_objective(cfg)
    vit, decoder = objective.model.vit, objective.model.decoder
    pos, dpos = vit.embeddings.position_embeddings, decoder.decoder_pos_embed
    grid = cfg.model.image_size // cfg.model.patch_size
    assert pos.shape == (1, 1 + grid * grid, cfg.model.hidden_size) and not pos.requires_grad
    assert pos[0, 0].abs().sum() == 0 and pos[0, 1:].abs().sum() > 0  # CLS row zero, patches not
    assert len({tuple(row.tolist()) for row in pos[0, 1:]}) == grid * grid  # every patch distinct
    assert dpos[0, 1:].abs().sum() > 0 and vit.embeddings.cls_token.abs().sum() > 0
    assert decoder.mask_token.abs().sum() > 0
