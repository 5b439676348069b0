"""``sslscale plot RUN_DIR --out loss.png``: the curves of ``metrics.jsonl`` as one PNG, for
people without wandb.

Panels, each drawn only when the run logged it: training loss (``train/loss`` and the
objective's ``train/<term>_loss`` terms), learning rate (``train/lr``), throughput
(``perf/samples_per_sec``, ``perf/tokens_per_sec``, ``perf/mfu``) and evaluation (every
``eval/*`` metric). Steps logged twice (a resume after a kill) show the later value. Uses
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from sslscale.metrics import read_metrics

# (panel title, y label, metric selector)
_PANELS = [
    ("training loss", "loss", lambda k: k == "train/loss" or (k.startswith("train/") and k.endswith("_loss"))),
    ("learning rate", "lr", lambda k: k == "train/lr"),
    ("throughput", "per second", lambda k: k in ("perf/samples_per_sec", "perf/tokens_per_sec")),
    ("model FLOPs utilization", "MFU", lambda k: k == "perf/mfu"),
    ("evaluation", "value", lambda k: k.startswith("eval/") and not k.endswith(("num_train", "num_test", "/k"))),
]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write the PNG ``out`` for ``RUN_DIR/metrics.jsonl``; returns the panel titles drawn.

    Raises ``FileNotFoundError`` (no metrics.jsonl) and ``ValueError`` (a malformed line, or no
    metric that any panel shows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    panels = []
    for title, ylabel, wanted in _PANELS:
        keys = sorted(k for k in series if wanted(k) and any(math.isfinite(v) for _, v in series[k]))
        if keys:
            panels.append((title, ylabel, keys))
    if not panels:
        raise ValueError(f"{run_dir}/metrics.jsonl: no loss, lr, throughput or eval metric to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, ylabel, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{Path(run_dir).resolve().name}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [p[0] for p in panels]
