"""Training-step throughput, MFU and peak memory: sslscale's real step vs HF in a plain loop.

Workloads, from the recipes in ``configs/`` with synthetic inputs (one pinned host batch, copied
to the device inside every timed step on both sides):
- ``mae``: MAE ViT-B/16, 224 px, mask 0.75 (``configs/mae_vit_base_16.yaml``). Baseline:
  transformers' ``ViTMAEForPreTraining`` of the same config on sslscale's augmented views.
- ``mlm``: BERT-base MLM, sequence 128, 15% predicted (``configs/mlm_bert_base.yaml``). Baseline:
  ``BertForMaskedLM(..., labels=...)``: the head on every position (full logits).
- ``simclr``: SimCLR ViT-B/16 (``configs/simclr_vit_base_16.yaml``). Baseline: ``ViTModel`` + the
  same projector + NT-Xent on materialized logits (as open_clip's loss does).

sslscale's side is what ``sslscale train`` runs: the DeepSpeed engine of ``sslscale.engine``
(the recipe's precision and ZeRO stage: bf16 weights with float32 master copies on CUDA; torch's
fused AdamW; gradient clipping) stepped by ``Trainer.train_step`` (schedules, device copy,
non-finite guard, backward, step). The baseline is the plain loop a user of transformers writes
instead: bf16 autocast over float32 weights on CUDA (as the HF Trainer's ``bf16=True``), the same
AdamW (``sslscale.engine.build_optimizer``), schedules and ``clip_grad_norm_``. ``--compile``
compiles both sides (sslscale: ``train.compile=true``, DeepSpeed's ``engine.compile``; baseline:
``torch.compile`` of the model); without it neither is. Timed windows alternate between the sides
(CUDA events; medians). MFU counts the useful model FLOPs of ``sslscale.flops`` for both sides,
against the table's peak of the run's precision (bf16 here) and against the bf16 matmul peak
measured at the start. Asserts nothing.

    python bench/gpu_steps.py [--workloads mae,mlm,simclr] [--batch 128] [--compile] [--json F]
    python bench/gpu_steps.py --device cpu --tiny     # a smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
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
# --tiny overrides: every model's, then per family (vit, bert) and objective (the keys each has)
TINY = {"all": ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                "model.intermediate_size=128"],
        "vit": ["model.image_size=32", "model.patch_size=8", "model.decoder_hidden_size=32",
                "model.decoder_num_hidden_layers=1", "model.decoder_num_attention_heads=2",
                "model.decoder_intermediate_size=64"],
        "bert": ["model.vocab_size=512"],
        "simclr": ["objective.projection_hidden_dim=64", "objective.projection_dim=32"]}


def tiny_overrides(name: str) -> list[str]:
    """The --tiny overrides of objective ``name`` (only keys its objective and model have)."""
    return TINY["all"] + TINY["bert" if name == "mlm" else "vit"] + TINY.get(name, [])


def synthetic_batch(name: str, cfg, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Host tensors (pinned with CUDA): uint8 images (B, C, S, S) + seeds, or token ids (B, L)
    with 15% of positions predicted, as ``labels`` (B, L) and ``masked_positions`` /
    ``masked_labels`` (B, K) (what sslscale's data workers produce)."""
    from sslscale.data.masking import masked_positions_of, max_predictions_per_seq

    g = torch.Generator().manual_seed(0)
    if name != "mlm":
        m = cfg.model
        images = torch.randint(0, 256, (batch, m.num_channels, m.image_size, m.image_size),
                               generator=g, dtype=torch.uint8)
        out = {"pixel_values": images, "sample_seeds": torch.arange(batch)}
    else:
        ids = torch.randint(min(1000, cfg.model.vocab_size // 2), cfg.model.vocab_size,
                            (batch, seq_len), generator=g)
        k = max_predictions_per_seq(seq_len, MLM_P)  # the data workers' K slots per block
        chosen = torch.rand(batch, seq_len, generator=g) < MLM_P
        chosen &= chosen.cumsum(1) <= k  # (they cap a block's predictions at K too)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        positions, targets = masked_positions_of(labels, k)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
               "masked_positions": positions, "masked_labels": targets}
    return {k: v.pin_memory() for k, v in out.items()} if torch.cuda.is_available() else out


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent with the (2B, 2B) logits materialized: the baseline's loss."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T).float() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, targets)


