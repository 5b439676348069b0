"""The ``sslscale`` command line: data | train | launch | submit | status | cancel | eval | ckpt |
export | push | plot.

Each sub-command parses its flags and hands over to one function; heavy modules (torch,
DeepSpeed, transformers) are imported only by the sub-command that needs them. Errors the user
can fix (a bad config key, a missing shard folder, a shard plan that cannot work) print one
``error:`` line and exit with code 2. The data, eval and hub commands live in
``launcher/cli_data.py``, ``cli_eval.py`` and ``cli_hub.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Sequence

from launcher.cli_data import add_data_commands
from launcher.cli_eval import add_eval_commands
from launcher.cli_hub import add_hub_commands
from launcher.cli_util import RUN_DIR_HELP, one_line_errors

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


@one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
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


@one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
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


@one_line_errors(ValueError)  # SlurmError: a bad value, an sbatch failure
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

    add_data_commands(sub)
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

    add_eval_commands(sub)
    ck = sub.add_parser("ckpt", help="inspect checkpoints").add_subparsers(dest="action", required=True)
    info = ck.add_parser("info", help="list a run's checkpoints: step, size, world size, completeness")
    info.add_argument("run_dir", help=RUN_DIR_HELP)
    info.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    info.set_defaults(func=_ckpt_info)
    _add_slurm_commands(sub)
    add_hub_commands(sub)
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
