"""Held-out evaluation of causal language models (``clm``): perplexity and next-token accuracy
beside a unigram baseline.

Every held-out block ``(L,)`` scores its ``L - 1`` next-token predictions (positions ``1 ..
L-1`` from their prefixes), the same targets as the training loss; perplexity is ``exp`` of the
mean cross-entropy in nats (GPT-2's per-token perplexity on its own tokenization, so it compares
only between runs sharing a tokenizer). The baseline is the **held-out set's own unigram
distribution** over those same targets: its perplexity ``exp(H(p))`` is the lowest any
context-free predictor reaches on these tokens (a training-set unigram can only do worse), and
its accuracy is that of always predicting the most frequent target token, the best any constant
guess does (as ``eval/mlm_baseline_accuracy``). Both are optimistic baselines, so a model that
beats them has learned from context. Used by ``sslscale eval lm`` and by training's periodic
evaluation (``train.make_evaluator``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from sslscale.data.shards import Manifest
from sslscale.data.stream import eval_batches
from sslscale.evaluate import _eval_total, evaluate_text_run
from sslscale.log import progress as show_progress
from sslscale.objectives.clm import IGNORE


def unigram_baseline(counts: torch.Tensor) -> tuple[float, float]:
    """``(perplexity, accuracy)`` of the unigram distribution ``p = counts / N`` scored on the
    ``N`` tokens it was counted from: ``exp(-sum_v p_v log p_v)`` and ``max_v p_v``. ``counts``:
    ``(V,)`` occurrences per token id. ``ValueError`` when it counts no token."""
    counts = counts.double().cpu()
    n = counts.sum().item()
    if n <= 0:
        raise ValueError("unigram_baseline: no tokens counted")
    p = counts[counts > 0] / n
    return math.exp(-(p * p.log()).sum().item()), counts.max().item() / n


@torch.no_grad()
def clm_eval(objective, manifest: Manifest, decode, *, device, rank: int = 0, world_size: int = 1,
             batch_size: int = 64, limit: int | None = None, progress: str | None = None) -> dict[str, Any]:
    """Next-token perplexity and accuracy of a ``clm`` objective (``next_token_logits``) on the
    (first ``limit``) blocks of held-out text ``manifest``, decoded by ``decode``, beside the
    unigram baseline (module docstring). Collective when ``world_size > 1`` (rank ``r`` takes
    blocks ``r, r+W, ...``; a rank out of blocks forwards a dummy so ZeRO-3's collectives match).
    ``progress``: the label of rank 0's progress display (None: silent). ``ValueError`` if some
    rank would get no block.

    Returns ``{"clm_perplexity", "clm_accuracy", "unigram_perplexity", "unigram_accuracy",
    "num_predicted_tokens"}``.
    """
    total = _eval_total(manifest, limit, world_size)
    per_rank_max = math.ceil(total / world_size)
    was_training = objective.training
    objective.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # cross-entropy, correct, count
    counts = None
    batches = eval_batches(manifest, rank=rank, world_size=world_size, batch_size=batch_size,
                           decode=decode, limit=total)
    dummy = None
    with show_progress(progress or "", per_rank_max, "blocks", enabled=bool(progress) and rank == 0) as bar:
        for _ in range(math.ceil(per_rank_max / batch_size)):
            batch = next(batches, None)
            if batch is None:  # this rank ran out: a dummy forward keeps ZeRO-3's collectives matched
                objective.next_token_logits(dummy)
                continue
            inputs = {k: v.to(device) for k, v in batch.items() if k != "sample_seeds"}
            dummy = {k: v[:1] for k, v in inputs.items()}
            logits, targets = objective.next_token_logits(inputs)
            logits, targets = logits.flatten(0, 1), targets.flatten()
            real = targets != IGNORE  # padded targets count nowhere
            sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE).double(),
                                 (logits.argmax(-1) == targets).sum().double(), real.sum().double()])
            hist = torch.bincount(targets.clamp(min=0), weights=real.double(), minlength=logits.shape[-1])
            counts = hist if counts is None else counts + hist
            bar.advance(len(batch["input_ids"]))
    objective.train(was_training)
    if world_size > 1:  # every rank read >= 1 batch (_eval_total), so counts has the vocabulary size
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    unigram_ppl, unigram_acc = unigram_baseline(counts)
    n = sums[2].item()
    return {"clm_perplexity": math.exp(sums[0].item() / n), "clm_accuracy": sums[1].item() / n,
            "unigram_perplexity": unigram_ppl, "unigram_accuracy": unigram_acc,
            "num_predicted_tokens": int(n)}


def evaluate_lm_run(run_dir: str, *, step: int | None = None, test_shards: str | None = None,
                    max_test_samples: int | None = None) -> dict[str, Any]:
    """``clm_eval`` of a ``clm`` run's model at ``step`` (default: latest complete checkpoint) on
    its held-out text shards (``eval.test_shards`` unless given), in one process on CPU or the
    first GPU. Raises ``FileNotFoundError`` for a run dir without config or checkpoint,
    ``ValueError`` for a run of another objective (naming the evaluation that fits it) or
    shards that are not text, ``ConfigError`` when no held-out shards are set."""
    return evaluate_text_run(run_dir, clm_eval, kind="clm", label="LM", step=step,
                             test_shards=test_shards, max_test_samples=max_test_samples)