def baseline(name: str, cfg, helper) -> tuple[torch.nn.Module, callable]:
    """The Hugging Face model of the workload and its loss of a device batch. ``helper`` is a
    separate sslscale objective lending its augmentation (and SimCLR's projector shape)."""
    from transformers import BertForMaskedLM, ViTMAEForPreTraining, ViTModel

    from sslscale.objectives.contrastive import vit_config
    from sslscale.objectives.mae import vit_mae_config
    from sslscale.objectives.mlm import bert_config

    if name == "mae":
        model = ViTMAEForPreTraining(vit_mae_config(cfg))
        return model, lambda m, b: m(pixel_values=helper.transform(b["pixel_values"],
                                                                   b["sample_seeds"])).loss
    if name == "mlm":
        model = BertForMaskedLM(bert_config(cfg))
        return model, lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     labels=b["labels"]).loss
    model = torch.nn.ModuleDict({"vit": ViTModel(vit_config(cfg), add_pooling_layer=False),
                                 "proj": helper._head("projector2")})

    def simclr_loss(m, b):
        h = m["vit"](pixel_values=helper.views(b)).last_hidden_state[:, 0]
        p1, p2 = m["proj"](h).chunk(2)
        return naive_nt_xent(p1, p2, cfg.objective.temperature)
    return model, simclr_loss


class PlainLoop:
    """The baseline's step: host batch -> device, (autocast) loss, backward, clip, AdamW."""

    def __init__(self, cfg, module, loss_fn, device, compile_: bool):
        from sslscale.engine import build_optimizer

        self.cfg, self.device, self.loss_fn = cfg, device, loss_fn
        self.module = module.to(device).train()
        self.forward_module = torch.compile(self.module) if compile_ else self.module
        self.opt = build_optimizer(self.module, cfg)
        self.step_count = 0

    def step(self, host_batch) -> None:
        from sslscale.engine import apply_schedules

        apply_schedules(self.opt, self.step_count, self.cfg)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host_batch.items()}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.loss_fn(self.forward_module, batch)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1


class SslscaleStep:
    """sslscale's step: the engine ``sslscale train`` builds, stepped by ``Trainer.train_step``
    on batches shaped as the data loader yields them (with stream positions)."""

    def __init__(self, cfg, run_dir: Path):
        from sslscale.engine import build_engine
        from sslscale.metrics import MetricsLogger
        from sslscale.trainer import Trainer

        self.engine = build_engine(cfg, 1, lambda: build_objective(cfg))
        metrics = MetricsLogger(run_dir, enabled=False, max_steps=cfg.train.max_steps, start_step=0)
        self.trainer = Trainer(cfg, self.engine, make_batches=None, samples_per_epoch=10**9,
                               metrics=metrics, is_main=True, config_dict={})
        self.host_batch: dict[str, torch.Tensor] = {}
        self.batches = self._loader()

    def _loader(self):
        while True:
            yield {**self.host_batch, "stream_positions": torch.tensor([[0, 0]]),
                   "data_skipped": torch.tensor([0, 0, 0])}

    def step(self, host_batch) -> None:
        self.host_batch = host_batch
        self.trainer.train_step(self.batches)


class Side:
    """One side of a comparison: its step, timed windows (ms per step) and peak memory."""

    def __init__(self, label: str, stepper, device):
        self.label, self.stepper, self.device = label, stepper, device
        self.ms: list[float] = []
        self.peak_mib = 0.0

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
            self.stepper.step(batch)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            self.ms.append(start.elapsed_time(end) / steps)
            peak = (torch.cuda.max_memory_allocated() - resident) / 2**20
            self.peak_mib = max(self.peak_mib, peak)
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


