"""``sslscale export`` and ``sslscale push``: a run's checkpoint -> a Hugging Face model folder
(encoder + preprocessing + model card), round-trip checked, then optionally uploaded.

Export restores the objective from the checkpoint's DeepSpeed state (``load_module_state``:
ZeRO-3 shards consolidated to fp32), converts it to the published form
(``sslscale.export.publishable_model``: the encoder, MLM and CLM with their trained heads, an identity
pooler), writes ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` or the
tokenizer files + ``README.md`` into a temporary folder next to ``--out``, checks that the
folder loaded fresh with the Auto classes creates no random weight and reproduces the training
model's features (and MLM or LM logits) (``round_trip_check``), and only then renames it to ``--out``.
Its stages show as progress on stderr (``sslscale.log.progress``: a bar on a terminal, a line
every few seconds otherwise).

Push first checks the token and the hub (``hub_preflight``: ``whoami``, seconds, before the
slow export; every hub or network failure is one ``HubError`` line), exports into a temporary
folder the same way, then ``HfApi.create_repo(exist_ok=True)`` (+ ``create_branch`` for
``--revision``) and ``upload_folder`` with a commit message naming the step, and records the
model card's link in the run's wandb run. The token is never handled here: huggingface_hub
reads ``HF_TOKEN`` or the user's ``hf auth login``; sslscale neither prints, logs nor stores
it (hub error messages are scrubbed of it), and takes no ``--token`` flag (it would land in
shell history, in ``ps`` and in wandb's recorded command line).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslscale import checkpoint
from sslscale.data.shards import MANIFEST
from sslscale.export import (ExportError, causal_lm_of, check_encoder_state, is_audio_encoder, is_image_encoder,
                             masked_lm_of, publishable_model, round_trip_check, save_preprocessing)
from sslscale.log import progress

PREFLIGHT_TIMEOUT_S = 30.0  # huggingface_hub's client has no timeout: a dropped route would hang


class HubError(ExportError):
    """The hub refused or could not be reached (no network, ``HF_HUB_OFFLINE=1``, a bad or
    read-only token): one line, never the token."""


@dataclass
class ExportResult:
    out: Path
    step: int
    objective: str
    published_class: str
    num_params: int
    round_trip_diff: float  # max |last_hidden_state difference|, fp32


def _checkpoint_folder(run_dir: Path, step: int | None) -> Path:
    folder = (checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step) if step is not None
              else checkpoint.find_latest(run_dir))
    if folder is None or not checkpoint.is_complete(folder):
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint"
                                + (f" for step {step} (see `sslscale ckpt info {run_dir}`)"
                                   if step is not None else ""))
    return folder


def _client_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's client state (step, samples_seen, ...) without its tensors (several
    engines, ``sslscale.engine_set``: the first one's, each holds it)."""
    engines = json.loads((folder / checkpoint.MARKER).read_text()).get("engines") or [""]
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = folder / engines[0] / name
        if path.is_file():
            states = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return {k: v for k, v in states.items() if k in ("step", "samples_seen", "tokens_seen")}
    raise FileNotFoundError(f"{folder}: no DeepSpeed model states file (mp_rank_00_model_states.pt)")


def _restore_objective(cfg, folder: Path, zero_stage: int):
    """The objective with the checkpoint's weights, fp32, eval mode (its encoder checked)."""
    from sslscale.objectives import build_objective

    objective = build_objective(cfg)
    try:
        objective.load_state_dict(checkpoint.load_module_state(folder, zero_stage))
    except RuntimeError as e:  # missing / unexpected / misshapen tensors (e.g. unconsolidated ZeRO-3)
        raise ExportError(f"{folder}: its weights do not fit the run's {cfg.objective.name} model: "
                          f"{str(e).splitlines()[0]}") from None
    objective = objective.float().eval()
    encoder = objective.encoder()
    check_encoder_state(encoder, encoder.state_dict())  # an all-zero restore is the ZeRO-3 trap
    return objective


def _manifest_file(cfg, manifest) -> Path:
    given = Path(cfg.data.train_shards)
    return given if given.is_file() else Path(manifest.root) / MANIFEST


def _tokenizer_dir(manifest) -> Path:
    """The tokenizer the text data preparation saved beside the training manifest."""
    return Path(manifest.root) / manifest.meta.get("tokenizer", "tokenizer")


EXPORT_STAGES = ("restoring the checkpoint", "converting to the published form", "saving",
                 "round trip check", "model card")


