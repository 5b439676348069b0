"""Checkpoints: save, find the latest complete one, load, retain, and read weights without an
engine.

Layout: ``RUN_DIR/checkpoints/step-XXXXXXXX/`` holds DeepSpeed's files (engine shards, client
state with the data positions), ``rank-XXXXX.pt`` per rank (its random states), ``encoder/``
(Hugging Face format) and, once every rank has written, ``complete.json`` (the list of files and
their sizes, written by rank 0 after a barrier). ``RUN_DIR/checkpoints/latest`` names the newest
complete tag and moves only after its marker exists (temp file + rename). Resume ignores tags
without a marker (a kill mid-save leaves ``latest`` on the previous one). ``retain`` deletes old
ones by ``checkpoint.keep_last`` / ``keep_every``, never the newest complete one. An objective
with several networks (``sslscale.engine_set``, a GAN) saves one DeepSpeed checkpoint per network
in ``step-XXXXXXXX/<name>/``, all under the one marker (which lists them as ``"engines"``);
``load_module_state`` joins them into the objective's state (``<name>.`` prefixes), and an elastic
resume converts each engine's on its own (``universal/step-XXXXXXXX/<name>``).

Elastic resume: a checkpoint written by another number of ranks is converted once to a DeepSpeed
universal checkpoint (``deepspeed.checkpoint.ds_to_universal``; Tian et al., "Universal
Checkpointing", arXiv 2406.18820), cached at ``RUN_DIR/checkpoints/universal/step-XXXXXXXX``
(built in a temp folder and renamed, so a kill mid-conversion leaves nothing half-made), and
loaded with DeepSpeed's universal loading. The client state (step, samples_seen, data positions)
is the original's; the stream positions re-deal over the new ranks by themselves
(``sslscale.data.plan``). Per-rank RNG states are not carried over: every rank reseeds from
``(train.seed, step, rank)``. Changing the ZeRO stage or the model's shape stays an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from sslscale.dist import fail_together, gathered, rank_and_world
from sslscale.rng import reseed, rng_state, set_rng_state
from sslscale.safe_load import weights_only_loads

MARKER = "complete.json"
LATEST = "latest"
UNIVERSAL = "universal"  # RUN_DIR/checkpoints/universal/step-XXXXXXXX: converted for elastic resume
SOURCE = "source.json"  # in a universal folder: the marker of the checkpoint it was made from
# Keys of the config's `model` section that do not change the parameters' shapes.
NOT_SHAPE_KEYS = ("attn_implementation",)
# Test-only fault injection: "kill-before-marker:STEP" (here: a kill mid-save),
# "kill-in-conversion:STEP" (here: a kill after a universal conversion is written, before its
# rename), "nan-loss:A-B" (trainer: the A-th to B-th micro-batch of the process get a NaN loss
# on rank 0), "crash-at-step:N" (trainer: the last rank raises after step N).
FAULT_ENV = "SSLSCALE_FAULT_INJECT"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def _frozen_zero3(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if hasattr(p, "ds_tensor") and not p.requires_grad}


def _restore_frozen_zero3(module, folder: Path, saved_world_size: int) -> None:
    """Put back ZeRO-3 parameters that have no gradient (MoCo's momentum encoder): DeepSpeed
    0.19.8 saves only rank 0's partition of them and loads it into every rank. Each rank file
    holds its own partitions; the full tensor is their concatenation (equal, contiguous slices
    of the flat parameter), loaded through ``GatheredParameters`` so any new world size works."""
    params = _frozen_zero3(module)
    parts = [torch.load(rank_file(folder, r), weights_only=True).get("frozen", {})
             for r in range(saved_world_size)] if params else []
    params = {n: p for n, p in params.items() if n in parts[0]}  # older checkpoints lack them
    if not params:
        return
    with gathered(params.values()):
        for name, p in params.items():
            full = torch.cat([part[name] for part in parts])[:p.numel()]
            p.data.copy_(full.view_as(p.data))


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a lost file system): names the folder and the
    free space left; the previous complete checkpoint and ``latest`` are untouched."""


def _write_error(folder: Path, error: BaseException) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    full = free is not None and free < 1 << 20 or getattr(error, "errno", None) == 28  # ENOSPC
    cause = "no space left on device" if full else f"{type(error).__name__}: {error}"
    space = "" if free is None else f"; {free / 2**20:.1f} MiB free there"
    return CheckpointWriteError(f"writing checkpoint {folder} failed: {cause}{space} "
                                f"(the last complete checkpoint is intact)")


def save(ds_engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
         is_main: bool) -> Path:
    """Save a checkpoint at ``step`` on every rank (collective: all ranks must call it).

    ``client_state`` (step, samples_seen, config, data positions ...) is stored with the engine
    state; every rank also writes its RNG states (and, under ZeRO-3, its partitions of parameters
    without gradient) to ``rank-XXXXX.pt``, and rank 0 the encoder in
    Hugging Face format to ``encoder/`` (``ExportError`` if it is empty or misshapen). Returns
    the tag folder. ``CheckpointWriteError`` when a write fails (the rank then exits; the
    others fail at the next collective): the folder stays incomplete, ``latest`` unmoved.
    """
    folder = checkpoints_dir(run_dir) / tag_for(step)
    try:
        return _save(ds_engine, run_dir, step, client_state, is_main)
    except (OSError, RuntimeError) as e:
        if isinstance(e, CheckpointWriteError) or "another rank failed" in str(e):
            raise
        raise _write_error(folder, e) from e


def _save(ds_engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
          is_main: bool) -> Path:
    from sslscale.export import ExportError, gather_encoder_state, save_encoder

    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    # A save moves no random generator (building the encoder's architecture to check its export
    # draws from torch's, e.g. Wav2Vec2Model's): the run goes on, and a resume starts, from the
    # states the save found, so saving more or less often never changes a loss.
    rng = rng_state()
    ds_engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    encoder_state, error = gather_encoder_state(ds_engine, ds_engine.module), None
    if encoder_state is not None:
        try:
            save_encoder(ds_engine.module.encoder(), encoder_state, root / tag / "encoder")
        except ExportError as e:  # rank 0 checks it; the others must not wait at the barrier
            error = e
    fail_together(error, f"exporting the encoder of {tag}")
    rank, world_size = rank_and_world()
    frozen = {n: p.ds_tensor.detach().cpu().clone() for n, p in _frozen_zero3(ds_engine.module).items()}
    set_rng_state(rng)
    torch.save({"rng": rng, "frozen": frozen}, rank_file(root / tag, rank))
    if os.environ.get(FAULT_ENV) == f"kill-before-marker:{step}":  # tests: a kill mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if is_main:
        folder = root / tag
        files = {str(p.relative_to(folder)): p.stat().st_size
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
        marker = {"tag": tag, "step": step, "time": time.time(), "files": files,
                  "world_size": world_size,
                  "zero_stage": ds_engine.zero_optimization_stage(),
                  "model": model_signature(client_state.get("config"))}
        if hasattr(ds_engine, "engines"):  # several networks: step-X/<name>/ each
            marker["engines"] = list(ds_engine.engines)
        _write_atomic(folder / MARKER, json.dumps(marker, indent=1))
        _write_atomic(root / LATEST, tag)
    _barrier()
    return root / tag


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def step_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The ``step-*`` folders of ``run_dir`` (complete or not), newest first."""
    root = checkpoints_dir(run_dir)
    folders = root.glob("step-*") if root.is_dir() else []
    return sorted((p for p in folders if p.is_dir()), key=step_of, reverse=True)


def retain(run_dir: str | os.PathLike, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete checkpoints beyond the newest ``keep_last`` complete ones (0 keeps all), except
    steps that are multiples of ``keep_every``; also leftovers of interrupted saves older than
    the newest complete one, and universal caches whose checkpoint is gone. Never touches the
    newest complete checkpoint. Returns the checkpoints it deleted. Call on one process, after a
    save."""
    tags = step_folders(run_dir)
    complete = [p for p in tags if is_complete(p)]
    if not complete:
        return []
    keep = set(complete[:keep_last] if keep_last else complete)
    keep |= {p for p in complete if keep_every and step_of(p) % keep_every == 0}
    newest = step_of(complete[0])
    doomed = [p for p in tags if p not in keep and (p in complete or step_of(p) < newest)]
    for folder in doomed:
        (folder / MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never "complete"
        shutil.rmtree(folder)
    universal = checkpoints_dir(run_dir) / UNIVERSAL
    for cache in universal.glob("step-*") if universal.is_dir() else []:
        if not (cache.parent.parent / cache.name).is_dir():  # its checkpoint is gone
            shutil.rmtree(cache)
    return doomed


def describe(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per checkpoint folder of ``run_dir`` (newest first): tag, step, complete, bytes,
    world size, ZeRO stage, and whether ``latest`` names it."""
    root = checkpoints_dir(run_dir)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    rows = []
    for folder in step_folders(run_dir):
        complete = is_complete(folder)
        marker = json.loads((folder / MARKER).read_text()) if complete else {}
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rows.append({"tag": folder.name, "step": step_of(folder), "complete": complete, "bytes": size,
                     "world_size": marker.get("world_size"), "zero_stage": marker.get("zero_stage"),
                     "latest": folder.name == latest})
    return rows


def is_complete(folder: Path) -> bool:
    """True if ``folder`` has a marker and every file it lists exists with its recorded size."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in files.items())


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder with the highest step, or None."""
    return next((p for p in step_folders(run_dir) if is_complete(p)), None)


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder that ``resume`` (auto | never | PATH) points at, or None.

    Raises ``FileNotFoundError`` for a PATH that is not a complete checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    folder = Path(resume)
    if not is_complete(folder):
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder "
                                f"(missing {MARKER} or files)")
    return folder


def model_signature(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """What fixes the parameters' shapes, from a resolved config dict: ``objective.name``, every
    ``model.*`` key but ``NOT_SHAPE_KEYS``, and the objective's ``*_dim`` keys (heads), as
    ``{"dotted.key": value}``; None without a config."""
    if not config:
        return None
    objective = config.get("objective", {})
    return {"objective.name": objective.get("name"),
            **{f"model.{k}": v for k, v in config.get("model", {}).items() if k not in NOT_SHAPE_KEYS},
            **{f"objective.{k}": v for k, v in objective.items() if k.endswith("_dim")}}


def check_compatible(folder: Path, world_size: int, zero_stage: int,
                     config: dict[str, Any] | None = None) -> bool:
    """Whether loading ``folder`` on ``world_size`` ranks needs an elastic resume (True when it
    was written by another number of ranks).

    Raises ``ConfigError`` naming both values when the ZeRO stage differs, or when a key of
    ``model_signature`` differs from ``config`` (a resolved config dict).
    """
    from sslscale.config import ConfigError

    marker = json.loads((folder / MARKER).read_text())
    saved_stage = marker.get("zero_stage", zero_stage)
    if saved_stage != zero_stage:
        raise ConfigError(
            f"key 'deepspeed.zero_stage': checkpoint {folder} was written with ZeRO-{saved_stage}, "
            f"this run has ZeRO-{zero_stage}; resume with deepspeed.zero_stage={saved_stage}, "
            "or use resume=never or another run_dir")
    saved, ours = marker.get("model"), model_signature(config)
    if saved and ours:
        changed = [k for k in saved if k in ours and saved[k] != ours[k]]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"key '{key}': checkpoint {folder} was written with {saved[key]!r}, this run has "
                f"{ours[key]!r} (changed: {', '.join(changed)}); a checkpoint loads only into the "
                "same architecture: use resume=never or another run_dir")
    return marker.get("world_size", world_size) != world_size


def universal_folder(folder: Path, network: str | None = None) -> Path:
    """Where the universal version of checkpoint ``folder`` is cached (of its ``network``'s
    engine, for a checkpoint of several: ``sslscale.engine_set``)."""
    out = folder.parent / UNIVERSAL / folder.name
    return out / network if network else out


def _universal_is_current(folder: Path, network: str | None = None) -> bool:
    out = universal_folder(folder, network)
    try:
        source = json.loads((out / SOURCE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return source == json.loads((folder / MARKER).read_text())


def _convert(folder: Path, network: str | None = None) -> None:
    """Run ``ds_to_universal`` on ``folder`` (its ``network``'s engine in ``folder/<network>/``)
    into a temp folder beside ``universal_folder(folder, network)``, then rename it to that.
    Leftovers of an interrupted conversion are removed first."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_folder(folder, network)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    target = tmp / out.name  # ds_to_universal also writes `latest_universal` beside its output
    source = folder / network if network else folder
    args = Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)  # ZeRO-1/2 checkpoints lack the universal info
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {folder} to a universal checkpoint failed: "
                           f"{type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from e
    shutil.copy2(folder / MARKER, target / SOURCE)
    if os.environ.get(FAULT_ENV) == f"kill-in-conversion:{step_of(folder)}":  # tests
        os.kill(os.getpid(), signal.SIGKILL)
    if out.exists():  # a stale cache of an older checkpoint with the same tag
        shutil.rmtree(out)
    os.replace(target, out)
    shutil.rmtree(tmp, ignore_errors=True)


def to_universal(folder: Path, network: str | None = None) -> Path:
    """The universal checkpoint of ``folder`` (of its ``network``'s engine, for a checkpoint of
    several) (collective): rank 0 converts it unless a cache made from this very checkpoint
    exists; the others wait at a barrier. Returns its folder.

    Raises ``RuntimeError`` (with DeepSpeed's output) if the conversion fails."""
    error = None
    if rank_and_world()[0] == 0 and not _universal_is_current(folder, network):
        try:
            _convert(folder, network)
        except RuntimeError as e:
            error = e
    fail_together(error, f"converting {folder} to a universal checkpoint")  # also the barrier
    return universal_folder(folder, network)


def load(ds_engine, folder: Path) -> dict[str, Any]:
    """See :func:`_load`; every file is read ``weights_only`` (``sslscale.safe_load``):
    ``UnsafeCheckpointError`` for a file that holds code."""
    with weights_only_loads():
        return _load(ds_engine, folder)


def _load(ds_engine, folder: Path) -> dict[str, Any]:
    """Load engine state (weights, optimizer) and RNG states from ``folder``; return the client
    state (collective). On the world size that wrote it, this rank's RNG states are restored.
    On another one (elastic), a ZeRO-1/2/3 checkpoint goes through ``to_universal`` (ZeRO-0
    state is whole on every rank and loads as is) and every rank reseeds python, numpy and torch
    from ``(train.seed, step, rank)``: reproducible, but not the old ranks' random sequences."""
    from sslscale.engine import load_checkpoint

    rank, world_size = rank_and_world()
    marker = json.loads((folder / MARKER).read_text())
    elastic = marker.get("world_size", world_size) != world_size
    universal = elastic and marker.get("zero_stage", 0) > 0  # ZeRO-0 state is not partitioned
    if hasattr(ds_engine, "engines"):  # sslscale.engine_set: each network's engine in folder/<name>/
        source = folder
        loaded = [load_checkpoint(engine.ds, to_universal(folder, name) if universal else folder / name,
                                  universal=universal) for name, engine in ds_engine.engines.items()]
        # every engine holds the same client state
        load_path, client_state = (str(folder), loaded[0][1]) if all(p for p, _ in loaded) else (None, {})
    else:
        source = to_universal(folder) if universal else folder
        load_path, client_state = load_checkpoint(ds_engine, source, universal=universal)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {source}")
    _restore_frozen_zero3(ds_engine.module, folder, marker.get("world_size", world_size))
    if elastic:
        seed = int(client_state.get("config", {}).get("train", {}).get("seed", 0))
        reseed(seed, int(client_state["step"]), rank)
    else:
        set_rng_state(torch.load(rank_file(folder, rank), weights_only=True)["rng"])
    return client_state


def load_module_state(folder: Path, zero_stage: int | None = None) -> dict[str, torch.Tensor]:
    """The objective's full ``state_dict`` from a checkpoint folder, without an engine (any
    world size). ``zero_stage`` defaults to the one its marker records.

    ZeRO-3 shards are consolidated to fp32 (``zero_to_fp32``); otherwise rank 0's module state
    holds the full weights. ``FileNotFoundError`` unless the checkpoint is complete.
    """
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete checkpoint")
    if zero_stage is None:
        zero_stage = json.loads((folder / MARKER).read_text()).get("zero_stage") or 0
    engines = json.loads((folder / MARKER).read_text()).get("engines")
    if engines:  # several networks (sslscale.engine_set): network `name` is the objective's `name.`
        return {f"{name}.{k}": v for name in engines
                for k, v in torch.load(folder / name / "mp_rank_00_model_states.pt", map_location="cpu",
                                       weights_only=True)["module"].items()}
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return states["module"]
