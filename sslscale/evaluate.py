"""Evaluation of frozen encoders: weighted kNN classification on labeled shards (images), and
held-out masked-token accuracy / perplexity (text; causal LMs: ``sslscale.evaluate_lm``).

The kNN protocol follows Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc, CVPR 2018) as used by DINO (Caron et al. 2021,
``eval_knn.py``): L2-normalized features, cosine similarity, the ``k`` nearest training
features vote for their class with weight ``exp(similarity / temperature)``; top-1 accuracy.
Feature extraction runs on every rank (each takes every W-th sample, all ranks doing the same
number of forwards so ZeRO-3 never waits) and the features are gathered. With ``progress`` (a
label), rank 0 shows its progress (``sslscale.log.progress``: a bar on a terminal, a line every
few seconds otherwise); ``sslscale eval`` does, the evaluation inside training does not (the
training bar owns the terminal, and the trainer reports the time an evaluation took).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sslscale.config_schema import image_input
from sslscale.data.shards import Manifest
from sslscale.data.stream import ImageDecoder, eval_batches
from sslscale.log import get_logger, progress as show_progress


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, *, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class ``(M,)`` for ``test_features`` ``(M, D)`` from ``train_features``
    ``(N, D)`` with labels ``(N,)`` in ``[0, num_classes)``. ``ValueError`` on empty inputs."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("kNN needs at least one train and one test feature")
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    preds = []
    for start in range(0, len(test_features), chunk_size):
        queries = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        sims, idx = (queries @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(queries), num_classes).scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_features, train_labels, test_features, test_labels, *, k: int = 20,
             temperature: float = 0.07) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``knn_predict`` against ``test_labels``."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, test_features, num_classes=num_classes,
                        k=k, temperature=temperature)
    return (preds == test_labels).float().mean().item()


def _gather(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate per-rank rows back into manifest order (rank r holds rows r, r+W, ...)."""
    if world_size == 1:
        return local
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, local.cpu())
    total = sum(len(p) for p in parts)
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r::world_size] = part
    return out


def _eval_total(manifest: Manifest, limit: int | None, world_size: int) -> int:
    """Samples to evaluate; ``ValueError`` if some rank would get none (its collectives would
    find no partner)."""
    total = manifest.num_samples if limit is None else min(limit, manifest.num_samples)
    if total < world_size:
        raise ValueError(f"{manifest.root}: {total} evaluation sample(s) for {world_size} ranks; "
                         "every rank needs at least one")
    return total


@torch.no_grad()
def labeled_decoder(manifest: Manifest, image_size: int, num_channels: int):
    """The decoder of labeled evaluation samples: ``LabeledTextDecoder`` for text shards
    (``data prepare text --labels``), ``AudioDecoder`` for audio (whole clips up to the longest,
    center-cropped past it, no masks), else ``ImageDecoder`` with the manifest's image / label keys."""
    if manifest.modality == "audio":
        from sslscale.data.audio import AudioDecoder

        return AudioDecoder.for_manifest(manifest, crop="center")
    if manifest.modality == "text":
        from sslscale.data.text import LabeledTextDecoder

        return LabeledTextDecoder.for_manifest(manifest)
    return ImageDecoder.for_manifest(manifest, image_size, num_channels)


@torch.no_grad()
def extract_features(objective, manifest: Manifest, *, device, rank: int = 0, world_size: int = 1,
                     batch_size: int = 256, image_size: int, num_channels: int,
                     limit: int | None = None, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``objective.features`` of the (first ``limit``) samples of ``manifest``: ``(N, D)`` float
    features and ``(N,)`` labels, on CPU, on every rank. ``ValueError`` if samples are unlabeled.
    ``progress``: the label of rank 0's progress display (None: silent)."""
    total = _eval_total(manifest, limit, world_size)
    per_rank_max = math.ceil(total / world_size)
    steps = math.ceil(per_rank_max / batch_size)
    was_training = objective.training
    objective.eval()
    feats, labels = [], []
    batches = eval_batches(manifest, rank=rank, world_size=world_size, batch_size=batch_size,
                           decode=labeled_decoder(manifest, image_size, num_channels), limit=total)
    dummy = None  # a rank that runs out forwards one sample again so collective ZeRO-3 ops match
    unit = {"text": "paragraphs", "audio": "clips"}.get(manifest.modality, "images")
    with show_progress(progress or "", per_rank_max, unit, enabled=bool(progress) and rank == 0) as bar:
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:
                if dummy is not None:
                    objective.features(dummy)
                continue
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "sample_seeds")}
            dummy = {k: v[:1] for k, v in inputs.items()}
            feats.append(objective.features(inputs).cpu())
            labels.append(batch["labels"])
            bar.advance(len(batch["labels"]))
    objective.train(was_training)
    f = torch.cat(feats) if feats else torch.empty(0, 0)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    f, y = _gather(f, rank, world_size), _gather(y, rank, world_size)
    if (y < 0).any():
        raise ValueError(f"{manifest.root}: some samples have no 'cls' label; kNN needs labeled shards")
    return f, y


