"""``sslscale eval knn | linear | finetune | mlm | lm``: score a run's encoder; each prints one
JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys

from launcher.cli_util import RUN_DIR_HELP, one_line_errors, result_on_stdout


@one_line_errors(ValueError)  # shards of the other modality, unlabeled data
@result_on_stdout
def _eval_knn(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, step=args.step, train_shards=args.train_shards,
                          test_shards=args.test_shards, baseline=args.baseline,
                          max_train_samples=args.max_train_samples,
                          max_test_samples=args.max_test_samples, k=args.k)
    print(json.dumps(result), file=out)  # with --baseline also kept in the run (the model card quotes it)
    return 0


@one_line_errors(ValueError)  # shards of the other modality, unlabeled data
@result_on_stdout
def _eval_linear(args: argparse.Namespace, out) -> int:
    from sslscale.linear_probe import probe_run

    print(json.dumps(probe_run(args.run_dir, step=args.step, train_shards=args.train_shards,
                               test_shards=args.test_shards, baseline=args.baseline,
                               max_train_samples=args.max_train_samples,
                               max_test_samples=args.max_test_samples, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr)), file=out)
    return 0


@one_line_errors(ValueError, RuntimeError)  # shards of the other modality; a fine-tuning run that failed
def _eval_finetune(args: argparse.Namespace) -> int:
    from sslscale.finetune import finetune_run

    # The two runs' ranks inherit file descriptor 1: their lines (a JSON line per evaluation)
    # go to stderr, so this command's stdout is its one result line.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = finetune_run(args.run_dir, train_shards=args.train_shards,
                              test_shards=args.test_shards, steps=args.steps, step=args.step,
                              nproc=args.nproc, from_scratch_only=args.from_scratch,
                              overrides=args.overrides)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(result), flush=True)
    return 0


@one_line_errors(ValueError)  # an image run, image shards
@result_on_stdout
def _eval_mlm(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate import evaluate_mlm_run

    print(json.dumps(evaluate_mlm_run(args.run_dir, step=args.step, test_shards=args.test_shards,
                                      max_test_samples=args.max_test_samples)), file=out)
    return 0


@one_line_errors(ValueError)  # not a CLM run, image shards
@result_on_stdout
def _eval_lm(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate_lm import evaluate_lm_run

    print(json.dumps(evaluate_lm_run(args.run_dir, step=args.step, test_shards=args.test_shards,
                                     max_test_samples=args.max_test_samples)), file=out)
    return 0


def add_eval_commands(sub) -> None:
    """The ``eval`` command and its sub-commands, on ``sub`` (the top-level sub-parsers)."""
    ev = sub.add_parser("eval", help="evaluate a run: kNN, linear probe, fine-tuning (images, text), masked tokens (mlm) or next tokens (lm)").add_subparsers(
        dest="action", required=True)
    def labeled_eval(name: str, help_: str, train: str, test: str) -> argparse.ArgumentParser:
        """A frozen-encoder evaluation on labeled train / test shards (kNN, linear probe)."""
        p = ev.add_parser(name, help=help_)
        p.add_argument("run_dir", help=RUN_DIR_HELP)
        p.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
        p.add_argument("--train-shards", help=f"labeled shards {train} (default: run's eval.train_shards)")
        p.add_argument("--test-shards", help=f"labeled {test} shards (default: run's eval.test_shards)")
        p.add_argument("--baseline", action="store_true", help="also score the same architecture at random init")
        p.add_argument("--max-train-samples", type=int,
                       help="first N training samples (default: run's eval.max_train_samples, else all)")
        p.add_argument("--max-test-samples", type=int,
                       help=f"first N {test} samples (default: run's eval.max_test_samples, else all)")
        return p

    knn = labeled_eval("knn", "weighted kNN top-1 of the frozen encoder (image runs; MLM runs on "
                       "labeled text from data prepare text --labels section; wav2vec2 runs on labeled "
                       "clips, mean-pooled over their frames)",
                       "for the memory bank", "query")
    knn.add_argument("--k", type=int, help="neighbours that vote (default: run's eval.k)")
    knn.set_defaults(func=_eval_knn)
    mlm = ev.add_parser("mlm", help="held-out masked-token accuracy / perplexity vs the most-frequent-token "
                        "baseline (MLM runs)")
    lm = ev.add_parser("lm", help="held-out next-token perplexity / accuracy vs the held-out unigram "
                       "baseline (CLM runs)")
    for p, func in ((mlm, _eval_mlm), (lm, _eval_lm)):
        p.add_argument("run_dir", help=RUN_DIR_HELP)
        p.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
        p.add_argument("--test-shards", help="held-out text shards (default: run's eval.test_shards)")
        p.add_argument("--max-test-samples", type=int,
                       help="first N held-out blocks (default: run's eval.max_test_samples, else all)")
        p.set_defaults(func=func)
    linear = labeled_eval("linear", "linear probe of the frozen encoder: BatchNorm + linear layer "
                          "trained on its features (MAE / MoCo v3 protocol; image runs, MLM runs on labeled text, "
                          "wav2vec2 runs on labeled clips)",
                          "to train the probe on", "test")
    linear.add_argument("--epochs", type=int, default=100, help="passes over the features")
    linear.add_argument("--batch-size", type=int, default=256, help="SGD batch")
    linear.add_argument("--lr", type=float, default=0.1, help="base learning rate per 256 samples")
    linear.set_defaults(func=_eval_linear)
    tune = ev.add_parser("finetune", help="fine-tune the encoder on labeled shards (objective classify) "
                         "beside the same architecture trained from scratch at the same budget")
    tune.add_argument("run_dir", help=RUN_DIR_HELP)
    tune.add_argument("--train-shards", required=True, help="labeled training shards")
    tune.add_argument("--test-shards", required=True, help="labeled test shards (top-1)")
    tune.add_argument("--steps", type=int, default=5000, help="optimizer steps of each run (5,000 x 256 "
                      "images: ~21 epochs of Fashion-MNIST, ~40 min per run on 2 CPU cores)")
    tune.add_argument("--step", type=int, help="pretraining checkpoint step (default: latest complete)")
    tune.add_argument("--nproc", type=int, default=1, help="local ranks of each run")
    tune.add_argument("--from-scratch", action="store_true", help="run only the from-scratch baseline")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="another dotted override for both runs, e.g. --set optim.lr=5e-4 (repeatable)")
    tune.set_defaults(func=_eval_finetune)
