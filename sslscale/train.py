"""Per-process training entry: config -> build -> ``Trainer.fit()`` -> close.

Run by ``sslscale train`` (one process, no env vars needed), by ``sslscale launch`` through
torchrun, or by Slurm's srun; ``python -m sslscale.train CONFIG [key=value ...]`` works too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from launcher.env import export_env, read_env, rendezvous_errors
from sslscale.config import load_config, save_config, to_dict
from sslscale.config_schema import image_input
from sslscale.data.shards import load_manifest_for
from sslscale.dist import gathered
from sslscale.exits import EXIT_FILE
from sslscale.rng import seed_everything


def init_weights_from(objective, folder: Path) -> None:
    """Load the model weights of checkpoint ``folder`` into ``objective`` before the engine is
    built (so DeepSpeed's master copies start from them; any world size / ZeRO stage it was saved
    with). Gathers ZeRO-3 partitions to load. ``FileNotFoundError`` unless it is complete."""
    from sslscale import checkpoint

    if not checkpoint.is_complete(folder):
        raise FileNotFoundError(f"train.init_from = {folder}: not a complete checkpoint")
    state = checkpoint.load_module_state(folder)
    with gathered(objective.parameters()):  # ZeRO-3 partitioned them at construction
        if hasattr(objective, "load_pretrained"):  # fine-tuning: the encoder only, a new head
            objective.load_pretrained(state, source=f"train.init_from = {folder}")
        else:
            objective.load_state_dict(state)  # kept from rank 0


def resolve_num_classes(cfg, manifest) -> None:
    """``classify`` with ``objective.num_classes = 0``: the number of the training shards'
    classes (their manifest's ``meta.classes``). ``ConfigError`` when it is unknown there."""
    from sslscale.config import ConfigError

    if cfg.objective.name != "classify" or cfg.objective.num_classes != 0:
        return
    classes = (manifest.meta or {}).get("classes")
    if not classes:
        raise ConfigError(f"key 'objective.num_classes' = 0 and {manifest.root}/manifest.json records "
                          "no classes (meta.classes): set objective.num_classes, or prepare labeled "
                          "shards (image-folder class folders, `data prepare text --labels section`)")
    from omegaconf import read_write

    with read_write(cfg):  # the config is read-only once loaded
        cfg.objective.num_classes = len(classes)


def make_evaluator(cfg, engine, env, train_manifest):
    """A collective ``() -> metrics`` or None: for text data, masked-token accuracy and perplexity
    on ``eval.test_shards`` (held-out text; ``clm``: next-token perplexity and accuracy beside
    the unigram baseline, ``sslscale.evaluate_lm.clm_eval``); for fine-tuning (``classify``), the head's top-1 on
    ``eval.test_shards``; for other image objectives, kNN top-1 with ``eval.train_shards`` as
    the bank and ``eval.test_shards`` as the queries."""
    if train_manifest.modality == "text" and cfg.eval.test_shards and cfg.objective.name != "classify":
        from sslscale.data.stream import decoder_for
        from sslscale.evaluate import mlm_eval
        from sslscale.evaluate_lm import clm_eval

        held_out = load_manifest_for("eval.test_shards", cfg.eval.test_shards)
        decode = decoder_for(cfg, held_out)
        score = clm_eval if cfg.objective.name == "clm" else mlm_eval
        return lambda: score(engine.module, held_out, decode, device=engine.device, rank=env.rank,
                             world_size=env.world_size, batch_size=cfg.eval.batch_size,
                             limit=cfg.eval.max_test_samples)
    if cfg.objective.name == "classify" and cfg.eval.test_shards:
        from sslscale.finetune import classify_eval

        held_out = load_manifest_for("eval.test_shards", cfg.eval.test_shards)
        return lambda: classify_eval(engine.module, held_out, device=engine.device, rank=env.rank,
                                     world_size=env.world_size, **image_input(cfg),
                                     batch_size=cfg.eval.batch_size, limit=cfg.eval.max_test_samples)
    if not (cfg.eval.train_shards and cfg.eval.test_shards):
        return None
    from sslscale.evaluate import knn_eval

    bank = load_manifest_for("eval.train_shards", cfg.eval.train_shards)
    queries = load_manifest_for("eval.test_shards", cfg.eval.test_shards)

    def evaluate() -> dict:
        return knn_eval(engine.module, bank, queries, device=engine.device, rank=env.rank,
                        world_size=env.world_size, **image_input(cfg), k=cfg.eval.k,
                        temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                        max_train_samples=cfg.eval.max_train_samples,
                        max_test_samples=cfg.eval.max_test_samples)
    return evaluate




def main(recipe: str, overrides: Sequence[str] = ()) -> int:
    """Train per ``recipe`` + ``overrides``; returns the process exit code (``sslscale.exits``:
    0 finished, 75 preempted, 130 interrupted, both after saving).

    A config or shard-plan error raises before anything starts (the CLI prints it, exit 2).
    Any error after that is fatal for the run: this rank prints one ``error: rank R: ...`` line
    (the traceback goes to ``RUN_DIR/errors/``) and ends at once, its data-loader workers
    included, with code 1 (2 for a config, plan or manifest error or a refused checkpoint, 130
    for Ctrl-C); the other ranks fail at their next collective (or are ended by
    ``sslscale launch`` / srun). A stall ends the rank with 124 (``sslscale.watchdog``).
    """
    from sslscale import exits
    from sslscale.data.domains import two_domain_stream, two_domains
    from sslscale.data.stream import TrainStream, decoder_for, train_loader
    from sslscale.stop import StopSignals

    stop = StopSignals().install()  # a stop signal during start-up is kept for the first step
    env = read_env()
    export_env(env)
    cfg = load_config(recipe, overrides)
    manifest = load_manifest_for("data.train_shards", cfg.data.train_shards)
    resolve_num_classes(cfg, manifest)

    def make_batches(positions: list[int] | None = None, phase: int = 0):
        if two_domains(cfg):  # cyclegan: two unpaired domains, each from its own streams
            return train_loader(two_domain_stream(cfg, manifest, rank=env.rank, world_size=env.world_size,
                                                  positions=positions, phase=phase))
        stream = TrainStream(manifest, rank=env.rank, world_size=env.world_size,
                             num_workers=cfg.data.num_workers, batch_size=cfg.train.micro_batch_size,
                             decode=decoder_for(cfg, manifest),
                             seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                             num_streams=cfg.data.num_streams, positions=positions, phase=phase,
                             strict=cfg.data.strict, where=cfg.data.train_shards)
        return train_loader(stream)

    make_batches()  # fail on a bad shard plan before joining the process group
    exits.kill_children_at_exit()
    try:
        return _run(cfg, env, manifest, make_batches, stop)
    except BaseException as error:  # every error (Ctrl-C too) ends the rank, promptly
        print(exits.report_fatal(error, env.rank, cfg.run_dir), file=sys.stderr, flush=True)
        exits.hard_exit(_exit_code_for(error))
    return exits.CRASHED  # not reached


def _exit_code_for(error: BaseException) -> int:
    """130 for Ctrl-C, 2 for a config / plan / manifest error or a refused checkpoint (a rerun
    would repeat it: Slurm does not requeue it), else 1."""
    from sslscale import exits
    from sslscale.config import ConfigError
    from sslscale.data.plan import PlanError
    from sslscale.data.shards import ManifestError
    from sslscale.safe_load import UnsafeCheckpointError

    if isinstance(error, KeyboardInterrupt):
        return exits.INTERRUPTED
    usage = (ConfigError, PlanError, ManifestError, UnsafeCheckpointError)
    return exits.USAGE if isinstance(error, usage) else exits.CRASHED


def _run(cfg, env, manifest, make_batches, stop) -> int:
    """Join the process group, build the engine, train, close; see :func:`main`."""
    from sslscale import checkpoint
    from sslscale.data.domains import num_positions
    from sslscale.engine import build_engine, init_distributed
    from sslscale.metrics import MetricsLogger
    from sslscale.objectives import build_objective
    from sslscale.trainer import Trainer
    from sslscale.watchdog import StallWatchdog

    with rendezvous_errors(env):  # a rendezvous port in use: one line naming it and the key
        init_distributed(cfg.dist.timeout_s)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    init_from = None if checkpoint.resolve_resume(cfg.resume, cfg.run_dir) is not None \
        else cfg.train.init_from

    def build_model():
        objective = build_objective(cfg)
        if init_from:
            init_weights_from(objective, Path(init_from))
        return objective

    engine = build_engine(cfg, env.world_size, build_model)
    seed_everything(cfg.train.seed + 1000 * env.rank)  # distinct augmentation / masks per rank
    run_dir = Path(cfg.run_dir)
    config_dict = to_dict(cfg)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
    metrics = MetricsLogger(run_dir, enabled=env.is_main, max_steps=cfg.train.max_steps,
                            start_step=0, config=config_dict, wandb_cfg=cfg.wandb, run_name=cfg.name)
    if init_from:
        metrics.info(f"initialized the model from {init_from} (train.init_from)")
    metrics.info(f"engine: DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {engine.precision}, "
                 f"{engine.device}, world size {env.world_size}, "
                 f"grad accumulation {engine.grad_accum_steps}, {type(engine.optimizer).__name__}"
                 + (f" per network, {len(engine.engines)} engines: {', '.join(engine.engines)}"
                    if hasattr(engine, "engines") else ""))
    watchdog = StallWatchdog(run_dir, env.rank, env.world_size, cfg.train.stall_timeout_s).start()
    try:
        trainer = Trainer(cfg, engine, make_batches=make_batches,
                          samples_per_epoch=manifest.num_samples, metrics=metrics,
                          num_streams=num_positions(cfg),
                          is_main=env.is_main, config_dict=config_dict,
                          evaluate=make_evaluator(cfg, engine, env, manifest), watchdog=watchdog,
                          stop=stop)
        state = trainer.fit()
    except BaseException:
        metrics.abort()
        raise
    watchdog.stop()
    metrics.info(f"{'stopped' if state.stop_code else 'done'}: step {state.step}, "
                 f"{state.samples_seen} samples; run dir {run_dir}")
    metrics.close()
    if env.is_main:
        (run_dir / EXIT_FILE).write_text(json.dumps({"code": state.stop_code, "step": state.step,
                                                     "samples_seen": state.samples_seen}) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank exits (srun ends the others) before rank 0 is done
        torch.distributed.destroy_process_group()
    if os.environ.get(checkpoint.FAULT_ENV) == f"abort-at-exit:{env.rank}":  # tests: a teardown crash
        os.abort()
    return state.stop_code


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m sslscale.train CONFIG [key=value ...]")
    from sslscale.exits import USAGE

    try:
        code = main(sys.argv[1], sys.argv[2:])
    except (ValueError, FileNotFoundError) as e:  # ConfigError, PlanError: a rerun would repeat it
        print(f"error: {e}", file=sys.stderr)
        code = USAGE
    sys.exit(code)