def labeled_features(objective, train_manifest: Manifest, test_manifest: Manifest, *,
                     max_train_samples: int | None = None, max_test_samples: int | None = None,
                     progress: tuple[str, str] | None = None, **common):
    """``((train_features, train_labels), (test_features, test_labels))``: ``extract_features``
    of both sets (``common``: its device, rank, world size, batch and image sizes); ``progress``:
    the two progress labels, or None (silent)."""
    train = extract_features(objective, train_manifest, limit=max_train_samples, **common,
                             progress=progress and progress[0])
    test = extract_features(objective, test_manifest, limit=max_test_samples, **common,
                            progress=progress and progress[1])
    return train, test


def knn_eval(objective, train_manifest: Manifest, test_manifest: Manifest, *, device, rank: int = 0,
             world_size: int = 1, image_size: int, num_channels: int, k: int = 20,
             temperature: float = 0.07, batch_size: int = 256, max_train_samples: int | None = None,
             max_test_samples: int | None = None, progress: str | None = None) -> dict[str, float]:
    """kNN top-1 of ``objective.features`` (collective when ``world_size > 1``). ``progress``:
    a label (e.g. ``"step 400"``) to show rank 0's feature extraction as ``kNN bank (label)``
    and ``kNN queries (label)``; None: silent.

    Returns ``{"knn_top1": ..., "num_train": N, "num_test": M, "k": k}``.
    """
    (ftr, ytr), (fte, yte) = labeled_features(
        objective, train_manifest, test_manifest, device=device, rank=rank, world_size=world_size,
        batch_size=batch_size, image_size=image_size, num_channels=num_channels,
        max_train_samples=max_train_samples, max_test_samples=max_test_samples,
        progress=progress and (f"kNN bank ({progress})", f"kNN queries ({progress})"))
    top1 = knn_top1(ftr, ytr, fte, yte, k=k, temperature=temperature)
    return {"knn_top1": top1, "num_train": len(ftr), "num_test": len(fte), "k": k}


