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
"""

from __future__ import annotations

import math
import os
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


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write the PNG ``out`` for ``RUN_DIR/metrics.jsonl``; returns the panel titles drawn (one
    quantity each, see :func:`panels_for`).

    Raises ``FileNotFoundError`` (no metrics.jsonl) and ``ValueError`` (a malformed line, or no
    metric that any panel shows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    panels = panels_for(series)
    if not panels:
        raise ValueError(f"{run_dir}/metrics.jsonl: no loss, lr, throughput or eval metric to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for key in panel.keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if panel.log:
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{Path(run_dir).resolve().name}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [panel.title for panel in panels]
