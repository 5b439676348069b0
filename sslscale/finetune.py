"""Fine-tuning evaluation: the ``classify`` objective's held-out top-1 (inside training and
after it), and ``sslscale eval finetune``: fine-tune a pretraining run's encoder on labeled
shards beside the same architecture trained from scratch at the same budget.

Both runs are ordinary ``sslscale train`` runs (``sslscale.objectives.classify``), on as many
local ranks as asked, with the same data order, steps and recipe (the pretraining run's ``model``
and ``data`` sections; AdamW, warm-up a tenth of the steps then cosine; images: MAE's fine-tuning
settings scaled to a few epochs of a small ViT: lr ``2e-3``, ``optim.layer_decay`` 0.9, weight
decay 0.05, no label smoothing, no drop path, mean pooling behind a LayerNorm, crops of >= 90% and flips;
text: BERT's / ELECTRA's, lr ``2e-4``, layer decay 0.8, weight decay 0.01, no label smoothing,
the ``[CLS]`` token) in ``RUN_DIR/finetune/`` and
``RUN_DIR/finetune-scratch/``; they resume like any run when interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sslscale.dist import gathered


@torch.no_grad()
def classify_eval(objective, manifest, *, device, rank: int = 0, world_size: int = 1,
                  image_size: int, num_channels: int, batch_size: int = 256,
                  limit: int | None = None, progress: str | None = None) -> dict[str, Any]:
    """Top-1 (fraction in [0, 1]) of a ``ClassifyObjective``'s head on ``manifest``'s labeled
    images (un-augmented) or text (collective when ``world_size > 1``; ZeRO-3 partitions of the head are
    gathered). Returns ``{"top1", "num_test", "majority_top1"}`` (the last: always answering
    the most frequent test label). Errors as ``extract_features`` (unlabeled
    samples: ``ValueError``)."""
    from sslscale.evaluate import extract_features

    features, labels = extract_features(objective, manifest, device=device, rank=rank,
                                        world_size=world_size, batch_size=batch_size,
                                        image_size=image_size, num_channels=num_channels,
                                        limit=limit, progress=progress)
    head = list(objective.head.parameters()) + list(objective.fc_norm.parameters())
    with gathered(head):
        weight, bias = (p.detach().float().cpu().clone() for p in objective.head.parameters())
        norm = [p.detach().float().cpu().clone() for p in objective.fc_norm.parameters()]
    if norm:  # mean pooling: the LayerNorm before the head
        features = F.layer_norm(features, features.shape[1:], *norm, eps=objective.fc_norm.eps)
    predictions = F.linear(features, weight, bias).argmax(1)
    return {"top1": (predictions == labels).float().mean().item(), "num_test": len(labels),
            "majority_top1": torch.bincount(labels).max().item() / len(labels)}


# The fine-tuning recipe by modality: MAE's (images), BERT's / ELECTRA's (text). Images: crops
# of >= 90% of the image, not the pretraining recipe's (MAE's fine-tuning crops from 8% over 100
# epochs; at this command's budget of a few epochs, Fashion-MNIST's MAE demo encoder measured
# 0.827 top-1 with crops from 35% and 0.863 from 80%, 1,000 steps x 256), and a higher lr with a
# weaker layer decay than MAE's 1e-3 / 0.75 (ViT-B, 100 epochs): with 0.75, the embeddings of a
# 4-block ViT learn at 0.24x the lr and the run underfits (training top-1 0.86 at its end). With
# label smoothing 0.1 and crops from 80%, 2,000 steps gave 0.874 top-1 (0.859 from scratch) and
# still underfit (training top-1 0.88); without label smoothing and with crops from 90%, 1,000
# steps give 0.877 (0.848 from scratch; 0.863 with 500 steps), training top-1 0.88; 2,000 steps
# give 0.888 (0.871 from scratch), training top-1 0.90; 4,000 give 0.8997; 5,000 (the command's
# default, ~21 epochs) give 0.904.
RECIPES = {"image": {"objective.pooling": "mean", "objective.label_smoothing": 0.0, "optim.lr": 2e-3,
                     "optim.layer_decay": 0.9, "optim.weight_decay": 0.05,
                     "objective.crop_scale": "[0.9,1.0]"},
           "text": {"objective.pooling": "cls", "objective.label_smoothing": 0.0, "optim.lr": 2e-4,
                    "optim.layer_decay": 0.8, "optim.weight_decay": 0.01}}


def finetune_overrides(cfg, folder: Path | None, *, run_dir: Path, train_shards: str,
                       test_shards: str, steps: int, modality: str = "image") -> list[str]:
    """The ``classify`` run's overrides on top of the pretraining run's config: its encoder from
    checkpoint ``folder`` (None: from scratch), the labeled shards, the fine-tuning recipe of
    ``modality`` (``RECIPES``)."""
    return [
        "objective.name=classify", "objective.num_classes=0",
        *(f"{key}={value}" for key, value in RECIPES[modality].items()),
        f"data.train_shards={train_shards}",
        "eval.train_shards=null", f"eval.test_shards={test_shards}", "eval.every_steps=0",
        f"run_dir={run_dir}", "resume=auto", f"train.max_steps={steps}",
        f"train.init_from={folder if folder is not None else 'null'}",
        "optim.min_lr=1e-6", f"optim.warmup_steps={max(1, steps // 10)}",
        "optim.weight_decay_end=null", "optim.betas=[0.9,0.999]",
        f"checkpoint.every_steps={max(1, steps // 4)}", "checkpoint.keep_last=1",
        f"name={cfg.name}-finetune",
    ]


def _top1_of(run_dir: Path) -> dict[str, Any]:
    """The last held-out evaluation a finished classify run wrote (``eval/classify-*.json``)."""
    found = sorted((run_dir / "eval").glob("classify-*.json"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: the fine-tuning run wrote no evaluation")
    return json.loads(found[-1].read_text())


def finetune_run(run_dir: str, *, train_shards: str, test_shards: str, steps: int,
                 step: int | None = None, nproc: int = 1, from_scratch_only: bool = False,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune the encoder of ``run_dir`` (checkpoint ``step``, default the latest complete)
    for ``steps`` optimizer steps on ``train_shards`` (labeled images, or labeled text for an
    MLM run) and train the same
    architecture from scratch with the same recipe and data; both scored on ``test_shards``.
    ``nproc`` local ranks each; ``overrides``: more ``key=value`` for both runs. Returns
    ``{"finetune_top1", "scratch_top1", "steps", ...}`` (only ``scratch_top1`` with
    ``from_scratch_only``) and writes it to ``RUN_DIR/eval/finetune-<step>.json``. Raises
    ``FileNotFoundError`` (no run or checkpoint), ``ValueError`` (a run whose model cannot
    classify, e.g. a CLM's GPT-2, or shards of another modality than the run's), ``RuntimeError``
    naming the run that failed (its own error lines are on stderr)."""
    from launcher.local import launch
    from sslscale.checkpoint import step_of, tag_for
    from sslscale.config_schema import OBJECTIVE_MODELS
    from sslscale.evaluate import _load_run, labeled_manifests, run_modality

    cfg, folder = _load_run(run_dir, step, models=OBJECTIVE_MODELS["classify"])
    labeled_manifests(cfg, train_shards, test_shards)  # the run's modality, before two runs fail
    modality = run_modality(cfg)
    config = str(Path(run_dir) / "config.yaml")
    runs = {"scratch": (Path(run_dir) / "finetune-scratch", None)}
    if not from_scratch_only:
        runs = {"finetune": (Path(run_dir) / "finetune", folder), **runs}
    result: dict[str, Any] = {"run_dir": str(run_dir), "step": step_of(folder), "steps": steps,
                              "train_shards": train_shards, "test_shards": test_shards}
    for kind, (out, init) in runs.items():
        args = finetune_overrides(cfg, init, run_dir=out, train_shards=train_shards,
                                  test_shards=test_shards, steps=steps, modality=modality) + list(overrides)
        code = launch(nproc, config, args)
        if code:
            raise RuntimeError(f"the {kind} run in {out} ended with exit code {code}")
        scored = _top1_of(out)
        result[f"{kind}_top1"] = scored["top1"]
        result["num_test"] = scored["num_test"]
        result[f"{kind}_run_dir"] = str(out)
    saved = Path(run_dir) / "eval" / f"finetune-{tag_for(result['step'])}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    if from_scratch_only and saved.is_file():  # keep the fine-tuned result of an earlier call
        earlier = json.loads(saved.read_text())
        if earlier.get("steps") == steps and earlier.get("test_shards") == test_shards:
            result = {**earlier, **result}
    saved.write_text(json.dumps(result) + "\n")
    return result
