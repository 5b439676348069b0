"""sslscale.flops: the analytic training FLOPs per sample of every objective against what
``torch.utils.flop_counter.FlopCounterMode`` counts in a real forward + backward of the built
objective (eager attention, whose matmuls the counter sees; CPU SDPA is invisible to it), and
the peak table / MFU helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sslscale import flops
from sslscale.config import load_config
from sslscale.objectives import build_objective

from ..conftest import for_objective

SMALL = [
    "model.image_size=32", "model.patch_size=8", "model.num_channels=3", "model.hidden_size=64",
    "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.intermediate_size=128",
    "model.decoder_hidden_size=32", "model.decoder_num_hidden_layers=2",
    "model.decoder_num_attention_heads=2", "model.decoder_intermediate_size=64",
    "model.attn_implementation=eager", "objective.projection_hidden_dim=64",
    "objective.projection_dim=32", "objective.predictor_hidden_dim=48",
    "objective.blur_prob=[0.0,0.0]",  # kornia's blur is a convolution the counter would add
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
]
B = 8


def counted_per_sample(objective, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        objective(batch).loss.backward()
    return counter.get_total_flops() / B


@pytest.mark.parametrize("name", ["mae", "simclr", "moco_v3", "simsiam", "classify", "rotnet", "dae", "vae"])
def test_image_objectives_match_flop_counter(name):
    cfg = load_config(None, for_objective(name, [*SMALL, "objective.num_classes=10"]))
    torch.manual_seed(0)
    objective = build_objective(cfg)
    batch = {"pixel_values": torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8),
             "labels": torch.arange(B)}
    want = counted_per_sample(objective, batch)
    if name in ("dae", "vae"):  # torch's MultiheadAttention runs SDPA, invisible to the counter on CPU
        want += flops.TRAIN * cfg.model.decoder_num_hidden_layers * 4 * 16 ** 2 * cfg.model.decoder_hidden_size
    got = flops.flops_per_sample(cfg, **({"columns": B} if name in ("simclr", "moco_v3", "simsiam") else {}))
    # within 5% is the contract; these agree to <1% (the rest: the tiled InfoNCE's recompute)
    assert got == pytest.approx(want, rel=0.01), (name, got, want)


def test_text_classify_matches_flop_counter():
    """Fine-tuning a BERT (``model.name=bert``): the encoder on the block, the head once."""
    L, V = 16, 100
    cfg = load_config(None, for_objective("classify", [*SMALL, "objective.num_classes=10",
                                                       f"model.vocab_size={V}"], model="bert")
                      + ["model.name=bert"])
    torch.manual_seed(0)
    objective = build_objective(cfg)
    batch = {"input_ids": torch.randint(0, V, (B, L)), "attention_mask": torch.ones(B, L, dtype=torch.long),
             "labels": torch.arange(B)}
    want = counted_per_sample(objective, batch)
    got = flops.flops_per_sample_of_batch(cfg, batch, world_size=1)
    assert got == pytest.approx(want, rel=0.01)


def test_mae_counts_visible_tokens_only():
    """Masking 75% must make the encoder ~4x cheaper: the count is not 6 x params x patches."""
    light = flops.mae_flops_per_sample(load_config(None, for_objective("mae", [*SMALL, "objective.mask_ratio=0.75"])))
    heavy = flops.mae_flops_per_sample(load_config(None, for_objective("mae", [*SMALL, "objective.mask_ratio=0.0"])))
    assert light < 0.6 * heavy


def test_mlm_head_on_masked_positions_matches_flop_counter():
    L, K, V = 16, 3, 100
    cfg = load_config(None, for_objective("mlm", [*SMALL, f"model.vocab_size={V}"]))
    torch.manual_seed(0)
    objective = build_objective(cfg)
    ids = torch.randint(0, V, (B, L))
    labels = torch.full((B, L), -100)
    labels[:, 2:2 + K] = ids[:, 2:2 + K]
    want = counted_per_sample(objective, {"input_ids": ids, "labels": labels,
                                          "attention_mask": torch.ones(B, L, dtype=torch.long)})
    got = flops.flops_per_sample(cfg, seq_len=L, vocab_size=V, masked_per_sample=K)
    assert got == pytest.approx(want, rel=0.01)
    full_head = flops.mlm_flops_per_sample(cfg, seq_len=L, vocab_size=V, masked_per_sample=L)
    h = cfg.model.hidden_size  # the head on all L positions: (L - K) more rows of h x (h + V)
    assert full_head - got == pytest.approx(3 * 2 * (L - K) * h * (h + V))


def test_clm_decoder_and_head_on_every_position_match_flop_counter():
    """GPT-2 (eager attention, Conv1D = addmm): the transformer and the LM head on all L positions."""
    L, V = 16, 100
    cfg = load_config(None, for_objective("clm", [*SMALL, f"model.vocab_size={V}"]))
    assert cfg.model.name == "gpt2"
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, V, (B, L))}
    want = counted_per_sample(build_objective(cfg), batch)
    got = flops.flops_per_sample_of_batch(cfg, batch, world_size=2)
    assert got == flops.flops_per_sample(cfg, seq_len=L, vocab_size=V)
    assert got == pytest.approx(want, rel=0.01)
    with pytest.raises(ValueError, match="seq_len=0"):
        flops.clm_flops_per_sample(cfg, seq_len=0, vocab_size=V)


def test_counts_read_from_a_batch():
    """What the trainer calls on a logging step: sequence length, masked count, world size."""
    cfg = load_config(None, for_objective("mlm", [*SMALL, "model.vocab_size=100"]))
    labels = torch.full((4, 16), -100)
    labels[:, :2] = 7  # 2 predicted tokens per sequence
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "labels": labels}
    assert flops.flops_per_sample_of_batch(cfg, batch, world_size=8) == \
        flops.mlm_flops_per_sample(cfg, seq_len=16, vocab_size=100, masked_per_sample=2)
    images = {"pixel_values": torch.zeros(4, 3, 32, 32, dtype=torch.uint8)}
    simclr = load_config(None, for_objective("simclr", SMALL))
    assert flops.flops_per_sample_of_batch(simclr, images, world_size=8) == \
        flops.two_view_flops_per_sample(simclr, columns=32)
    local = load_config(None, for_objective("simclr", [*SMALL, "objective.negatives=local"]))
    assert flops.flops_per_sample_of_batch(local, images, world_size=8) == \
        flops.two_view_flops_per_sample(local, columns=4)


def test_unknown_objective_and_bad_arguments():
    with pytest.raises(ValueError, match="objective.name='byol'"):
        flops.flops_per_sample(SimpleNamespace(objective=SimpleNamespace(name="byol")))
    with pytest.raises(ValueError, match="seq_len=0"):
        flops.mlm_flops_per_sample(load_config(None, for_objective("mlm", SMALL)), seq_len=0, vocab_size=10)
    with pytest.raises(ValueError, match="num_devices=0"):
        flops.mfu(1e9, 1.0, num_devices=0, peak_tflops_per_device=989)


def test_peak_table_override_and_mfu(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756
    assert flops.peak_tflops("NVIDIA H200") == 989
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert flops.peak_tflops("Some CPU") is None
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", override=500) == 500
    # an fp32 run is measured against what fp32 can reach: CUDA cores, or TF32 when allowed
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", precision="fp32") == 67
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert flops.peak_tflops("NVIDIA H100 80GB HBM3", precision="fp32") == 494.5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", precision="fp16") == 312
    with pytest.raises(ValueError, match="precision"):
        flops.peak_tflops("NVIDIA H100", precision="int8")
    monkeypatch.setenv(flops.PEAK_ENV, "123")
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 123
    # 8 GPUs at 989 TFLOP/s, 1e12 FLOPs per sample, 3956 samples/s -> 50%
    assert flops.mfu(1e12, 3956.0, num_devices=8, peak_tflops_per_device=989) == pytest.approx(0.5)
