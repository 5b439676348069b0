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


def _finetune_run(folder, top1, init_from=None):
    folder.mkdir()
    if init_from is not None:
        (folder / "config.yaml").write_text(f"train:\n  init_from: {init_from}\n")
    _write(folder, [{"step": s, "train/loss": 2.0 / s, "train/top1": 0.1 * s, "train/lr": 1e-3}
                    for s in range(1, 6)]
           + [{"step": 5, "eval/top1": top1, "eval/num_test": 300, "eval/majority_top1": 0.1}])


def test_finetuning_runs_get_their_own_figure_beside_the_plot(tmp_path, capsys):
    from launcher.cli import main
    from sslscale.plot import finetune_png, finetune_runs, plot_finetune

    _write(tmp_path, [{"step": s, "train/loss": 1.0 / s} for s in range(1, 4)])
    out = tmp_path / "plots" / "loss.png"
    assert finetune_png(out) == tmp_path / "plots" / "loss-finetune.png"
    assert plot_finetune(tmp_path, finetune_png(out)) == [] and not finetune_png(out).exists()
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert "finetune_out" not in json.loads(capsys.readouterr().out)  # no fine-tuning runs
    assert not finetune_png(out).exists() and out.is_file()

    _finetune_run(tmp_path / "finetune-scratch", 0.6)
    _finetune_run(tmp_path / "finetune", 0.9, init_from=tmp_path / "checkpoints" / "step-00000300")
    runs = finetune_runs(tmp_path)
    assert [r.label for r in runs] == ["fine-tuned from step 300", "from scratch"]
    assert runs[1].series["eval/top1"] == [(5, 0.6)]
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["finetune_out"] == str(finetune_png(out))
    assert printed["finetune_runs"] == ["fine-tuned from step 300", "from scratch"]
    png = finetune_png(out).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    (tmp_path / "finetune" / "config.yaml").unlink()  # only the scratch run has eval points yet
    _write(tmp_path / "finetune", [{"step": 1, "train/loss": 2.0}])
    assert plot_finetune(tmp_path, tmp_path / "ft.png") == ["fine-tuned", "from scratch"]
    assert (tmp_path / "ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
