"""Metrics: a rich progress bar with ETA, ``RUN_DIR/metrics.jsonl`` and wandb, on rank 0 only.

Every other rank gets a logger that does nothing, so the training loop never asks which rank it
is. wandb runs offline unless configured (``wandb.mode``; the ``WANDB_MODE`` env var wins); its
files go to ``RUN_DIR/wandb`` and its run id is kept in ``RUN_DIR/wandb_id`` so a resumed run
continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class MetricsLogger:
    """Log scalar dicts at a step to console, ``metrics.jsonl`` and wandb (rank 0)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, max_steps: int,
                 start_step: int, config: dict[str, Any] | None = None,
                 wandb_cfg: Any = None, run_name: str = "run"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.console = Console(stderr=True, soft_wrap=True)
        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                                  transient=False)
        self._task = self._progress.add_task("train", total=max_steps, completed=start_step,
                                             status="")
        self._progress.start()
        if wandb_cfg is not None:
            self._wandb = self._init_wandb(wandb_cfg, config or {}, run_name)

    def _init_wandb(self, wandb_cfg: Any, config: dict[str, Any], run_name: str):
        mode = os.environ.get("WANDB_MODE") or wandb_cfg.mode
        if mode == "disabled":
            return None
        state_dir = self.run_dir / "wandb" / ".state"  # wandb writes RUN_DIR/wandb/<run>
        state_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            os.environ.setdefault(var, str(state_dir))
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=run_name,
                          id=run_id, resume="allow", mode=mode, dir=str(self.run_dir),
                          config=config, settings=wandb.Settings(silent=True))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (names like ``train/loss``) at optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        shown = "  ".join(f"{k.split('/')[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k != "step")
        self._progress.console.print(f"step {step:>7d}  {shown}")

    def advance(self, step: int, status: str | None = None) -> None:
        """Move the progress bar to ``step``; ``status`` (e.g. the loss) replaces the text beside it."""
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, completed=step, **fields)

    def info(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.stop()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