def _write_folder(tmp: Path, run_dir: Path, cfg, folder: Path, repo_id: str | None, load_id: str,
                  license: str, bar) -> ExportResult:
    from sslscale.modelcard import card_facts, render_card
    from sslscale.data.shards import load_manifest_for

    def stage(i: int) -> None:
        bar.advance(i - bar.done)
        bar.stage(EXPORT_STAGES[i])

    stage(0)
    marker = json.loads((folder / checkpoint.MARKER).read_text())
    step = checkpoint.step_of(folder)
    objective = _restore_objective(cfg, folder, int(marker.get("zero_stage", cfg.deepspeed.zero_stage)))
    manifest = load_manifest_for("data.train_shards", cfg.data.train_shards)
    stage(1)
    model = publishable_model(objective)
    stage(2)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if is_image_encoder(model):
        pre = dict(image_size=cfg.model.image_size, mean=cfg.data.mean, std=cfg.data.std)
    elif is_audio_encoder(model):
        pre = dict(sampling_rate=int(manifest.meta["sampling_rate"]))
    else:
        pre = dict(tokenizer_dir=_tokenizer_dir(manifest))
    save_preprocessing(model, tmp, **pre)
    stage(3)
    diff = round_trip_check(objective.encoder(), tmp, masked_lm=masked_lm_of(objective),
                            causal_lm=causal_lm_of(objective), **pre)
    stage(4)
    facts = card_facts(run_dir, cfg, step=step, client=_client_state(folder), marker=marker,
                       model=model, manifest=manifest,
                       manifest_file=_manifest_file(cfg, manifest), round_trip_diff=diff,
                       repo_id=repo_id, load_id=load_id, published_class=type(model).__name__)
    (tmp / "README.md").write_text(render_card(facts, license))
    bar.advance(len(EXPORT_STAGES) - bar.done)
    return ExportResult(out=tmp, step=step, objective=cfg.objective.name,
                        published_class=type(model).__name__, num_params=facts["num_params"],
                        round_trip_diff=diff)


def _default_permissions(folder: Path) -> None:
    """Give ``mkdtemp``'s private (0700) folder and its files the user's umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _load_run_config(run_dir: Path):
    from sslscale.config import load_config

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a sslscale run directory)")
    return load_config(config_path)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
               repo_id: str | None = None, license: str = "apache-2.0",
               overwrite: bool = False) -> ExportResult:
    """Export the encoder of ``run_dir`` at ``step`` (default: latest complete checkpoint) to
    the folder ``out``, which appears only after the round-trip check passed.

    ``repo_id`` titles the card and names the model in its usage snippet and ``model-index``
    (default: the run's name titles it, and the snippet loads ``out``'s folder name).
    Raises ``FileNotFoundError`` (no run, no such checkpoint), ``FileExistsError`` (``out``
    exists and is not empty, without ``overwrite``), ``ConfigError`` (training shards missing),
    ``ExportError`` (empty / zero / misshapen weights, unsupported encoder, failed round trip).
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg = _load_run_config(run_dir)
    folder = _checkpoint_folder(run_dir, step)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    o, r = out.resolve(), run_dir.resolve()
    if o == r or o in r.parents or r in o.parents or o == Path.cwd().resolve():
        raise FileExistsError(f"--out {out} is, holds or lies inside the run directory {run_dir} or is "
                              "the current directory; export to a folder of its own")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with progress(f"export {folder.name}", len(EXPORT_STAGES), "stages") as bar:
            result = _write_folder(tmp, run_dir, cfg, folder, repo_id, repo_id or out.name, license, bar)
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.out = out
    return result


def _one_line(what: str, e: Exception) -> HubError:
    """``e`` from the hub client as one ``HubError`` line, the token scrubbed from it."""
    from huggingface_hub import get_token

    status = getattr(getattr(e, "response", None), "status_code", None)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    message = f"hub: {what} failed ({type(e).__name__}{f', HTTP {status}' if status else ''}): {lines[0]}"
    token = get_token()
    return HubError(message.replace(token, "<token>") if token else message)


