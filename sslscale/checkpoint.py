"""Checkpoints: save, find the latest complete one, load, retain, and read weights without an
engine.

Layout: ``RUN_DIR/checkpoints/step-XXXXXXXX/`` holds DeepSpeed's files (engine shards, client
state with the data positions), ``rank-XXXXX.pt`` per rank (its random states), ``encoder/``
(Hugging Face format) and, once every rank has written, ``complete.json`` (the list of files and
their sizes, written by rank 0 after a barrier). ``RUN_DIR/checkpoints/latest`` names the newest
complete tag and moves only after its marker exists (temp file + rename). Resume ignores tags
without a marker (a kill mid-save leaves ``latest`` on the previous one). ``retain`` deletes old
ones by ``checkpoint.keep_last`` / ``keep_every``, never the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "complete.json"
LATEST = "latest"
# Test-only fault injection: "kill-before-marker:STEP" (here), "nan-loss:A-B" (trainer: the
# A-th to B-th micro-batch of the process get a NaN loss on rank 0).
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


def rng_state() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and CUDA) as plain types and
    tensors, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def save(ds_engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
         is_main: bool) -> Path:
    """Save a checkpoint at ``step`` on every rank (collective: all ranks must call it).

    ``client_state`` (step, samples_seen, config, data positions ...) is stored with the engine
    state; every rank also writes its RNG states to ``rank-XXXXX.pt``, and rank 0 the encoder in
    Hugging Face format to ``encoder/`` (``ExportError`` if it is empty or misshapen). Returns
    the tag folder.
    """
    from sslscale.export import gather_encoder_state, save_encoder

    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ds_engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    encoder_state = gather_encoder_state(ds_engine, ds_engine.module)
    if encoder_state is not None:
        save_encoder(ds_engine.module.encoder(), encoder_state, root / tag / "encoder")
    rank, world_size = _rank_and_world()
    torch.save({"rng": rng_state()}, rank_file(root / tag, rank))
    if os.environ.get(FAULT_ENV) == f"kill-before-marker:{step}":  # tests: a kill mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if is_main:
        folder = root / tag
        files = {str(p.relative_to(folder)): p.stat().st_size
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
        marker = {"tag": tag, "step": step, "time": time.time(), "files": files,
                  "world_size": world_size,
                  "zero_stage": ds_engine.zero_optimization_stage()}
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
    the newest complete one. Never touches the newest complete checkpoint. Returns what it
    deleted. Call on one process, after a save."""
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


def check_compatible(folder: Path, world_size: int, zero_stage: int) -> None:
    """``ConfigError`` if ``folder`` was written with another world size or ZeRO stage, which
    DeepSpeed cannot load yet (elastic resume through universal checkpoints comes later)."""
    from sslscale.config import ConfigError

    marker = json.loads((folder / MARKER).read_text())
    saved = (marker.get("world_size", world_size), marker.get("zero_stage", zero_stage))
    if saved != (world_size, zero_stage):
        raise ConfigError(
            f"key 'resume': checkpoint {folder} was written by {saved[0]} rank(s) with ZeRO-"
            f"{saved[1]}, this run has {world_size} rank(s) with ZeRO-{zero_stage}; resuming "
            "across world sizes or ZeRO stages is not supported yet: use resume=never or "
            "another run_dir")


def load(ds_engine, folder: Path) -> dict[str, Any]:
    """Load engine state (weights, optimizer) and this rank's RNG states from ``folder``;
    return the client state."""
    load_path, client_state = ds_engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {folder}")
    set_rng_state(torch.load(rank_file(folder, _rank_and_world()[0]), weights_only=True)["rng"])
    return client_state


def load_module_state(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The objective's full ``state_dict`` from a checkpoint folder, without an engine.

    ZeRO-3 shards are consolidated to fp32 (``zero_to_fp32``); otherwise rank 0's module state
    holds the full weights.
    """
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete checkpoint")
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return states["module"]
