"""``sslscale export | push | plot | samples``: what leaves a run: a Hugging Face folder (and
the hub), PNG plots of its metrics and of its generated images."""

from __future__ import annotations

import argparse
import json
import pickle
import sys

from launcher.cli_util import one_line_errors, result_on_stdout


@one_line_errors("sslscale.export:ExportError", FileExistsError, ValueError, pickle.UnpicklingError)
@result_on_stdout
def _export(args: argparse.Namespace, out) -> int:
    from sslscale.hub import export_run

    r = export_run(args.run_dir, args.out, step=args.step, repo_id=args.repo_id,
                   license=args.license, overwrite=args.overwrite)
    print(json.dumps({"out": str(r.out), "step": r.step, "objective": r.objective,
                      "class": r.published_class, "num_params": r.num_params,
                      "round_trip_max_abs_diff": r.round_trip_diff}), file=out)
    return 0


@one_line_errors("sslscale.export:ExportError", FileExistsError, ValueError, pickle.UnpicklingError)
@result_on_stdout
def _push(args: argparse.Namespace, out) -> int:
    from sslscale.hub import push_run

    # hub errors (no token, offline, 401, upload) are HubError: one error line, exit 2
    print(json.dumps(push_run(args.run_dir, args.repo_id, step=args.step, private=args.private,
                              revision=args.revision, license=args.license)), file=out)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sslscale.plot import finetune_png, plot_finetune, plot_run

    try:
        result = {"out": args.out, "panels": plot_run(args.run_dir, args.out)}
        finetune_runs = plot_finetune(args.run_dir, finetune_png(args.out))
    except ValueError as e:  # a malformed metrics.jsonl line, or nothing to plot
        print(f"error: {e}", file=sys.stderr)
        return 2
    if finetune_runs:  # RUN_DIR/finetune*/ of `sslscale eval finetune`
        result.update(finetune_out=str(finetune_png(args.out)), finetune_runs=finetune_runs)
    print(json.dumps(result))
    return 0


@one_line_errors(ValueError)  # not an autoencoder run, --num-images < 1
@result_on_stdout
def _samples(args: argparse.Namespace, out) -> int:
    from sslscale.samples import write_samples

    print(json.dumps(write_samples(args.run_dir, args.out, step=args.step, num_images=args.num_images,
                                   shards=args.shards, seed=args.seed)), file=out)
    return 0


def add_hub_commands(sub) -> None:
    """The ``export``, ``push``, ``plot`` and ``samples`` commands, on ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run_dir", help="the run's directory (run_dir), e.g. runs/mae_vit_tiny_fmnist")
    common.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    common.add_argument("--license", default="apache-2.0", help="license in the model card's metadata")
    ex = sub.add_parser("export", parents=[common], help="encoder -> Hugging Face folder + model card "
                        "(round-trip checked)")
    ex.add_argument("--out", required=True, help="output folder (appears only once checked)")
    ex.add_argument("--repo-id", help="hub name shown in the card's usage snippet (default: --out)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.set_defaults(func=_export)
    push = sub.add_parser("push", parents=[common], help="export, check, upload to the Hugging Face "
                          "hub (token: HF_TOKEN or 'hf auth login')")
    push.add_argument("--repo-id", required=True, help="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.set_defaults(func=_push)
    plot = sub.add_parser("plot", help="PNG of loss, lr, throughput and eval from metrics.jsonl "
                          "(and, after eval finetune, <OUT>-finetune.png of both fine-tuning runs)")
    plot.add_argument("run_dir", help="the run's directory (holds metrics.jsonl)")
    plot.add_argument("--out", required=True, help="PNG file, e.g. loss.png")
    plot.set_defaults(func=_plot)
    samples = sub.add_parser("samples", help="PNG grid of a dae or vae run's reconstructions of "
                             "held-out images (and, for a vae, <OUT>-prior.png of samples from the prior); "
                             "of a gan or bigan run's generated images")
    samples.add_argument("run_dir", help="the run's directory (run_dir)")
    samples.add_argument("--out", required=True, help="PNG file, e.g. samples.png")
    samples.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    samples.add_argument("--num-images", type=int, default=16, help="images per row")
    samples.add_argument("--shards", help="image shards to reconstruct (default: run's eval.test_shards, "
                         "else data.train_shards)")
    samples.add_argument("--seed", type=int, default=0, help="seed of the prior samples")
    samples.set_defaults(func=_samples)
