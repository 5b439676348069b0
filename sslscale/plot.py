"""``sslscale plot RUN_DIR --out loss.png``: the curves of ``metrics.jsonl`` as one PNG, for
people without wandb.

One panel (y axis) per quantity, each drawn only when the run logged it, so that values of
different units and scales never share an axis: training loss (``train/loss`` and the
objective's ``train/<term>_loss`` terms), learning rate (``train/lr``), samples/s
(``perf/samples_per_sec``), tokens/s (``perf/tokens_per_sec``), MFU (``perf/mfu``), eval
accuracy (every ``eval/*accuracy`` and ``eval/*top1``: kNN top-1, MLM accuracy and its baseline),
eval perplexity (``eval/*perplexity``, log scale), and any other numeric ``eval/*`` metric on a
panel of its own. Eval set sizes (``eval/num_*``, ``eval/k``) are not curves and are left out.
Steps logged twice (a resume after a kill) show the later value. Uses matplotlib's Agg backend,
so no display is needed.

Where ``sslscale eval finetune`` ran (``RUN_DIR/finetune/`` and / or ``RUN_DIR/finetune-scratch/``,
each a run with its own ``metrics.jsonl``), ``plot_finetune`` draws both runs on one figure
(``finetune_png``: beside the main PNG): their training loss on shared axes, then their held-out
top-1 (``eval/top1``) points.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from sslscale.metrics import read_metrics


class Panel(NamedTuple):
    title: str  # the quantity
    ylabel: str
    keys: list[str]  # the metrics drawn on its axis, all of that quantity
    log: bool = False  # log-scale y axis


def _is_count(key: str) -> bool:
    return key.startswith("eval/num_") or key == "eval/k"


def _is_accuracy(key: str) -> bool:
    return key.startswith("eval/") and key.endswith(("accuracy", "top1"))


# (title, y label, metric selector, log scale), in drawing order
_QUANTITIES: list[tuple[str, str, Callable[[str], bool], bool]] = [
    ("training loss", "loss", lambda k: k == "train/loss" or (k.startswith("train/") and k.endswith("_loss")),
     False),
    ("learning rate", "lr", lambda k: k == "train/lr", False),
    ("samples/s", "samples / s", lambda k: k == "perf/samples_per_sec", False),
    ("tokens/s", "tokens / s", lambda k: k == "perf/tokens_per_sec", False),
    ("MFU", "MFU", lambda k: k == "perf/mfu", False),
    ("eval accuracy", "accuracy", _is_accuracy, False),
    ("eval perplexity", "perplexity", lambda k: k.startswith("eval/") and k.endswith("perplexity"), True),
]


def panels_for(series: dict[str, list[tuple[int, float]]]) -> list[Panel]:
    """The panels for ``series`` (``read_metrics``): one per quantity that has a finite value,
    then one per other ``eval/*`` metric (its own unit, unknown here)."""
    finite = {k for k, points in series.items() if any(math.isfinite(v) for _, v in points)}
    panels, placed = [], set()
    for title, ylabel, wanted, log in _QUANTITIES:
        keys = sorted(k for k in finite if wanted(k))
        if keys:
            positive = all(v > 0 for k in keys for _, v in series[k] if math.isfinite(v))
            panels.append(Panel(title, ylabel, keys, log and positive))
            placed.update(keys)
    for key in sorted(k for k in finite - placed if k.startswith("eval/") and not _is_count(k)):
        panels.append(Panel(key, key.removeprefix("eval/"), [key]))
    return panels


def _figure(rows: int):
    """A figure of ``rows`` panels stacked on one step axis, and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.6 * rows), sharex=True, squeeze=False)
    return fig, axes[:, 0]


def _label_axis(ax, title: str, ylabel: str, log: bool = False) -> None:
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _save(fig, axes, out: str | os.PathLike, title: str, xlabel: str) -> None:
    """Write ``fig`` as the PNG ``out`` (its folder created) and release it."""
    import matplotlib.pyplot as plt

    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write the PNG ``out`` for ``RUN_DIR/metrics.jsonl``; returns the panel titles drawn (one
    quantity each, see :func:`panels_for`).

    Raises ``FileNotFoundError`` (no metrics.jsonl) and ``ValueError`` (a malformed line, or no
    metric that any panel shows).
    """
    series = read_metrics(run_dir)
    panels = panels_for(series)
    if not panels:
        raise ValueError(f"{run_dir}/metrics.jsonl: no loss, lr, throughput or eval metric to plot")
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        for key in panel.keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        _label_axis(ax, panel.title, panel.ylabel, panel.log)
    _save(fig, axes, out, Path(run_dir).resolve().name, "optimizer step")
    return [panel.title for panel in panels]


# The two runs of ``sslscale eval finetune`` inside a pretraining run, in drawing order.
FINETUNE_FOLDERS = ("finetune", "finetune-scratch")
# (metric, panel title, y label) of the fine-tuning figure
_FINETUNE_PANELS = [("train/loss", "fine-tuning: training loss", "loss"),
                    ("eval/top1", "fine-tuning: held-out top-1", "top-1")]


class FinetuneRun(NamedTuple):
    folder: str  # one of FINETUNE_FOLDERS
    label: str  # "fine-tuned from step N" or "from scratch"
    series: dict[str, list[tuple[int, float]]]  # its read_metrics


def finetune_png(out: str | os.PathLike) -> Path:
    """Where the fine-tuning figure of a plot written to ``out`` goes: beside it,
    ``<stem>-finetune.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-finetune.png")


def _init_step(run: Path) -> int | None:
    """The pretraining step a fine-tuning run started from: its ``train.init_from`` checkpoint
    folder (``.../step-XXXXXXXX``) in its ``config.yaml``; None when not recorded."""
    import yaml

    try:
        init_from = yaml.safe_load((run / "config.yaml").read_text())["train"]["init_from"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    found = re.search(r"step-(\d+)$", str(init_from or "").rstrip("/"))
    return int(found[1]) if found else None


def finetune_runs(run_dir: str | os.PathLike) -> list[FinetuneRun]:
    """The fine-tuning runs inside ``run_dir`` (``FINETUNE_FOLDERS`` that hold a
    ``metrics.jsonl``), labeled "fine-tuned from step N" (N from the run's ``train.init_from``;
    "fine-tuned" when not recorded) or "from scratch". Raises ``ValueError`` for a malformed
    metrics line."""
    runs = []
    for folder in FINETUNE_FOLDERS:
        run = Path(run_dir) / folder
        if not (run / "metrics.jsonl").is_file():
            continue
        step = _init_step(run) if folder == "finetune" else None
        label = ("from scratch" if folder == "finetune-scratch"
                 else f"fine-tuned from step {step}" if step is not None else "fine-tuned")
        runs.append(FinetuneRun(folder, label, read_metrics(run)))
    return runs


def plot_finetune(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write the PNG ``out`` of the fine-tuning runs in ``run_dir`` (``finetune_runs``): their
    ``train/loss`` on one panel, their held-out ``eval/top1`` points (values written beside them)
    on another, each panel drawn when a run logged it. Returns the labels of the runs drawn; an
    empty list, and no file, when there is no fine-tuning run or none logged either metric.
    Raises ``ValueError`` for a malformed metrics line."""
    runs = [r for r in finetune_runs(run_dir) if any(r.series.get(k) for k, _, _ in _FINETUNE_PANELS)]
    panels = [p for p in _FINETUNE_PANELS if any(r.series.get(p[0]) for r in runs)]
    if not panels:
        return []
    fig, axes = _figure(len(panels))
    for ax, (key, title, ylabel) in zip(axes, panels):
        for run in runs:
            if not run.series.get(key):
                continue
            steps, values = zip(*run.series[key])
            color = f"C{FINETUNE_FOLDERS.index(run.folder)}"
            if key == "train/loss":
                ax.plot(steps, values, color=color, label=run.label)
                continue
            ax.plot(steps, values, "o", color=color, label=run.label)
            for step, value in zip(steps, values):
                ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(-6, 0),
                            ha="right", va="center", fontsize="small", color=color)
            ax.margins(y=0.15)
        _label_axis(ax, title, ylabel)
    _save(fig, axes, out, f"{Path(run_dir).resolve().name}: fine-tuning", "fine-tuning step")
    return [run.label for run in runs]