@torch.no_grad()
def mlm_eval(objective, manifest: Manifest, decode, *, device, rank: int = 0, world_size: int = 1,
             batch_size: int = 64, limit: int | None = None, progress: str | None = None) -> dict[str, float]:
    """Masked-token accuracy and perplexity of an MLM objective on held-out text shards
    (collective when ``world_size > 1``). Masks are drawn per sample from its index, so every
    evaluation (and every run) scores the same positions. ``progress``: the label of rank 0's
    progress display (None: silent).

    Returns ``{"mlm_accuracy", "mlm_perplexity" (exp of the mean cross-entropy),
    "mlm_baseline_accuracy" (always predicting the held-out set's most frequent masked token: the
    best any constant guess can do), "num_masked_tokens"}``.
    """
    total = _eval_total(manifest, limit, world_size)
    steps = math.ceil(math.ceil(total / world_size) / batch_size)
    was_training = objective.training
    objective.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # cross-entropy sum, correct, count
    counts = None
    batches = eval_batches(manifest, rank=rank, world_size=world_size, batch_size=batch_size,
                           decode=decode, limit=total)
    dummy = None
    per_rank_max = math.ceil(total / world_size)
    with show_progress(progress or "", per_rank_max, "blocks", enabled=bool(progress) and rank == 0) as bar:
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:  # this rank ran out: a dummy forward keeps ZeRO-3's collectives matched
                objective.predict_masked({k: v.to(device) for k, v in dummy.items()})
                continue
            dummy = {k: v[:1] for k, v in batch.items()}
            logits, targets = objective.predict_masked({k: v.to(device) for k, v in batch.items()})
            targets = targets.to(logits.device)
            sums += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(),
                                  (logits.argmax(-1) == targets).sum().item(), len(targets)], dtype=torch.float64)
            hist = torch.bincount(targets.cpu(), minlength=logits.shape[-1]).double()
            counts = hist if counts is None else counts + hist
            bar.advance(len(next(iter(batch.values()))))
    objective.train(was_training)
    if counts is None:
        counts = torch.zeros(1, dtype=torch.float64)
    if world_size > 1:  # on the device: NCCL reduces only CUDA tensors
        sums, counts = sums.to(device), counts.to(device)
        torch.distributed.all_reduce(sums)
        size = torch.tensor([len(counts)], device=device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        counts = F.pad(counts, (0, int(size.item()) - len(counts)))
        torch.distributed.all_reduce(counts)
    n = max(sums[2].item(), 1.0)
    return {"mlm_accuracy": sums[1].item() / n, "mlm_perplexity": math.exp(sums[0].item() / n),
            "mlm_baseline_accuracy": counts.max().item() / n, "num_masked_tokens": int(sums[2].item())}


def run_modality(cfg) -> str:
    """``text`` for runs of a BERT (MLM, fine-tuning on text) or a GPT-2 (CLM), ``audio`` for a
    wav2vec 2.0's, ``image`` for a ViT's."""
    return {"bert": "text", "gpt2": "text", "wav2vec2": "audio"}.get(cfg.model.name, "image")


def labeled_manifests(cfg, train_shards: str | None, test_shards: str | None) -> tuple[Manifest, Manifest]:
    """The labeled train / test manifests of a frozen-encoder evaluation (the run's
    ``eval.train_shards`` / ``eval.test_shards`` unless given). ``ConfigError`` when one is
    unset, ``ValueError`` when they hold another modality than the run's encoder reads."""
    from sslscale.data.shards import load_manifest_for

    modality = run_modality(cfg)
    manifests = (load_manifest_for("eval.train_shards", train_shards or cfg.eval.train_shards),
                 load_manifest_for("eval.test_shards", test_shards or cfg.eval.test_shards))
    for key, manifest in zip(("eval.train_shards", "eval.test_shards"), manifests):
        if manifest.modality != modality:
            hint = (" (labeled text: `sslscale data prepare text --labels section --tokenizer "
                    "THE_RUN'S_DATA/train/tokenizer`)" if modality == "text" else "")
            raise ValueError(f"{key} = {manifest.root} holds {manifest.modality} shards; the run's "
                             f"encoder reads {modality}{hint}")
    return manifests


def results_dir(run_dir: str, cfg, train_shards: str | None, test_shards: str | None) -> Path:
    """Where an evaluation on ``train_shards`` / ``test_shards`` (None: the run's own) keeps its
    result: ``RUN_DIR/eval``, which the model card quotes, for the run's own labeled shards
    (``eval.train_shards`` / ``eval.test_shards``, or any where the config names none); for
    other shards ``RUN_DIR/eval/shards-<hash of both>/``, so that a probe on other data never
    replaces the card's numbers (the result's JSON names its shards)."""
    import hashlib

    own = all(given is None or configured is None or str(given) == str(configured)
              for given, configured in ((train_shards, cfg.eval.train_shards), (test_shards, cfg.eval.test_shards)))
    folder = Path(run_dir) / "eval"
    if own:
        return folder
    return folder / f"shards-{hashlib.sha1(f'{train_shards}|{test_shards}'.encode()).hexdigest()[:8]}"


def _check_shards(manifest: Manifest, key: str, modality: str) -> None:
    """``ValueError`` if ``manifest`` (given as ``key``) holds another modality than ``modality``."""
    if manifest.modality != modality:
        raise ValueError(f"{key} = {manifest.root} holds {manifest.modality} shards; this "
                         f"evaluation needs {modality} shards")


# The held-out language-model evaluation of each text objective: its objective -> CLI command.
_LM_EVALS = {"mlm": "sslscale eval mlm", "clm": "sslscale eval lm"}


def _load_run(run_dir: str, step: int | None, kind: str | None = None,
              models: tuple[str, ...] | None = None):
    """``(cfg, checkpoint folder)`` of a run; ``FileNotFoundError`` without config or checkpoint.
    ``kind`` (``mlm``: masked-token evaluation, ``clm``: next-token evaluation) must be the
    run's objective, else ``ValueError`` naming the evaluation that fits the run (``eval lm`` /
    ``eval mlm`` for the other language model, ``eval knn`` / ``eval linear`` otherwise);
    ``models`` (fine-tuning: ``vit`` / ``bert``), when given, must hold the run's ``model.name``,
    else the same ``ValueError``."""
    from sslscale import checkpoint
    from sslscale.config import load_config

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a sslscale run directory)")
    cfg = load_config(config_path)
    fits = (f"`{_LM_EVALS[cfg.objective.name]} {run_dir}`" if cfg.objective.name in _LM_EVALS
            else f"`sslscale eval knn {run_dir}` or `sslscale eval linear {run_dir}`")
    if kind is not None and cfg.objective.name != kind:
        raise ValueError(f"{run_dir} is not a{'n MLM' if kind == 'mlm' else ' CLM'} run (objective "
                         f"{cfg.objective.name}); use {fits}")
    if models is not None and cfg.model.name not in models:
        raise ValueError(f"{run_dir}: fine-tuning takes a {' / '.join(models)} encoder, not this run's "
                         f"{cfg.model.name} (objective {cfg.objective.name}); use {fits}")
    folder = (checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(step) if step is not None
              else checkpoint.find_latest(run_dir))
    if folder is None or not checkpoint.is_complete(folder):
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint"
                                + (f" for step {step}" if step is not None else ""))
    return cfg, folder


