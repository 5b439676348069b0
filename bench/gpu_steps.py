"""Training-step throughput, MFU and peak memory: sslscale's objectives vs Hugging Face baselines.

Workloads, from the recipes in ``configs/`` with synthetic inputs made on the device:
- ``mae``: MAE ViT-B/16, 224 px, mask 0.75 (``configs/mae_vit_base_16.yaml``). Baseline:
  transformers' ``ViTMAEForPreTraining`` of the same config, called directly.
- ``mlm``: BERT-base MLM, sequence 128, 15% predicted (``configs/mlm_bert_base.yaml``). Baseline:
  ``BertForMaskedLM(..., labels=...)``: the head on every position (full logits).
- ``simclr``: SimCLR ViT-B/16 (``configs/simclr_vit_base_16.yaml``). Baseline: ``ViTModel`` + the
  same projector + NT-Xent on materialized logits (as open_clip's loss does).

Both sides of a workload run in one process on the same inputs, with the same precision (bf16
autocast over fp32 weights on CUDA, fp32 on CPU), the same fused AdamW and the same on-device
augmentation (the baseline gets sslscale's views), so the ratio measures the model-side choices:
SDPA attention, the masked-only MLM head, the tiled InfoNCE, and ``torch.compile`` with
``--compile``. Timed windows alternate between the sides (CUDA events; medians). MFU counts the
useful model FLOPs of ``sslscale.flops`` for both sides, against 989 TFLOP/s (or the table's
peak for the GPU) and against the bf16 matmul peak measured at the start. Asserts nothing.

    python bench/gpu_steps.py [--workloads mae,mlm,simclr] [--batch 128] [--compile] [--json F]
    python bench/gpu_steps.py --device cpu --tiny     # a smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sslscale import flops  # noqa: E402
from sslscale.config import load_config  # noqa: E402
from sslscale.objectives import build_objective  # noqa: E402

RECIPES = {"mae": "configs/mae_vit_base_16.yaml", "mlm": "configs/mlm_bert_base.yaml",
           "simclr": "configs/simclr_vit_base_16.yaml"}
SEQ_LEN, MLM_P = 128, 0.15
TINY = ["model.image_size=32", "model.patch_size=8", "model.hidden_size=64",
        "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=128",
        "model.decoder_hidden_size=32", "model.decoder_num_hidden_layers=1",
        "model.decoder_num_attention_heads=2", "model.decoder_intermediate_size=64",
        "model.vocab_size=512", "objective.projection_hidden_dim=64", "objective.projection_dim=32"]


def synthetic_batch(name: str, cfg, batch: int, seq_len: int, device) -> dict[str, torch.Tensor]:
    """uint8 images (B, C, S, S) + seeds, or token ids (B, L) with 15% of positions as labels."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if name != "mlm":
        m = cfg.model
        images = torch.randint(0, 256, (batch, m.num_channels, m.image_size, m.image_size),
                               generator=g, dtype=torch.uint8)
        return {"pixel_values": images.to(device), "sample_seeds": torch.arange(batch).to(device)}
    ids = torch.randint(min(1000, cfg.model.vocab_size // 2), cfg.model.vocab_size, (batch, seq_len),
                        generator=g)
    chosen = torch.rand(batch, seq_len, generator=g) < MLM_P
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent with the (2B, 2B) logits materialized: the baseline's loss."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T).float() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def baseline(name: str, cfg, ours) -> tuple[torch.nn.Module, callable]:
    """The Hugging Face model of the workload and its loss function of a batch."""
    from transformers import BertForMaskedLM, ViTMAEForPreTraining, ViTModel

    from sslscale.objectives.contrastive import vit_config
    from sslscale.objectives.mae import vit_mae_config
    from sslscale.objectives.mlm import bert_config

    if name == "mae":
        model = ViTMAEForPreTraining(vit_mae_config(cfg))
        return model, lambda b: model(pixel_values=ours.transform(b["pixel_values"],
                                                                   b["sample_seeds"])).loss
    if name == "mlm":
        model = BertForMaskedLM(bert_config(cfg))
        return model, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      labels=b["labels"]).loss
    model = torch.nn.ModuleDict({"vit": ViTModel(vit_config(cfg), add_pooling_layer=False),
                                 "proj": ours._head("projector2")})

    def simclr_loss(b):
        views = ours.views(b)
        h = model["vit"](pixel_values=views).last_hidden_state[:, 0]
        p1, p2 = model["proj"](h).chunk(2)
        return naive_nt_xent(p1, p2, cfg.objective.temperature)
    return model, simclr_loss


