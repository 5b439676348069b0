"""The fine-tuning objective (``classify``): its loss and head, loading a pretraining
objective's encoder, layer-wise lr decay, and the held-out top-1 of its head."""

from __future__ import annotations

import pytest
import torch

from sslscale.config import ConfigError, load_config
from sslscale.engine import apply_schedules, build_optimizer, param_groups
from sslscale.objectives import build_objective

from ..conftest import TINY, for_objective

IMAGE = ["model.image_size=28", "model.num_channels=1", "data.mean=[0.3]", "data.std=[0.35]"]


def config(*extra: str):
    return load_config(None, [*TINY, *IMAGE, "objective.name=classify", "objective.num_classes=10",
                              *extra])


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            "labels": torch.arange(n) % 10, "sample_seeds": torch.arange(n)}


def test_loss_is_label_smoothed_cross_entropy_of_the_head():
    torch.manual_seed(0)
    objective = build_objective(config("objective.label_smoothing=0.0")).eval()
    b = batch()
    out = objective(b)  # eval mode: no augmentation, so the logits are the ones scored below
    logits = objective.logits(b)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, b["labels"]))
    assert out.metrics["top1"] == (logits.argmax(1) == b["labels"]).float().mean()
    # a fresh head (std 2e-5) starts at chance: log(10)
    assert abs(out.loss.item() - torch.log(torch.tensor(10.0)).item()) < 1e-2
    b["labels"][:4] = -1  # unlabeled samples are ignored
    torch.testing.assert_close(objective(b).loss, torch.nn.functional.cross_entropy(logits[4:], b["labels"][4:]))


@pytest.mark.parametrize("source", ["mae", "moco_v3"])
def test_the_encoder_of_a_pretraining_objective_is_loaded_and_the_head_stays_new(source):
    torch.manual_seed(1)
    pretrained = build_objective(load_config(None, for_objective(source, [
        *TINY, *IMAGE, "objective.projection_hidden_dim=32", "objective.projection_dim=16"])))
    torch.manual_seed(2)
    objective = build_objective(config())
    head = objective.head.weight.clone()
    objective.load_pretrained(pretrained.state_dict())
    want = pretrained.encoder().state_dict()
    got = objective.backbone.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(objective.head.weight, head)


def test_an_encoder_that_does_not_fit_is_refused_naming_the_source():
    objective = build_objective(config())
    with pytest.raises(ValueError, match="ckpt-x: no image encoder weights"):
        objective.load_pretrained({"model.bert.embeddings.word_embeddings.weight": torch.zeros(3, 3)},
                                  source="ckpt-x")
    wider = build_objective(config("model.hidden_size=64", "model.intermediate_size=128"))
    with pytest.raises(ValueError, match="does not fit model"):
        objective.load_pretrained(wider.state_dict(), source="ckpt-y")


def test_layer_decay_scales_the_lr_per_block():
    cfg = config("optim.layer_decay=0.5", "optim.warmup_steps=0")
    objective = build_objective(cfg)
    groups = param_groups(objective, 0.5)
    layers = cfg.model.num_hidden_layers  # 2: embeddings 0.5^3, blocks 0.5^2 / 0.5, head 1
    assert sorted({g["lr_scale"] for g in groups}) == [0.5 ** (layers + 1 - i) for i in range(layers + 2)]
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(objective.head.weight)] == 1.0
    assert scale_of[id(objective.backbone.embeddings.cls_token)] == 0.5 ** (layers + 1)
    named = dict(objective.named_parameters())
    last_block = [p for n, p in named.items() if n.startswith(("backbone.layers.1.", "backbone.encoder.layer.1."))]
    assert last_block and all(scale_of[id(p)] == 0.5 for p in last_block)
    optimizer = build_optimizer(objective, cfg)
    hp = apply_schedules(optimizer, 0, cfg)
    assert {g["lr"] / hp["lr"] for g in optimizer.param_groups} == {g["lr_scale"] for g in groups}
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if g["wd_scale"] == 0)
    # no layer decay (and the pretraining objectives): the two groups as before, lr_scale 1
    assert len(param_groups(objective)) == 2
    assert len(param_groups(build_objective(load_config(None, [*TINY, *IMAGE])), 0.5)) == 2