def workload_config(name: str, args, device, run_dir: Path):
    overrides = [f"objective.name={name}", f"train.global_batch_size={args.batch}",
                 f"train.micro_batch_size={args.batch}", f"train.compile={args.compile}",
                 f"run_dir={run_dir}"]
    if device.type != "cuda":
        overrides.append("train.precision=auto")  # fp32 on CPU (bf16 is emulated there)
    return load_config(ROOT / RECIPES[name], overrides + (tiny_overrides(name) if args.tiny else []))


def run_workload(name: str, args, device, run_dir: Path) -> dict:
    cfg = workload_config(name, args, device, run_dir)
    torch.manual_seed(0)
    ours = SslscaleStep(cfg, run_dir)
    helper = build_objective(cfg).to(device)  # augmentation for the baseline, float32
    base_module, base_loss = baseline(name, cfg, helper)
    sides = [Side("sslscale", ours, device),
             Side("hf-baseline", PlainLoop(cfg, base_module, base_loss, device, args.compile),
                  device)]
    batch = synthetic_batch(name, cfg, args.batch, SEQ_LEN if not args.tiny else 16)
    for side in sides:
        side.window(batch, args.warmup)  # warm-up (compile, autotune, allocator)
        side.ms.clear()
    for _ in range(args.windows):
        for side in sides:
            side.window(batch, args.steps)
    fps = flops.flops_per_sample_of_batch(cfg, batch, world_size=1)
    precision = ours.engine.precision
    peaks = {"table": flops.peak_tflops(precision=precision) if device.type == "cuda" else None,
             "matmul": args.matmul_peak}
    result = {"workload": name, "batch": args.batch, "precision": precision,
              "compile": args.compile, "flops_per_sample": fps, "peaks": peaks, "sides": {}}
    for side in sides:
        ms = statistics.median(side.ms)
        per_sec = args.batch / (ms * 1e-3)
        row = {"ms_per_step": ms, "ms_min": min(side.ms), "ms_max": max(side.ms),
               "samples_per_sec": per_sec, "peak_mib": side.peak_mib}
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
    del sides, ours, base_module, helper
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
        print(f"{name:7s} {label:12s} {row['ms_per_step']:9.2f} ms/step "
              f"[{row['ms_min']:.2f}-{row['ms_max']:.2f}] {rate:12.1f} {unit}  "
              f"peak {row['peak_mib']:8.0f} MiB  {mfu}")
    ratio = sides["sslscale"]["samples_per_sec"] / sides["hf-baseline"]["samples_per_sec"]
    if "loss_share" in result:
        print(f"{name} loss (tiled InfoNCE, forward + backward): {result['loss_ms']:.3f} ms, "
              f"{result['loss_share'] * 100:.2f}% of the step")
    print(f"{name} throughput ratio sslscale / hf-baseline: {ratio:.2f}x "
          f"({result['precision']}, compile={result['compile']})")


def single_process_env() -> None:
    """The variables ``sslscale.engine.init_distributed`` reads, for a one-process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mae,mlm,simclr")
    parser.add_argument("--batch", type=int, default=128, help="samples per step (per GPU)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 4 samples, 1 step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.steps, args.windows, args.warmup = 4, 1, 1, 1
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    single_process_env()
    from sslscale.engine import init_distributed
    init_distributed()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.matmul_peak = matmul_peak_tflops(device)
    print(f"device: {name}; peak bf16 TFLOP/s: table "
          f"{flops.peak_tflops(name) if device.type == 'cuda' else None}, measured matmul "
          f"{args.matmul_peak and round(args.matmul_peak, 1)}; compile={args.compile} (both sides)",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workloads.split(","):
            results.append(run_workload(w, args, device, Path(tmp) / w))
            report(results[-1])
    if args.json:
        args.json.write_text(json.dumps({"device": name, "matmul_peak": args.matmul_peak,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