class Side:
    """One side of a comparison: a module, its loss of a batch, a fused AdamW; timed steps."""

    def __init__(self, label: str, module, loss_fn, device):
        self.label, self.module, self.loss_fn, self.device = label, module.to(device), loss_fn, device
        params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        self.ms: list[float] = []
        self.peak_mib = 0.0

    def step(self, batch) -> None:
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.loss_fn(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def window(self, batch, steps: int) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            self.ms.append(start.elapsed_time(end) / steps)
            self.peak_mib = max(self.peak_mib, (torch.cuda.max_memory_allocated() - resident) / 2**20)
        else:
            self.ms.append((time.perf_counter() - t0) * 1e3 / steps)


def matmul_peak_tflops(device, size: int = 8192, reps: int = 20) -> float | None:
    """Measured bf16 ``size^3`` matmul TFLOP/s (CUDA only)."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (start.elapsed_time(end) * 1e-3) / 1e12


def loss_ms(cfg, batch: int, device, steps: int) -> float:
    """Milliseconds of SimCLR's NT-Xent alone (forward + backward, tiled InfoNCE) at the step's
    shape: 2B unit-norm projections of ``objective.projection_dim`` against themselves."""
    from sslscale.kernels import info_nce

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    z = F.normalize(torch.randn(2 * batch, cfg.objective.projection_dim, device=device), dim=1)
    z = z.to(dtype).requires_grad_()
    idx = torch.arange(2 * batch, device=device)

    def once():
        info_nce(z, z, (idx + batch) % (2 * batch), temperature=cfg.objective.temperature,
                 exclude=idx).mean().backward()
    once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def run_workload(name: str, args, device, peaks: dict) -> dict:
    overrides = [f"objective.name={name}"] + (TINY if args.tiny else [])
    cfg = load_config(ROOT / RECIPES[name], overrides)
    torch.manual_seed(0)
    ours = build_objective(cfg)
    base_module, base_loss = baseline(name, cfg, ours)
    forward = torch.compile(ours) if args.compile else ours
    sides = [Side("sslscale", ours, lambda b: forward(b).loss, device),
             Side("hf-baseline", base_module, base_loss, device)]
    batch = synthetic_batch(name, cfg, args.batch, SEQ_LEN if not args.tiny else 16, device)
    for side in sides:
        side.window(batch, args.warmup)  # warm-up (compile, autotune, allocator)
        side.ms.clear()
    for _ in range(args.windows):
        for side in sides:
            side.window(batch, args.steps)
    fps = flops.flops_per_sample_of_batch(cfg, batch, world_size=1)
    result = {"workload": name, "batch": args.batch, "flops_per_sample": fps, "sides": {}}
    for side in sides:
        ms = statistics.median(side.ms)
        per_sec = args.batch / (ms * 1e-3)
        row = {"ms_per_step": ms, "samples_per_sec": per_sec, "peak_mib": side.peak_mib}
        if name == "mlm":
            row["tokens_per_sec"] = per_sec * batch["input_ids"].shape[1]
        for key, peak in peaks.items():
            if peak:
                row[f"mfu_vs_{key}"] = flops.mfu(fps, per_sec, num_devices=1,
                                                 peak_tflops_per_device=peak)
        result["sides"][side.label] = row
    if name == "simclr":
        result["loss_ms"] = loss_ms(cfg, args.batch, device, max(args.steps, 10))
        result["loss_share"] = result["loss_ms"] / result["sides"]["sslscale"]["ms_per_step"]
    del sides, ours, base_module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def report(result: dict) -> None:
    name, sides = result["workload"], result["sides"]
    unit = "tokens/s" if name == "mlm" else "img/s"
    for label, row in sides.items():
        rate = row.get("tokens_per_sec", row["samples_per_sec"])
        mfu = "  ".join(f"MFU({k[7:]}) {v * 100:5.1f}%" for k, v in row.items()
                        if k.startswith("mfu_vs_"))
        print(f"{name:7s} {label:12s} {row['ms_per_step']:9.2f} ms/step {rate:12.1f} {unit}  "
              f"peak {row['peak_mib']:8.0f} MiB  {mfu}")
    ratio = sides["sslscale"]["samples_per_sec"] / sides["hf-baseline"]["samples_per_sec"]
    if "loss_share" in result:
        print(f"{name} loss (tiled InfoNCE, forward + backward): {result['loss_ms']:.3f} ms, "
              f"{result['loss_share'] * 100:.2f}% of the step")
    print(f"{name} throughput ratio sslscale / hf-baseline: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mae,mlm,simclr")
    parser.add_argument("--batch", type=int, default=128, help="samples per step (per GPU)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile sslscale's objective")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 4 samples, 1 step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.steps, args.windows, args.warmup = 4, 1, 1, 1
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = {"table": flops.peak_tflops(name) if device.type == "cuda" else None,
             "matmul": matmul_peak_tflops(device)}
    print(f"device: {name}; peak bf16 TFLOP/s: table {peaks['table']}, measured matmul "
          f"{peaks['matmul'] and round(peaks['matmul'], 1)}; compile={args.compile}")
    results = [run_workload(w, args, device, peaks) for w in args.workloads.split(",")]
    for result in results:
        report(result)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peaks": peaks, "results": results}, indent=1))


if __name__ == "__main__":
    main()
