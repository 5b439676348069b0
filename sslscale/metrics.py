"""Metrics: a rich progress bar with ETA, ``RUN_DIR/metrics.jsonl`` and wandb, on rank 0 only;
and reading them back (``read_metrics``) for the model card and ``sslscale plot``.

Every other rank gets a logger that does nothing, so the training loop never asks which rank it
is. wandb runs offline unless configured (``wandb.mode``; the ``WANDB_MODE`` env var wins); its
files go to ``RUN_DIR/wandb`` and its run id is kept in ``RUN_DIR/wandb_id`` so a resumed or
requeued run continues the same wandb run (``resume="allow"``; offline, each session writes
``RUN_DIR/wandb/offline-run-<time>-<id>`` with the same id, and ``wandb sync`` uploads them in
order into one run). ``log_to_run`` adds values (e.g. the model card's hub link) to that run
later. Each logging session also appends the hardware it ran on to ``RUN_DIR/system.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sslscale.log import get_logger
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


SYSTEM_FILE = "system.jsonl"
WANDB_ID_FILE = "wandb_id"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict[str, Any]:
    """Where this process runs: world size and nodes (from torch.distributed / torchrun / Slurm
    variables), the accelerator (GPU name and count per node, else the CPU model and cores) and
    library versions. Plain JSON types; no host names, users or environment values."""
    import torch

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None
    nodes = int(os.environ.get("SLURM_NNODES", "0")) or (max(1, world // per_node) if per_node else 1)
    info: dict[str, Any] = {"time": time.time(), "world_size": world, "nodes": nodes,
                            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info.update(device="cuda", accelerator=torch.cuda.get_device_name(0),
                    devices_per_node=torch.cuda.device_count())
    else:
        info.update(device="cpu", accelerator=_cpu_model(), cpu_cores=os.cpu_count())
    for lib in ("deepspeed", "transformers"):
        try:
            from importlib.metadata import version
            info[lib] = version(lib)
        except Exception:  # not installed: leave it out
            pass
    return info


def open_wandb_run(run_dir: str | os.PathLike, wandb_cfg: Any, config: dict[str, Any] | None,
                   run_name: str, create: bool = True):
    """Start or continue the run's wandb run (None if ``wandb.mode`` / ``WANDB_MODE`` is
    ``disabled``, or if ``create`` is false and the run never had one). The id is read from
    ``RUN_DIR/wandb_id`` (written on first use), so every session of a run, requeued or
    resumed, logs to the same wandb run (``resume="allow"``). wandb's files stay in RUN_DIR.
    Name, tags, group and notes come from the ``wandb`` section (``wandb_init_kwargs``)."""
    run_dir = Path(run_dir)
    mode = os.environ.get("WANDB_MODE") or wandb_cfg.mode
    id_file = run_dir / WANDB_ID_FILE
    if mode == "disabled" or (not create and not id_file.is_file()):
        return None
    state_dir = run_dir / "wandb" / ".state"  # wandb writes RUN_DIR/wandb/<run>
    state_dir.mkdir(parents=True, exist_ok=True)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        os.environ.setdefault(var, str(state_dir))
    import wandb

    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
    id_file.write_text(run_id)
    return wandb.init(**wandb_init_kwargs(run_dir, wandb_cfg, run_name), id=run_id,
                      resume="allow", mode=mode, dir=str(run_dir), config=config,
                      settings=wandb.Settings(silent=True))


def wandb_run_name(run_dir: str | os.PathLike, run_name: str) -> str:
    """The default wandb display name: the config's ``name`` alone would give every run of a
    recipe the same name, so the run dir's folder name (the one thing that tells two runs apart:
    ``resume: auto`` makes one run dir one run) is added when it is not that name already:
    ``mae_vit_tiny_fmnist-lr3e-4`` for ``run_dir=runs/lr3e-4``, ``mae_vit_tiny_fmnist`` for the
    default ``runs/mae_vit_tiny_fmnist``. The same on every session, so a resumed run keeps it."""
    folder = Path(run_dir).resolve().name
    return run_name if folder == run_name or not folder else f"{run_name}-{folder}"


def wandb_init_kwargs(run_dir: str | os.PathLike, wandb_cfg: Any, run_name: str) -> dict[str, Any]:
    """``wandb.init`` arguments from the ``wandb`` config section: project, entity, name
    (``wandb.name``, default ``wandb_run_name``), tags, group, notes."""
    tags = getattr(wandb_cfg, "tags", None)
    return {"project": wandb_cfg.project, "entity": wandb_cfg.entity,
            "name": getattr(wandb_cfg, "name", None) or wandb_run_name(run_dir, run_name),
            "tags": [str(t) for t in tags] if tags else None,
            "group": getattr(wandb_cfg, "group", None), "notes": getattr(wandb_cfg, "notes", None)}


# Deprecation warnings that third-party code (not sslscale) raises at every call: DeepSpeed's
# ZeRO calls ``torch.distributed.all_gather_into_tensor``, deprecated in torch 2.13, 100+ times
# in a short 2-rank run. Nothing a user can do about them; every other warning stays.
_KNOWN_NOISE = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",)


def filter_known_warnings() -> None:
    """Hide ``_KNOWN_NOISE`` in this process, and say when DeepSpeed compiles an op instead of
    minutes of silence (``sslscale.log.announce_op_builds``). Call once per rank, before
    DeepSpeed runs (``engine.init_distributed`` does)."""
    import warnings

    from sslscale.log import announce_op_builds

    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    announce_op_builds()


def log_to_run(run_dir: str | os.PathLike, wandb_cfg: Any, run_name: str,
               summary: dict[str, Any]) -> bool:
    """Add ``summary`` values (e.g. ``{"hub/model_card": URL}``) to the run's existing wandb
    run; False if the run has none (wandb disabled when it trained, or now)."""
    run = open_wandb_run(run_dir, wandb_cfg, None, run_name, create=False)
    if run is None:
        return False
    for key, value in summary.items():
        run.summary[key] = value
    run.finish()
    return True


def read_metrics(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric of ``RUN_DIR/metrics.jsonl`` as ``{name: [(step, value), ...]}``,
    sorted by step. A step logged twice (a run killed after its last checkpoint logs those steps
    again on resume) keeps the later value; ``"nan"``/``"inf"`` strings become floats.
    ``FileNotFoundError`` if the file is missing; ``ValueError`` names a malformed line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a sslscale run directory?)")
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: not a metrics row ({e})") from None
        for key, value in row.items():
            if key == "step" or isinstance(value, bool):
                continue
            try:
                series.setdefault(key, {})[step] = float(value)
            except (TypeError, ValueError):
                continue  # not a number
    return {k: sorted(v.items()) for k, v in series.items()}


def value_at(series: dict[str, list[tuple[int, float]]], key: str,
             max_step: int) -> tuple[int, float] | None:
    """The last ``(step, value)`` of ``key`` at or before ``max_step``, or None."""
    points = [p for p in series.get(key, []) if p[0] <= max_step]
    return points[-1] if points else None


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
        with open(self.run_dir / SYSTEM_FILE, "a") as f:
            f.write(json.dumps(system_info()) + "\n")
        if wandb_cfg is not None:  # wandb records the machine itself
            self._wandb = open_wandb_run(self.run_dir, wandb_cfg, config or {}, run_name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (names like ``train/loss``) at optimizer step ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
            except Exception as e:  # its service died (e.g. a job-wide SIGTERM): training goes on
                self._wandb = None
                get_logger().warning(f"wandb stopped working ({type(e).__name__}: {e}); logging "
                                     "continues in metrics.jsonl only")
        shown = "  ".join(f"{k.split('/')[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k != "step")
        self._progress.console.print(f"step {step:>7d}  {shown}")

    def advance(self, step: int, status: str | None = None) -> None:
        """Move the progress bar to ``step``; ``status`` (e.g. the loss) replaces the text beside it."""
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, completed=step, **fields)

    def info(self, message: str) -> None:
        """An INFO line of the ``sslscale`` logger (time, rank, level; above the live bar on a
        terminal), on rank 0 only."""
        if self.enabled:
            get_logger().info(message)

    def abort(self) -> None:
        """After a fatal error: stop the progress bar and close ``metrics.jsonl``, leaving wandb
        alone (its service may be what failed; its offline files stay in ``RUN_DIR/wandb``)."""
        if self.enabled:
            self._progress.stop()
            self._jsonl.close()

    def close(self) -> None:
        if not self.enabled:
            return
        self._progress.stop()
        self._jsonl.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except (ConnectionError, OSError) as e:  # its service died (e.g. a job-wide SIGTERM)
                get_logger().warning(f"wandb: could not finish the run ({type(e).__name__}: {e}); "
                                   "its offline files stay in RUN_DIR/wandb")