def _warn_shapes(cfg, manifests: dict[str, Manifest]) -> None:
    """Log a warning per manifest whose recorded images differ from the model's input."""
    from sslscale.data.shards import image_shape_warning

    if cfg.model.name != "vit":
        return
    for key, manifest in manifests.items():
        line = image_shape_warning(manifest, key, num_channels=cfg.model.num_channels,
                                   image_size=cfg.model.image_size)
        if line:
            get_logger().warning(line)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_run(run_dir: str, *, step: int | None = None, train_shards: str | None = None,
                 test_shards: str | None = None, baseline: bool = False,
                 max_train_samples: int | None = None, max_test_samples: int | None = None,
                 k: int | None = None) -> dict[str, Any]:
    """kNN top-1 of a run's encoder at ``step`` (default: latest complete checkpoint), in one
    process on CPU or the first GPU, on labeled images, or labeled text for MLM runs
    (``labeled_manifests``). Shards and sample limits default to the run's ``eval`` config. With
    ``baseline``, also scores the same architecture at its random init (seeded like the run) as
    ``random_init_knn_top1``, and keeps the result as ``knn-vs-random-init-<step>.json`` in
    ``results_dir`` (the model card quotes it). Raises ``FileNotFoundError`` for a run dir
    without config or checkpoint, ``ConfigError`` for missing eval shards, ``ValueError`` for
    shards of another modality than the run's.
    """
    from sslscale import checkpoint
    from sslscale.objectives import build_objective
    from sslscale.rng import seed_everything

    cfg, folder = _load_run(run_dir, step)
    bank, queries = labeled_manifests(cfg, train_shards, test_shards)
    _warn_shapes(cfg, {"eval.train_shards": bank, "eval.test_shards": queries})
    device = _device()
    common = dict(device=device, **image_input(cfg),
                  k=k or cfg.eval.k, temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                  max_train_samples=max_train_samples or cfg.eval.max_train_samples,
                  max_test_samples=max_test_samples or cfg.eval.max_test_samples)
    seed_everything(cfg.train.seed)
    objective = build_objective(cfg)
    result: dict[str, Any] = {"run_dir": str(run_dir), "step": int(folder.name.split("-")[1])}
    if baseline:
        result["random_init_knn_top1"] = knn_eval(objective.to(device), bank, queries, **common,
                                                  progress="random init")["knn_top1"]
    objective.load_state_dict(checkpoint.load_module_state(folder))
    result.update(knn_eval(objective.to(device), bank, queries, **common, progress=f"step {result['step']}"))
    result.update(train_shards=bank.root, test_shards=queries.root)
    if baseline:
        kept = results_dir(run_dir, cfg, train_shards, test_shards) / f"knn-vs-random-init-{folder.name}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(result) + "\n")
    return result


def evaluate_text_run(run_dir: str, scorer, *, kind: str, label: str, step: int | None = None,
                      test_shards: str | None = None, max_test_samples: int | None = None) -> dict[str, Any]:
    """``scorer`` (``mlm_eval`` or ``evaluate_lm.clm_eval``) of a ``kind`` run's model at ``step``
    (default: latest complete checkpoint) on its held-out text shards (``eval.test_shards`` unless
    given), in one process on CPU or the first GPU; ``label`` names it in the progress display.
    Raises ``FileNotFoundError`` for a run dir without config or checkpoint, ``ValueError`` for a
    run of another objective (naming the evaluation that fits it) or shards that are not text."""
    from sslscale import checkpoint
    from sslscale.data.shards import load_manifest_for
    from sslscale.data.stream import decoder_for
    from sslscale.objectives import build_objective

    cfg, folder = _load_run(run_dir, step, kind=kind)
    held_out = load_manifest_for("eval.test_shards", test_shards or cfg.eval.test_shards)
    _check_shards(held_out, "eval.test_shards", "text")
    objective = build_objective(cfg)
    objective.load_state_dict(checkpoint.load_module_state(folder))
    result: dict[str, Any] = {"run_dir": str(run_dir), "step": int(folder.name.split("-")[1])}
    result.update(scorer(objective.to(_device()), held_out, decoder_for(cfg, held_out),
                         device=_device(), batch_size=cfg.eval.batch_size,
                         limit=max_test_samples or cfg.eval.max_test_samples,
                         progress=f"held-out {label} (step {result['step']})"))
    result["test_shards"] = held_out.root
    return result


def evaluate_mlm_run(run_dir: str, *, step: int | None = None, test_shards: str | None = None,
                     max_test_samples: int | None = None) -> dict[str, Any]:
    """``mlm_eval`` of an MLM run (:func:`evaluate_text_run`, same errors)."""
    return evaluate_text_run(run_dir, mlm_eval, kind="mlm", label="MLM", step=step,
                             test_shards=test_shards, max_test_samples=max_test_samples)
