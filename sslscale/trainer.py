"""The training loop, one for every objective: batch -> objective -> backward / step -> log ->
maybe evaluate -> maybe save.

``step`` counts optimizer steps; each takes ``grad_accum_steps`` micro-batches per rank (DeepSpeed
accumulates and steps at the boundary). Rank handling lives in the metrics logger and the
checkpoint module, not here: every rank runs the same code and the same number of steps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sslscale import checkpoint, flops
from sslscale.dist import rank_and_world
from sslscale.engine import Engine, apply_schedules
from sslscale.metrics import MetricsLogger
from sslscale.stop import StopSignals, StopVote


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # global count of samples read, incl. discarded micro-batches
    tokens_seen: int = 0  # global count of input tokens read (text objectives)
    stop_code: int = 0  # exits.PREEMPTED / INTERRUPTED: stopped early by a signal, after saving


class Trainer:
    """Runs ``cfg.train.max_steps`` optimizer steps of ``engine`` on ``batches``.

    ``make_batches(positions, phase)`` returns the endless micro-batch iterator from the given
    stream positions (called once, after a resume has set the state); batches carry the
    positions of the streams they consumed, which the trainer keeps and checkpoints.
    ``evaluate()`` (optional, collective) returns metrics such as ``{"knn_top1": ...}``, logged
    under ``eval/``. ``num_streams``: the stream positions to keep (default ``data.num_streams``;
    ``cyclegan``: twice that, ``sslscale.data.domains``).
    """

    def __init__(self, cfg, engine: Engine, *, make_batches: Callable[..., Iterator[dict]],
                 samples_per_epoch: int, metrics: MetricsLogger, is_main: bool,
                 config_dict: dict[str, Any], evaluate: Callable[[], dict] | None = None,
                 watchdog=None, stop: StopSignals | None = None, num_streams: int | None = None):
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.make_batches, self.samples_per_epoch = make_batches, samples_per_epoch
        self.is_main, self.config_dict, self.evaluate_fn = is_main, config_dict, evaluate
        self.watchdog = watchdog  # sslscale.watchdog.StallWatchdog, or None
        self.stop = stop  # installed by fit() if not given
        self.run_dir = Path(cfg.run_dir)
        self.state = TrainState()
        # samples consumed per stream (own streams exact); cyclegan: both domains' streams
        self.positions = [0] * (num_streams or cfg.data.num_streams)
        self._skipped_before = [0, 0]  # skipped samples, shards: totals of earlier runs
        self._skipped: dict[int, list[int]] = {}  # data-loader worker -> its counters, this run
        self._last_saved = -1
        # Non-finite micro-batch losses (this rank, this run) and those of the current step:
        # device counters, read only when a step was skipped or at logging (no host sync).
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=engine.device)
        self._step_nonfinite = torch.zeros((), dtype=torch.int64, device=engine.device)
        self._bad_steps = 0  # consecutive optimizer steps skipped for non-finite losses
        self._micro_batches, self._rollbacks = 0, 0
        self._vote: StopVote | None = None  # made by fit() (a collective)
        fault = os.environ.get(checkpoint.FAULT_ENV, "")
        self._fault = tuple(map(int, fault[9:].split("-"))) if fault.startswith("nan-loss:") else None
        self._crash_at = int(fault[14:]) if fault.startswith("crash-at-step:") else None
        self._window = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, micro-batches
        self._window_metrics: dict[str, torch.Tensor] = {}  # the objective's own terms, summed
        self._window_counts: dict[str, torch.Tensor] = {}  # ... over this many finite micro-batches
        self._window_start = (time.perf_counter(), 0, 0)  # time, step, tokens_seen
        self._tokens_pending = 0  # this rank's input tokens not yet counted in tokens_seen
        self._step_hook = getattr(engine.module, "on_step_start", None)  # e.g. MoCo's EMA
        self._peak_tflops = flops.peak_tflops(precision=engine.precision) \
            if engine.device.type == "cuda" else None
        self._last_batch: dict[str, torch.Tensor] = {}  # for the FLOP count of logged steps
        # an objective that draws pictures of its progress (cyclegan): rank 0, every N steps
        self._write_images = getattr(engine.module, "write_images", None) if is_main else None

    # ----------------------------------------------------------------------------- resume / save
    def resume(self) -> bool:
        """Load the checkpoint ``cfg.resume`` points at, if any; True if one was loaded. One
        from another world size loads elastically (``checkpoint.load``); another ZeRO stage or
        model shape raises ``ConfigError``."""
        folder = checkpoint.resolve_resume(self.cfg.resume, self.run_dir)
        if folder is None:
            return False
        world_size = torch.distributed.get_world_size()
        elastic = checkpoint.check_compatible(folder, world_size, self.cfg.deepspeed.zero_stage,
                                              self.config_dict)
        start = time.perf_counter()
        data = self._restore(folder).get("data", {})  # elastic: via a universal checkpoint
        self.positions = list(data.get("positions", self.positions))
        self._skipped_before = list(data.get("skipped", self._skipped_before))
        how = f" on {world_size} rank(s), elastic" if elastic else ""
        if elastic and self.cfg.deepspeed.zero_stage > 0:
            how += f" (universal checkpoint {checkpoint.universal_folder(folder)})"
        self.metrics.info(f"resumed from {folder} at step {self.state.step}{how} in "
                          f"{time.perf_counter() - start:.1f} s")
        return True

    def _restore(self, folder: Path) -> dict[str, Any]:
        """Engine, RNG, step and samples_seen from ``folder``; returns its client state. An
        objective keeping state beside its weights drops it (``on_restore``, e.g. MoCo's EMA master)."""
        client = checkpoint.load(self.engine.ds, folder)
        if hasattr(self.engine.module, "on_restore"):
            self.engine.module.on_restore()
        self.state = TrainState(step=int(client["step"]), samples_seen=int(client["samples_seen"]),
                                tokens_seen=int(client.get("tokens_seen", 0)))
        self._last_saved = self.state.step
        return client

    def save(self) -> None:
        start = time.perf_counter()
        self._phase("save")
        self._sync_tokens()
        client = {"step": self.state.step, "samples_seen": self.state.samples_seen,
                  "tokens_seen": self.state.tokens_seen,
                  "config": self.config_dict, "data": self.data_state()}
        folder = checkpoint.save(self.engine.ds, self.run_dir, self.state.step, client, self.is_main)
        self._phase("step")
        self._last_saved = self.state.step
        self.metrics.info(f"saved {folder} in {time.perf_counter() - start:.2f} s")
        if self.is_main:
            for old in checkpoint.retain(self.run_dir, self.cfg.checkpoint.keep_last,
                                         self.cfg.checkpoint.keep_every):
                self.metrics.info(f"deleted {old} (checkpoint.keep_last={self.cfg.checkpoint.keep_last})")

    def data_state(self) -> dict[str, Any]:
        """Stream positions of all ranks (collective): each rank knows its own streams exactly
        and positions only grow, so the element-wise max over ranks is the global state."""
        positions = self._all_reduce(self.positions, torch.distributed.ReduceOp.MAX)
        return {"num_streams": len(self.positions), "positions": positions, "skipped": self.skipped()}

    def _all_reduce(self, values: list[int], op=torch.distributed.ReduceOp.SUM) -> list[int]:
        """``values`` reduced over ranks (collective), through the engine's device (NCCL reduces
        CUDA tensors only)."""
        t = torch.tensor(values, dtype=torch.long, device=self.engine.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def skipped(self) -> list[int]:
        """Skipped samples and shards of all ranks, all runs (collective)."""
        mine = self._all_reduce([sum(c[i] for c in self._skipped.values()) for i in (0, 1)])
        return [a + b for a, b in zip(self._skipped_before, mine)]

    def _sync_tokens(self) -> None:
        """Add every rank's pending token counts to ``tokens_seen`` (collective)."""
        self.state.tokens_seen += self._all_reduce([self._tokens_pending])[0]
        self._tokens_pending = 0

    def _take_data_state(self, batch: dict[str, torch.Tensor]) -> None:
        for stream, k in batch.pop("stream_positions").tolist():
            self.positions[stream] = k
        worker, samples, shards = batch.pop("data_skipped").tolist()
        self._skipped[worker] = [samples, shards]

    # -------------------------------------------------------------------------------------- loop
    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (a collective)."""
        return bool(self._all_reduce([int(flag)], torch.distributed.ReduceOp.MAX)[0])

    def _phase(self, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.phase(name)

    def _next_batch(self, batches: Iterator[dict]) -> dict[str, torch.Tensor]:
        """The next micro-batch on the device; its stream positions and token count taken."""
        batch = next(batches)
        self._take_data_state(batch)
        if "input_ids" not in batch:  # images, audio (its attention_mask covers waveform samples)
            pass
        elif "attention_mask" in batch:  # host tensors: counting them costs no device sync
            self._tokens_pending += int(batch["attention_mask"].sum())
        else:
            self._tokens_pending += batch["input_ids"].numel()
        batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}
        self._last_batch = batch
        return batch

    def _forward(self, batch: dict[str, torch.Tensor], loss_of: Callable | None = None,
                 logs_loss: bool = True) -> torch.Tensor:
        """Loss of micro-batch ``batch`` (``loss_of(batch)``, by default the engine's forward),
        for backward. Nothing here waits on the device: a non-finite loss is counted on the
        device and multiplied by NaN (the loss of a finite one by 1), so its gradients are
        non-finite for certain and the optimizer step that contains it is skipped
        (``Engine.backward_step``); it adds nothing to the logged means. ``logs_loss``: it adds
        to ``train/loss`` (the objective's metrics are logged in any case)."""
        out = (self.engine.ds if loss_of is None else loss_of)(batch)
        loss = out.loss
        self._micro_batches += 1
        if self._fault is not None and self._fault[0] <= self._micro_batches <= self._fault[1] \
                and torch.distributed.get_rank() == 0:
            loss = loss * float("nan")  # tests: SSLSCALE_FAULT_INJECT=nan-loss:A-B
        finite = torch.isfinite(loss.detach())
        self._step_nonfinite += ~finite
        if logs_loss:
            self._window[0] += torch.where(finite, loss.detach().double(), 0.0)
            self._window[1] += finite
        for name, value in out.metrics.items():
            value = torch.where(finite, value.detach().double(), 0.0)
            self._window_metrics[name] = self._window_metrics.get(name, 0.0) + value
            self._window_counts[name] = self._window_counts.get(name, 0) + finite.double()
        return loss * torch.where(finite, 1.0, float("nan"))

    def _optimizer_steps(self, batches: Iterator[dict]) -> bool:
        """The optimizer steps of one trainer step; True if all were applied. One engine: one
        step of ``grad_accum_steps`` micro-batches. Several (``sslscale.engine_set``): one per
        phase of the objective (``phases()``: e.g. ``d_steps_per_g`` discriminator steps, then a
        generator step), only that network's parameters requiring gradients; a phase that reads
        no data reuses the micro-batches of the phase before it."""
        if not hasattr(self.engine, "engines"):
            for _ in range(self.engine.grad_accum_steps):
                applied = self.engine.backward_step(self._forward(self._next_batch(batches)))
            return applied
        applied, read = True, []
        for phase in self.engine.module.phases():
            engine = self.engine.engines[phase.network]
            if phase.reads_data:
                read = []
            with self.engine.only(phase.network):
                for i in range(engine.grad_accum_steps):
                    if phase.reads_data:
                        read.append(self._next_batch(batches))
                    loss = self._forward(read[i], phase.loss, phase.logs_loss)
                    done = engine.backward_step(loss)
                applied = bool(done) and applied
        return applied

    def _reads_per_step(self) -> int:
        """Micro-batches per rank and accumulation step that one trainer step reads."""
        if not hasattr(self.engine, "engines"):
            return 1
        return sum(phase.reads_data for phase in self.engine.module.phases())

    def _after_skipped_step(self) -> bool:
        """An optimizer step was skipped for non-finite gradients (every rank alike). If a
        micro-batch loss of it was non-finite on any rank (one collective, on this path only),
        it counts toward ``train.max_bad_steps`` in a row, after which the run rolls back to the
        last complete checkpoint and goes on with the data after the bad batches (returns True);
        gradients that overflowed from finite losses are only counted (``train/skipped_steps``)."""
        if not self._any_rank(bool(self._step_nonfinite)):
            return False
        self._bad_steps += 1
        self.metrics.info(f"non-finite loss at step {self.state.step}: optimizer step skipped "
                          f"({self._bad_steps} in a row)")
        if self._bad_steps < self.cfg.train.max_bad_steps:
            return False
        self._roll_back()
        self._bad_steps = 0
        return True

    def _roll_back(self) -> None:
        folder = checkpoint.find_latest(self.run_dir)
        self._rollbacks += 1
        if folder is None or self._rollbacks > 3:
            raise RuntimeError(f"{self.cfg.train.max_bad_steps} non-finite losses in a row at step "
                               f"{self.state.step} and " + ("no checkpoint to roll back to"
                                                            if folder is None else "3 rollbacks already"))
        read = (self.state.samples_seen, self.state.tokens_seen)
        self._restore(folder)  # the data stream is NOT rewound: the counts of samples read stay
        self.state.samples_seen, self.state.tokens_seen = read
        self.metrics.info(f"rolled back to {folder}; the data after the bad batches follows")

    def train_step(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns step hyper-params.
        In the steady state nothing here waits on the device or on another rank. A step skipped
        for non-finite gradients still counts (as DeepSpeed's ``global_steps`` does); one that
        led to a rollback is taken again from the restored checkpoint."""
        while True:
            if self._step_hook is not None:
                self._step_hook(self.state.step, self.cfg.train.max_steps)
            hparams = self.engine.apply_schedules(self.state.step, self.cfg) \
                if hasattr(self.engine, "engines") else \
                apply_schedules(self.engine.optimizer, self.state.step, self.cfg)
            self._step_nonfinite.zero_()
            applied = self._optimizer_steps(batches)
            self._nonfinite += self._step_nonfinite
            self.state.step += 1
            # read, skipped or not
            self.state.samples_seen += self.cfg.train.global_batch_size * self._reads_per_step()
            if applied:
                self._bad_steps = 0
                return hparams
            if not self._after_skipped_step():
                return hparams

    def _log_train(self, hparams: dict[str, float]) -> None:
        names = sorted(self._window_metrics)
        window = torch.cat([self._window, torch.stack([self._window_metrics[n] for n in names]),
                            torch.stack([torch.as_tensor(self._window_counts[n], device=self._window.device)
                                         for n in names])]) \
            if names else self._window.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(window)
        self._sync_tokens()
        now, (start_time, start_step, start_tokens) = time.perf_counter(), self._window_start
        steps = self.state.step - start_step
        metrics = {
            "train/loss": (window[0] / window[1]).item(),
            "train/lr": hparams["lr"],
            "train/weight_decay": hparams["weight_decay"],
            "train/grad_norm": self.engine.grad_norm(),
            "perf/samples_per_sec": steps * self.cfg.train.global_batch_size / (now - start_time),
            "train/epoch": self.state.samples_seen / self.samples_per_epoch,
            "samples_seen": self.state.samples_seen,
        }
        metrics.update({f"train/{n}": (window[2 + i] / window[2 + len(names) + i]).item()
                        for i, n in enumerate(names)})
        metrics.update({f"train/{k}": v for k, v in hparams.items() if k not in ("lr", "weight_decay")})
        metrics.update(getattr(self.engine, "log_metrics", dict)())
        metrics.update(self._flop_metrics(metrics["perf/samples_per_sec"]))
        if self.state.tokens_seen:
            metrics["perf/tokens_per_sec"] = (self.state.tokens_seen - start_tokens) / (now - start_time)
            metrics["tokens_seen"] = self.state.tokens_seen
        metrics["data/skipped_samples"], metrics["data/skipped_shards"] = self.skipped()
        metrics["train/skipped_steps"] = self.engine.skipped_steps
        metrics["train/nonfinite_micro_batches"] = self.nonfinite_micro_batches()
        self.metrics.log(self.state.step, metrics)
        self.metrics.advance(self.state.step, f"loss {metrics['train/loss']:.4f}")
        self._window.zero_()
        self._window_metrics.clear()
        self._window_counts.clear()
        self._restart_window()

    def nonfinite_micro_batches(self) -> int:
        """Micro-batches with a non-finite loss on any rank, this run (collective)."""
        return self._all_reduce([int(self._nonfinite)])[0]

    def _flop_metrics(self, samples_per_sec: float) -> dict[str, float]:
        """Model TFLOP/s per device (the SSL-aware count of ``sslscale.flops``) and, on a GPU of
        known peak, ``perf/mfu``."""
        world = rank_and_world()[1]
        model_config = getattr(getattr(self.engine.module, "model", None), "config", None)
        per_sample = flops.flops_per_sample_of_batch(self.cfg, self._last_batch, world_size=world,
                                                     vocab_size=getattr(model_config, "vocab_size", None))
        out = {"perf/model_tflops_per_device": per_sample * samples_per_sec / world / 1e12}
        if self._peak_tflops:
            out["perf/mfu"] = flops.mfu(per_sample, samples_per_sec, num_devices=world,
                                        peak_tflops_per_device=self._peak_tflops)
        return out

    def _restart_window(self) -> None:
        self._window_start = (time.perf_counter(), self.state.step, self.state.tokens_seen)

    def _maybe_write_images(self, step: int, last: bool) -> None:
        """``RUN_DIR/images/step-XXXXXXXX.png`` of the last micro-batch read, every
        ``objective.image_every_steps`` steps and at the last (rank 0; the objective's
        ``write_images``: no gradient, no random draw, so training is the same with or without)."""
        every = getattr(self.cfg.objective, "image_every_steps", 0)
        if self._write_images is None or not every or not (step % every == 0 or last):
            return
        out = self._write_images(self._last_batch, self.run_dir / "images" / f"{checkpoint.tag_for(step)}.png")
        self.metrics.info(f"wrote {out}")

    def run_eval(self) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        start = time.perf_counter()
        self._phase("eval")
        result = self.evaluate_fn()
        self._phase("step")
        self.metrics.log(self.state.step, {f"eval/{k}": v for k, v in result.items()})
        if self.is_main:
            kind = ("mlm" if "mlm_accuracy" in result else "lm" if "clm_perplexity" in result
                    else "classify" if "top1" in result else "knn")
            out = self.run_dir / "eval" / f"{kind}-{checkpoint.tag_for(self.state.step)}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"step": self.state.step, **result})
            out.write_text(line + "\n")
            print(line, flush=True)  # one JSON line per evaluation on stdout
        self.metrics.info(f"eval at step {self.state.step} took {time.perf_counter() - start:.1f} s")
        self._restart_window()  # keep eval out of throughput
        return result

    def fit(self) -> TrainState:
        """Train to ``max_steps`` (resuming first per ``cfg.resume``), evaluating and saving on
        schedule and at the end. A stop signal on any rank (SIGTERM / SIGUSR1: preemption;
        SIGINT: Ctrl-C): all ranks save at the next step boundary and return with
        ``state.stop_code`` set (``exits.PREEMPTED`` or ``exits.INTERRUPTED``)."""
        cfg = self.cfg
        if self.stop is None:
            self.stop = StopSignals().install()
        self.resume()
        self.engine.module.train()
        # Same world size: the loader's first worker continues where the next one in turn was.
        phase = self.state.step * self.engine.grad_accum_steps * self._reads_per_step()
        batches = iter(self.make_batches(self.positions, phase))
        self._vote = StopVote()
        self._restart_window()
        while self.state.step < cfg.train.max_steps:
            hparams = self.train_step(batches)
            step = self.state.step
            if self.watchdog is not None:
                self.watchdog.beat(step)
            if step == self._crash_at and rank_and_world()[0] == rank_and_world()[1] - 1:
                raise RuntimeError(f"injected crash at step {step} ({checkpoint.FAULT_ENV})")
            last = step == cfg.train.max_steps
            if step % cfg.train.log_every == 0 or last:
                self._log_train(hparams)
            self.metrics.advance(step)
            self._maybe_write_images(step, last)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not last:
                self.save()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not last:
                self.run_eval()
            stop_code = 0 if last else self._vote.post(self.stop.code)  # a signal anywhere
            if stop_code:
                self._vote.wait()
                self.metrics.info(f"stop signal: saving at step {step} and exiting with code {stop_code}")
                if self._last_saved != step:
                    self.save()
                self.state.stop_code = stop_code
                return self.state
        self._vote.wait()
        if self._last_saved != self.state.step:
            self.save()
        self.run_eval()
        return self.state
