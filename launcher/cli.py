"""The ``sslscale`` command line: data (prepare | plan) | train | launch | eval | ckpt.

Each sub-command parses its flags and hands over to one function; heavy modules (torch,
DeepSpeed, transformers) are imported only by the sub-command that needs them. Errors the user
can fix (a bad config key, a missing shard folder, a shard plan that cannot work) print one
``error:`` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _data_prepare(args: argparse.Namespace) -> int:
    from sslscale.data.sources import prepare

    manifest = prepare(args.source, args.out, split=args.split, input_dir=args.input,
                       samples_per_shard=args.samples_per_shard, fmt=args.format, limit=args.limit)
    print(json.dumps({"out": args.out, "source": manifest.source, "num_shards": len(manifest.shards),
                      "num_samples": manifest.num_samples}))
    return 0


def _data_plan(args: argparse.Namespace) -> int:
    from launcher.plan import describe
    from sslscale.data.shards import load_manifest

    manifest = load_manifest(args.manifest)
    plan = describe([s.num_samples for s in manifest.shards], num_streams=args.num_streams,
                    world_size=args.world_size, num_workers=args.workers,
                    micro_batch_size=args.micro_batch_size, seed=args.seed, epochs=args.epochs)
    print(json.dumps(plan, indent=1))
    return 0


def _preflight(recipe: str, overrides: Sequence[str], world_size: int) -> None:
    """Check the config and the shard plan for ``world_size`` ranks before starting any."""
    from launcher.plan import check_streams
    from sslscale import checkpoint
    from sslscale.config import grad_accum_steps, load_config
    from sslscale.train import load_manifest_for

    cfg = load_config(recipe, overrides)
    grad_accum_steps(cfg, world_size)
    manifest = load_manifest_for("data.train_shards", cfg.data.train_shards)
    check_streams(len(manifest.shards), cfg.data.num_streams, world_size, cfg.data.num_workers,
                  cfg.data.train_shards)
    folder = checkpoint.resolve_resume(cfg.resume, cfg.run_dir)
    if folder is not None:
        checkpoint.check_compatible(folder, world_size, cfg.deepspeed.zero_stage)


def _train(args: argparse.Namespace) -> int:
    from sslscale.train import main

    return main(args.config, args.overrides)


def _launch(args: argparse.Namespace) -> int:
    from launcher.local import launch

    _preflight(args.config, args.overrides, args.nproc)
    return launch(args.nproc, args.config, args.overrides)


def _eval_knn(args: argparse.Namespace) -> int:
    from sslscale.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, step=args.step, train_shards=args.train_shards,
                          test_shards=args.test_shards, baseline=args.baseline,
                          max_train_samples=args.max_train_samples,
                          max_test_samples=args.max_test_samples, k=args.k)
    print(json.dumps(result))
    return 0


def _ckpt_info(args: argparse.Namespace) -> int:
    from sslscale.checkpoint import describe

    rows = describe(args.run_dir)
    if not rows:
        raise FileNotFoundError(f"{args.run_dir}: no checkpoints")
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'tag':<15} {'step':>9} {'complete':>8} {'MB':>9} {'world':>5} {'ZeRO':>4}")
    for r in rows:
        print(f"{r['tag']:<15} {r['step']:>9} {'yes' if r['complete'] else 'NO':>8} "
              f"{r['bytes'] / 2**20:>9.1f} {r['world_size'] or '-':>5} "
              f"{'-' if r['zero_stage'] is None else r['zero_stage']:>4}{'  <- latest' if r['latest'] else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare shards").add_subparsers(dest="action", required=True)
    prep = data.add_parser("prepare", help="write a source as WebDataset shards + manifest.json")
    prep.add_argument("source", choices=["fashion-mnist", "mnist5k", "image-folder"])
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--split", default="train", choices=["train", "test"])
    prep.add_argument("--input", help="folder of images (image-folder)")
    prep.add_argument("--samples-per-shard", type=int, default=5000)
    prep.add_argument("--format", default="png", choices=["png", "jpg"])
    prep.add_argument("--limit", type=int, help="keep only the first N samples")
    prep.set_defaults(func=_data_prepare)
    plan = data.add_parser("plan", help="print the stream plan for a world size and worker count")
    plan.add_argument("manifest", help="manifest.json or the folder holding it")
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--workers", type=int, default=2, help="data-loader workers per rank")
    plan.add_argument("--num-streams", type=int, default=8)
    plan.add_argument("--micro-batch-size", type=int, default=64)
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--epochs", type=int, default=2)
    plan.set_defaults(func=_data_plan)

    for name, func, help_ in [("train", _train, "train in this process (rank from env vars)"),
                              ("launch", _launch, "train with N local ranks (torchrun)")]:
        p = sub.add_parser(name, help=help_)
        if name == "launch":
            p.add_argument("--nproc", type=int, required=True, help="number of local ranks")
        p.add_argument("config", help="YAML recipe, e.g. configs/demo/mae_vit_tiny_fmnist.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
        p.set_defaults(func=func)

    ev = sub.add_parser("eval", help="evaluate a run").add_subparsers(dest="action", required=True)
    knn = ev.add_parser("knn", help="weighted kNN top-1 of the frozen encoder")
    knn.add_argument("run_dir")
    knn.add_argument("--step", type=int, help="checkpoint step (default: latest complete)")
    knn.add_argument("--train-shards", help="labeled shards for the memory bank (default: run's eval.train_shards)")
    knn.add_argument("--test-shards", help="labeled query shards (default: run's eval.test_shards)")
    knn.add_argument("--baseline", action="store_true", help="also score the same architecture at random init")
    knn.add_argument("--max-train-samples", type=int)
    knn.add_argument("--max-test-samples", type=int)
    knn.add_argument("--k", type=int)
    knn.set_defaults(func=_eval_knn)
    ck = sub.add_parser("ckpt", help="inspect checkpoints").add_subparsers(dest="action", required=True)
    info = ck.add_parser("info", help="list a run's checkpoints: step, size, world size, completeness")
    info.add_argument("run_dir")
    info.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    info.set_defaults(func=_ckpt_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from launcher.plan import PlanError
    from sslscale.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
