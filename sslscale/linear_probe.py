"""Linear probing: a linear classifier trained on the frozen encoder's features.

The protocol of MAE (He et al. 2022, arXiv 2111.06377, appendix A.2) and MoCo v3 (Chen et al.
2021, arXiv 2104.02057): the encoder's ``features`` (those kNN uses) are computed once, with no
augmentation, and a linear layer behind a BatchNorm without affine parameters (a
parameter-free standardization of each feature, which MAE shows the linear layer needs since
MAE features are not normalized) is trained on them with SGD + momentum, batch 256 by default,
the learning rate ``lr * batch_size / 256`` with a linear warm-up for a tenth of the epochs then
a cosine decay, no weight decay; top-1 of the test features. MAE uses LARS for its batch of
16,384; at these batch sizes plain SGD is the MoCo v3 choice.

Features are extracted on every rank (each its share of the samples, then gathered) and the
classifier is trained on the gathered features the same way on every rank, from a fixed seed,
so any number of ranks gives the result of one. ``probe_run`` caches the features of a
checkpoint under ``RUN_DIR/eval/`` (safetensors), so probing again with other settings does not
run the encoder again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslscale.config_schema import image_input

PROTOCOL = ("linear probe (MAE / MoCo v3): frozen un-augmented features, BatchNorm without "
            "affine + linear layer, SGD momentum 0.9, lr x batch/256 with 10% warm-up + cosine, "
            "no weight decay")


def _check(features: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if features.ndim != 2 or labels.shape != (len(features),) or len(features) == 0:
        raise ValueError(f"linear probe: {what} features must be (N, D) with N >= 1 and labels "
                         f"(N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"linear probe: {what} features are not all finite")
    if (labels < 0).any():
        raise ValueError(f"linear probe: {what} labels must be >= 0 (a sample without a label?)")


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                       test_features: torch.Tensor, test_labels: torch.Tensor, *,
                       epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                       momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Train BatchNorm1d(affine=False) + Linear on ``train_features`` ``(N, D)`` / labels ``(N,)``
    (int64, classes ``0..C-1``) and score ``test_features`` ``(M, D)`` / ``(M,)``.

    ``lr`` is the base learning rate per 256 samples. Deterministic for a given ``seed`` (its own
    generator; the global RNG is untouched), on CPU in float32. Returns ``{"linear_top1",
    "linear_train_top1"`` (fractions in [0, 1]), ``"epochs", "batch_size", "lr",
    "num_classes", "num_train", "num_test"}``. Raises ``ValueError`` for empty or misshapen
    inputs, non-finite features, negative labels or non-positive settings."""
    _check(train_features, train_labels, "train")
    _check(test_features, test_labels, "test")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"linear probe: epochs ({epochs}), batch_size ({batch_size}) and lr ({lr}) "
                         "must be positive")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"linear probe: train features have {train_features.shape[1]} dims, test "
                         f"features {test_features.shape[1]}")
    x, y = train_features.float().cpu(), train_labels.long().cpu()
    num_classes = int(max(y.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.utils.skip_init(nn.Linear, x.shape[1], num_classes)  # no global-RNG draw
    with torch.no_grad():  # MAE's head init: trunc_normal(std=0.01), zero bias
        head.weight.copy_(nn.init.trunc_normal_(torch.empty_like(head.weight), std=0.01,
                                                generator=generator))
        head.bias.zero_()
    model = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6), head)
    batch_size = min(batch_size, len(x))
    peak = lr * batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=momentum, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 10)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples; the epoch's last one is dropped
                continue
            optimizer.param_groups[0]["lr"] = peak * (
                (step + 1) / warmup if step < warmup
                else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    with torch.no_grad():
        train_top1 = (model(x).argmax(1) == y).float().mean().item()
        test_top1 = (model(test_features.float().cpu()).argmax(1) == test_labels.cpu()).float().mean().item()
    return {"linear_top1": test_top1, "linear_train_top1": train_top1, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "num_classes": num_classes,
            "num_train": len(x), "num_test": len(test_features)}


def features_of(objective, train_manifest, test_manifest, *, device, rank: int = 0,
                world_size: int = 1, image_size: int, num_channels: int, batch_size: int = 256,
                max_train_samples: int | None = None, max_test_samples: int | None = None,
                progress: str | None = None) -> dict[str, torch.Tensor]:
    """The frozen encoder's features and labels of both sets (collective when ``world_size >
    1``; every rank gets all): ``{"train_features" (N, D), "train_labels" (N,), "test_features"
    (M, D), "test_labels" (M,)}``, float32 / int64 on CPU. Errors as
    ``sslscale.evaluate.extract_features``."""
    from sslscale.evaluate import labeled_features

    (ftr, ytr), (fte, yte) = labeled_features(
        objective, train_manifest, test_manifest, device=device, rank=rank, world_size=world_size,
        batch_size=batch_size, image_size=image_size, num_channels=num_channels,
        max_train_samples=max_train_samples, max_test_samples=max_test_samples,
        progress=progress and (f"linear-probe train features ({progress})",
                               f"linear-probe test features ({progress})"))
    return {"train_features": ftr.float().contiguous(), "train_labels": ytr.long().contiguous(),
            "test_features": fte.float().contiguous(), "test_labels": yte.long().contiguous()}


def _cached_features(path: Path, key: dict[str, Any], compute) -> dict[str, torch.Tensor]:
    """``compute()``'s tensors, saved at ``path`` (safetensors, with ``key`` as metadata) and
    read back instead of recomputed while ``key`` (checkpoint, shards, limits) is unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    wanted = json.dumps(key, sort_keys=True)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == wanted:
                    return load_file(str(path))
        except Exception:  # unreadable (a crash mid-write): recompute
            pass
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"key": wanted})
    tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    return tensors


def probe_run(run_dir: str, *, step: int | None = None, train_shards: str | None = None,
              test_shards: str | None = None, baseline: bool = False,
              max_train_samples: int | None = None, max_test_samples: int | None = None,
              epochs: int = 100, batch_size: int = 256, lr: float = 0.1) -> dict[str, Any]:
    """Linear probe of a run's encoder (images, or text: MLM runs on ``data prepare text
    --labels`` shards) at ``step`` (default: the latest complete
    checkpoint) on labeled shards (default: the run's ``eval.train_shards`` /
    ``eval.test_shards`` and sample limits), in one process on CPU or the first GPU. Features
    are cached in ``linear-features-<step>.safetensors`` of ``results_dir`` (``RUN_DIR/eval``
    for the run's own shards, a sub-folder for others). With ``baseline``, also
    probes the same architecture at its random init (seeded like the run):
    ``random_init_linear_top1``. The result (see ``train_linear_probe``, plus ``step``, shards
    and ``protocol``) is also written there as ``linear-<step>.json``. Raises
    ``FileNotFoundError`` (no run or checkpoint), ``ConfigError`` (no eval shards),
    ``ValueError`` (shards of another modality than the run's, unlabeled shards)."""
    from sslscale import checkpoint
    from sslscale.evaluate import _device, _load_run, labeled_manifests, results_dir
    from sslscale.objectives import build_objective
    from sslscale.rng import seed_everything

    cfg, folder = _load_run(run_dir, step)
    train, test = labeled_manifests(cfg, train_shards, test_shards)
    step_done = checkpoint.step_of(folder)
    limits = dict(max_train_samples=max_train_samples or cfg.eval.max_train_samples,
                  max_test_samples=max_test_samples or cfg.eval.max_test_samples)
    device = _device()
    common = dict(device=device, **image_input(cfg), batch_size=cfg.eval.batch_size, **limits)
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    objective = build_objective(cfg)
    result: dict[str, Any] = {"run_dir": str(run_dir), "step": step_done}
    if baseline:
        features = features_of(objective.to(device), train, test, **common, progress="random init")
        result["random_init_linear_top1"] = train_linear_probe(**features, **settings)["linear_top1"]
    objective.load_state_dict(checkpoint.load_module_state(folder))
    eval_dir = results_dir(run_dir, cfg, train_shards, test_shards)
    tag = checkpoint.tag_for(step_done)
    key = {"checkpoint": folder.name, "train_shards": str(train.root), "test_shards": str(test.root),
           **limits}
    features = _cached_features(
        eval_dir / f"linear-features-{tag}.safetensors", key,
        lambda: features_of(objective.to(device), train, test, **common, progress=f"step {step_done}"))
    result.update(train_linear_probe(**features, **settings))
    result.update(train_shards=str(train.root), test_shards=str(test.root), protocol=PROTOCOL)
    (eval_dir / f"linear-{tag}.json").write_text(json.dumps(result) + "\n")
    return result
