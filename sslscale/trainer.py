"""The training loop, one for every objective: batch -> objective -> backward / step -> log ->
maybe evaluate -> maybe save.

``step`` counts optimizer steps; each takes ``grad_accum_steps`` micro-batches per rank (DeepSpeed
accumulates and steps at the boundary). Rank handling lives in the metrics logger and the
checkpoint module, not here: every rank runs the same code and the same number of steps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sslscale import checkpoint
from sslscale.engine import Engine, apply_schedules
from sslscale.metrics import MetricsLogger


# Exit code of a run stopped by SIGTERM / SIGUSR1 after saving (EX_TEMPFAIL: "try again"):
# the Slurm job script requeues on it; a finished run exits 0.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # global count
    preempted: bool = False  # stopped early by a signal, after saving


class Trainer:
    """Runs ``cfg.train.max_steps`` optimizer steps of ``engine`` on ``batches``.

    ``make_batches(positions, phase)`` returns the endless micro-batch iterator from the given
    stream positions (called once, after a resume has set the state); batches carry the
    positions of the streams they consumed, which the trainer keeps and checkpoints.
    ``evaluate()`` (optional, collective) returns metrics such as ``{"knn_top1": ...}``, logged
    under ``eval/``.
    """

    def __init__(self, cfg, engine: Engine, *, make_batches: Callable[..., Iterator[dict]],
                 samples_per_epoch: int, metrics: MetricsLogger, is_main: bool,
                 config_dict: dict[str, Any], evaluate: Callable[[], dict] | None = None):
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.make_batches, self.samples_per_epoch = make_batches, samples_per_epoch
        self.is_main, self.config_dict, self.evaluate_fn = is_main, config_dict, evaluate
        self.run_dir = Path(cfg.run_dir)
        self.state = TrainState()
        self.positions = [0] * cfg.data.num_streams  # samples consumed per stream (own streams exact)
        self._skipped_before = [0, 0]  # skipped samples, shards: totals of earlier runs
        self._skipped: dict[int, list[int]] = {}  # data-loader worker -> its counters, this run
        self._last_saved = -1
        self.skipped_steps = 0  # non-finite micro-batches discarded, this run
        self._micro_batches, self._rollbacks = 0, 0
        fault = os.environ.get(checkpoint.FAULT_ENV, "")
        self._fault = tuple(map(int, fault[9:].split("-"))) if fault.startswith("nan-loss:") else None
        self._window = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, micro-batches
        self._window_start = (time.perf_counter(), 0)

    # ----------------------------------------------------------------------------- resume / save
    def resume(self) -> bool:
        """Load the checkpoint ``cfg.resume`` points at, if any; True if one was loaded."""
        folder = checkpoint.resolve_resume(self.cfg.resume, self.run_dir)
        if folder is None:
            return False
        checkpoint.check_compatible(folder, torch.distributed.get_world_size(), self.cfg.deepspeed.zero_stage)
        data = self._restore(folder).get("data", {})
        self.positions = list(data.get("positions", self.positions))
        self._skipped_before = list(data.get("skipped", self._skipped_before))
        self.metrics.info(f"resumed from {folder} at step {self.state.step}")
        return True

    def _restore(self, folder: Path) -> dict[str, Any]:
        """Engine, RNG, step and samples_seen from ``folder``; returns its client state."""
        client = checkpoint.load(self.engine.ds, folder)
        self.state = TrainState(step=int(client["step"]), samples_seen=int(client["samples_seen"]))
        self._last_saved = self.state.step
        return client

    def save(self) -> None:
        start = time.perf_counter()
        client = {"step": self.state.step, "samples_seen": self.state.samples_seen,
                  "config": self.config_dict, "data": self.data_state()}
        folder = checkpoint.save(self.engine.ds, self.run_dir, self.state.step, client, self.is_main)
        self._last_saved = self.state.step
        self.metrics.info(f"saved {folder} in {time.perf_counter() - start:.2f} s")
        if self.is_main:
            for old in checkpoint.retain(self.run_dir, self.cfg.checkpoint.keep_last,
                                         self.cfg.checkpoint.keep_every):
                self.metrics.info(f"deleted {old} (checkpoint.keep_last={self.cfg.checkpoint.keep_last})")

    def data_state(self) -> dict[str, Any]:
        """Stream positions of all ranks (collective): each rank knows its own streams exactly
        and positions only grow, so the element-wise max over ranks is the global state."""
        positions, skipped = torch.tensor(self.positions, dtype=torch.long), self.skipped()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(positions, op=torch.distributed.ReduceOp.MAX)
        return {"num_streams": len(self.positions), "positions": positions.tolist(), "skipped": skipped}

    def skipped(self) -> list[int]:
        """Skipped samples and shards of all ranks, all runs (collective)."""
        mine = torch.tensor([sum(c[i] for c in self._skipped.values()) for i in (0, 1)], dtype=torch.long)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(mine)
        return [a + b for a, b in zip(self._skipped_before, mine.tolist())]

    def _take_data_state(self, batch: dict[str, torch.Tensor]) -> None:
        for stream, k in batch.pop("stream_positions").tolist():
            self.positions[stream] = k
        worker, samples, shards = batch.pop("data_skipped").tolist()
        self._skipped[worker] = [samples, shards]

    # -------------------------------------------------------------------------------------- loop
    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (a collective)."""
        t = torch.tensor([float(flag)], device=self.engine.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _forward(self, batches: Iterator[dict]) -> torch.Tensor:
        """Loss of the next micro-batch whose loss is finite on every rank. A non-finite one (on
        any rank) is discarded before backward, so no state changes, and counted; after
        ``train.max_bad_steps`` in a row the run rolls back to the last complete checkpoint and
        goes on with the data after the bad batches."""
        bad_run = 0
        while True:
            batch = next(batches)
            self._take_data_state(batch)
            batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}
            loss = self.engine.ds(batch).loss
            self._micro_batches += 1
            if self._fault is not None and self._fault[0] <= self._micro_batches <= self._fault[1] \
                    and torch.distributed.get_rank() == 0:
                loss = loss * float("nan")  # tests: SSLSCALE_FAULT_INJECT=nan-loss:A-B
            if not self._any_rank(not torch.isfinite(loss).item()):
                return loss
            self.skipped_steps += 1
            bad_run += 1
            self.metrics.info(f"non-finite loss at step {self.state.step + 1}: micro-batch skipped "
                              f"({bad_run} in a row, {self.skipped_steps} in all)")
            if bad_run >= self.cfg.train.max_bad_steps:
                self._roll_back()
                bad_run = 0

    def _roll_back(self) -> None:
        folder = checkpoint.find_latest(self.run_dir)
        self._rollbacks += 1
        if folder is None or self._rollbacks > 3:
            raise RuntimeError(f"{self.cfg.train.max_bad_steps} non-finite losses in a row at step "
                               f"{self.state.step + 1} and " + ("no checkpoint to roll back to"
                                                                if folder is None else "3 rollbacks already"))
        self._restore(folder)  # the data stream is NOT rewound
        self.metrics.info(f"rolled back to {folder}; the data after the bad batches follows")

    def train_step(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches); returns step hyper-params."""
        for _ in range(self.engine.grad_accum_steps):
            hparams = apply_schedules(self.engine.optimizer, self.state.step, self.cfg)  # after a rollback too
            loss = self._forward(batches)
            self.engine.backward_step(loss)
            self._window[0] += loss.detach().double()  # stays on the device: no sync per step
            self._window[1] += 1
        self.state.step += 1
        self.state.samples_seen += self.cfg.train.global_batch_size
        return hparams

    def _log_train(self, hparams: dict[str, float]) -> None:
        window = self._window.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(window)
        now, start_step = time.perf_counter(), self._window_start[1]
        steps = self.state.step - start_step
        metrics = {
            "train/loss": (window[0] / window[1]).item(),
            "train/lr": hparams["lr"],
            "train/weight_decay": hparams["weight_decay"],
            "train/grad_norm": self.engine.grad_norm(),
            "perf/samples_per_sec": steps * self.cfg.train.global_batch_size / (now - self._window_start[0]),
            "train/epoch": self.state.samples_seen / self.samples_per_epoch,
            "samples_seen": self.state.samples_seen,
        }
        metrics["data/skipped_samples"], metrics["data/skipped_shards"] = self.skipped()
        metrics["train/skipped_steps"] = self.skipped_steps
        self.metrics.log(self.state.step, metrics)
        self.metrics.advance(self.state.step, f"loss {metrics['train/loss']:.4f}")
        self._window.zero_()
        self._window_start = (time.perf_counter(), self.state.step)

    def run_eval(self) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        start = time.perf_counter()
        result = self.evaluate_fn()
        self.metrics.log(self.state.step, {f"eval/{k}": v for k, v in result.items()})
        if self.is_main:
            out = self.run_dir / "eval" / f"knn-{checkpoint.tag_for(self.state.step)}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": self.state.step, **result}) + "\n")
        self.metrics.info(f"eval at step {self.state.step} took {time.perf_counter() - start:.1f} s")
        self._window_start = (time.perf_counter(), self.state.step)  # keep eval out of throughput
        return result

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum

    def fit(self) -> TrainState:
        """Train to ``max_steps`` (resuming first per ``cfg.resume``), evaluating and saving on
        schedule and at the end. SIGTERM or SIGUSR1 on any rank: all ranks save at the next step
        boundary and return with ``state.preempted`` (exit with ``PREEMPTED_EXIT_CODE``)."""
        cfg = self.cfg
        self._signal = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.resume()
        self.engine.module.train()
        # Same world size: the loader's first worker continues where the next one in turn was.
        phase = self.state.step * self.engine.grad_accum_steps
        batches = iter(self.make_batches(self.positions, phase))
        self._window_start = (time.perf_counter(), self.state.step)
        while self.state.step < cfg.train.max_steps:
            hparams = self.train_step(batches)
            step = self.state.step
            last = step == cfg.train.max_steps
            if step % cfg.train.log_every == 0 or last:
                self._log_train(hparams)
            self.metrics.advance(step)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and not last:
                self.save()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not last:
                self.run_eval()
            if not last and self._any_rank(self._signal is not None):  # a stop signal anywhere
                self.metrics.info(f"stop signal: saving at step {step} and exiting with "
                                  f"code {PREEMPTED_EXIT_CODE}")
                if self._last_saved != step:
                    self.save()
                self.state.preempted = True
                return self.state
        if self._last_saved != self.state.step:
            self.save()
        self.run_eval()
        return self.state