@pytest.mark.parametrize("bad, key", [("optim.layer_decay=1.5", "optim.layer_decay"),
                                      ("objective.label_smoothing=1", "objective.label_smoothing"),
                                      ("objective.num_classes=-1", "objective.num_classes")])
def test_bad_fine_tuning_settings_are_refused(bad, key):
    with pytest.raises(ConfigError, match=key):
        config(bad)


def test_held_out_top1_is_the_heads(real_shards):
    from sslscale.data.shards import load_manifest
    from sslscale.finetune import classify_eval

    torch.manual_seed(0)
    objective = build_objective(config("objective.pooling=mean"))
    test = load_manifest(real_shards["test"])
    result = classify_eval(objective, test, device=torch.device("cpu"), image_size=28,
                           num_channels=1, batch_size=64, limit=64)
    from sslscale.evaluate import eval_batches
    from sslscale.data.stream import ImageDecoder

    b = next(eval_batches(test, rank=0, world_size=1, batch_size=64,
                          decode=ImageDecoder.for_manifest(test, 28, 1), limit=64))
    want = (objective.logits(b).argmax(1) == b["labels"]).float().mean().item()
    majority = torch.bincount(b["labels"]).max().item() / 64
    assert result == {"top1": pytest.approx(want), "num_test": 64, "majority_top1": majority}


TEXT = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", "model.max_position_embeddings=64", "model.name=bert",
        "model.vocab_size=100", "objective.name=classify", "objective.num_classes=3", "objective.pooling=mean"]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_drop_path_drops_or_scales_whole_residual_branches_per_sample(modality):
    from sslscale.objectives.classify import _BRANCH_ENDS

    def build(*extra):
        return build_objective(load_config(None, [*TEXT, *extra]) if modality == "text" else config(*extra)).eval()

    torch.manual_seed(0)
    rate = 0.5  # two blocks: block 0 keeps its branches, block 1 drops each with probability 0.5
    objective = build(f"objective.drop_path_rate={rate}")
    g = torch.Generator().manual_seed(0)
    b = (batch(32) if modality == "image" else
         {"input_ids": torch.randint(0, 100, (32, 16), generator=g), "attention_mask": torch.ones(32, 16, dtype=torch.long),
          "labels": torch.arange(32) % 3, "sample_seeds": torch.arange(32)})
    with objective.drop_path.sampled(b["sample_seeds"]):
        kept = objective.drop_path.scales[:, 2:] > 0  # block 1's attention and MLP branches
    assert objective.drop_path.scales is None  # only inside sampled()
    got = objective._pooled(b, train=True)  # eval mode (no dropout); train: augmented, dropped
    for factor, rows in ((0.0, ~kept.any(1)), (1 / (1 - rate), kept.all(1))):
        reference = build()  # no drop path: the branch ends' outputs scaled by hand instead
        reference.load_state_dict(objective.state_dict())
        modules = dict(reference.blocks()[1].named_modules())
        with torch.no_grad():
            for name in next(e for e in _BRANCH_ENDS if e[0] in modules):
                modules[name].weight.mul_(factor)
                modules[name].bias.mul_(factor)
        assert rows.any()
        torch.testing.assert_close(got[rows], reference._pooled(b, train=True)[rows])
    # outside training nothing is dropped; the draws are the seeds'
    reference = build()
    reference.load_state_dict(objective.state_dict())
    assert torch.equal(objective.features(b), reference.features(b))
    assert torch.equal(objective._pooled(b, train=True), got)


def test_drop_path_rates_grow_with_depth_and_keep_the_expectation():
    objective = build_objective(config("objective.drop_path_rate=0.3", "model.num_hidden_layers=4"))
    rates = objective.drop_path.rates  # timm's linspace(0, rate, depth), two branches a block
    torch.testing.assert_close(rates, torch.tensor([0.0, 0.1, 0.2, 0.3]).repeat_interleave(2))
    with objective.drop_path.sampled(torch.arange(40_000)):
        scales = objective.drop_path.scales.clone()
    torch.testing.assert_close((scales == 0).float().mean(0), rates, atol=0.01, rtol=0)
    torch.testing.assert_close(scales.mean(0), torch.ones(8), atol=0.01, rtol=0)  # unbiased
    assert build_objective(config()).drop_path is None  # the default: off
    with pytest.raises(ConfigError, match="objective.drop_path_rate"):
        config("objective.drop_path_rate=1")