def _hub_call(what: str, fn, *, timeout: float | None = None):
    """``fn()``, any failure of it turned into one ``HubError`` line. With ``timeout``, it runs
    in a daemon thread and no answer after ``timeout`` seconds is an error too (the thread is
    left to the interpreter's exit)."""
    from huggingface_hub import constants

    if timeout is None:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - hub, HTTP and network errors alike
            raise _one_line(what, e) from None
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below as one line
            box["error"] = e
    worker = threading.Thread(target=target, name="sslscale-hub-preflight", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise HubError(f"hub: {what}: no answer from {constants.ENDPOINT} within {timeout:g} s "
                       "(no network, a proxy or a firewall?)")
    if "error" in box:
        raise _one_line(what, box["error"]) from None
    return box.get("value")


def hub_preflight(repo_id: str) -> str:
    """Check, in seconds and before any export work, that a push to ``repo_id`` can start: a
    token exists, the hub answers ``whoami`` for it (``HF_ENDPOINT``) and it may write. Returns
    the user name. ``ExportError`` without a token; ``HubError`` (one line) when
    ``HF_HUB_OFFLINE`` is set, the hub is unreachable or silent for ``PREFLIGHT_TIMEOUT_S``,
    or refuses the token (401) or the token is read-only."""
    from huggingface_hub import HfApi, constants, get_token

    if get_token() is None:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if constants.is_offline_mode():
        raise HubError("hub: HF_HUB_OFFLINE=1 is set (the Makefile exports it), so the hub cannot "
                       f"be reached: push with HF_HUB_OFFLINE=0 sslscale push ... --repo-id {repo_id}")
    me = _hub_call(f"whoami at {constants.ENDPOINT}", HfApi().whoami, timeout=PREFLIGHT_TIMEOUT_S)
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"hub: the token of {me.get('name')} is read-only; pushing to {repo_id} needs a "
                       "write (or fine-grained, with write access) token")
    return str(me.get("name"))


def push_run(run_dir: str | os.PathLike, repo_id: str, *, step: int | None = None,
             private: bool = False, revision: str | None = None,
             license: str = "apache-2.0") -> dict[str, Any]:
    """Export ``run_dir`` (round-trip checked) and upload it to the hub repo ``repo_id``.

    Checks the run, its checkpoint and the hub first (``hub_preflight``: token, reachability,
    write role), so a push that cannot succeed fails in seconds, before the export. Creates
    the repo if needed (``exist_ok``; ``private`` applies to a new repo) and the branch
    ``revision`` if given. Returns ``{"repo_id", "revision", "step", "commit_url",
    "model_card", "wandb"}`` (``wandb``: True if the card's link was added to the run's wandb
    run, False if the run has none, else why it failed; the upload stands either way).
    Raises ``ExportError`` when no token is available (``HF_TOKEN`` or ``hf auth login``),
    ``HubError`` (one line) for every hub or network failure, besides ``export_run``'s errors.
    """
    from huggingface_hub import HfApi

    from sslscale.metrics import log_to_run

    run_dir = Path(run_dir)
    cfg = _load_run_config(run_dir)
    _checkpoint_folder(run_dir, step)
    hub_preflight(repo_id)
    with tempfile.TemporaryDirectory(prefix="sslscale-push-") as tmp:
        result = export_run(run_dir, Path(tmp) / "export", step=step, repo_id=repo_id,
                            license=license)
        api = HfApi()
        _hub_call(f"create_repo {repo_id}", lambda: api.create_repo(
            repo_id, repo_type="model", private=private, exist_ok=True))
        if revision:
            _hub_call(f"create_branch {revision}", lambda: api.create_branch(
                repo_id, branch=revision, repo_type="model", exist_ok=True))
        commit = _hub_call(f"upload_folder to {repo_id}", lambda: api.upload_folder(
            repo_id=repo_id, folder_path=str(result.out), repo_type="model", revision=revision,
            commit_message=f"sslscale: {result.objective} encoder at step {result.step} (run {cfg.name})",
            commit_description=(f"{result.published_class}, {result.num_params:,} parameters; round "
                                f"trip max |diff| {result.round_trip_diff:.2e}")))
    card = f"https://huggingface.co/{repo_id}/blob/{revision or 'main'}/README.md"
    try:  # the upload succeeded: a wandb problem (e.g. online without a login) must not hide that
        logged = log_to_run(run_dir, cfg.wandb, cfg.name, {"hub/model_card": card, "hub/repo_id": repo_id,
                                                           "hub/step": result.step,
                                                           "hub/commit": commit.commit_url})
    except Exception as e:  # wandb raises its own error types
        logged = f"not logged: {type(e).__name__}: {e}"
    return {"repo_id": repo_id, "revision": revision or "main", "step": result.step,
            "commit_url": commit.commit_url, "model_card": card, "wandb": logged}
