"""``sslscale plot``: one y axis per quantity, so an accuracy of 0.06, a perplexity of 3810 and a
count of masked tokens never share one linear axis, nor samples/s and tokens/s."""

from __future__ import annotations

import json

from sslscale.metrics import read_metrics
from sslscale.plot import panels_for, plot_run


def _write(run_dir, rows):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_panel_is_one_quantity(tmp_path):
    rows = [{"step": s, "train/loss": 9.0 - s, "train/mlm_loss": 9.0 - s, "train/lr": 1e-3 * s,
             "train/grad_norm": 1.0, "perf/samples_per_sec": 400.0 + s, "perf/tokens_per_sec": 51200.0 + s,
             "samples_seen": 16 * s} for s in range(1, 9)]
    rows += [{"step": s, "eval/mlm_accuracy": 0.06 * s, "eval/mlm_baseline_accuracy": 0.05,
              "eval/mlm_perplexity": 3810.0 / s, "eval/num_masked_tokens": 1234,
              "eval/test_shards": "/data/val"} for s in (4, 8)]
    rows += [{"step": 8, "eval/knn_top1": 0.7, "eval/num_train": 512, "eval/num_test": 128, "eval/k": 20,
              "eval/linear_probe_f1": 0.6}]
    _write(tmp_path, rows)

    panels = {p.title: p for p in panels_for(read_metrics(tmp_path))}
    assert {t: p.keys for t, p in panels.items()} == {
        "training loss": ["train/loss", "train/mlm_loss"],
        "learning rate": ["train/lr"],
        "samples/s": ["perf/samples_per_sec"],
        "tokens/s": ["perf/tokens_per_sec"],
        "eval accuracy": ["eval/knn_top1", "eval/mlm_accuracy", "eval/mlm_baseline_accuracy"],
        "eval perplexity": ["eval/mlm_perplexity"],
        "eval/linear_probe_f1": ["eval/linear_probe_f1"],  # unknown metric: an axis of its own
    }  # eval set sizes (num_masked_tokens, num_train, num_test, k) are not curves
    assert panels["eval perplexity"].log and not panels["eval accuracy"].log

    out = tmp_path / "out" / "curves.png"
    assert plot_run(tmp_path, out) == list(panels)  # the titles, in drawing order
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_tokens_or_eval_gets_only_its_panels(tmp_path):
    _write(tmp_path, [{"step": s, "train/loss": 1.0 / s, "train/lr": 1e-3, "perf/samples_per_sec": 100.0,
                       "perf/mfu": 0.3} for s in range(1, 4)]
           + [{"step": 3, "eval/mlm_perplexity": -1.0}])  # not positive: linear axis, never log(<=0)
    panels = panels_for(read_metrics(tmp_path))
    assert [p.title for p in panels] == ["training loss", "learning rate", "samples/s", "MFU", "eval perplexity"]
    assert not panels[-1].log
