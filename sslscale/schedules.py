"""Hyper-parameter schedules as pure functions of the optimizer step.

Nothing here keeps state: resuming at step ``s`` gives exactly the values of an uninterrupted
run. Learning rate: linear warmup from 0 then half-cosine decay to ``min_lr``
(Loshchilov & Hutter, SGDR, arXiv 1608.03983; as in MAE and DINO). Weight decay and EMA
momentum: half-cosine from a start to an end value (as in DINO, arXiv 2104.14294).
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (held after)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based, the step about to be taken).

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first step
    already moves the weights; then cosine from ``lr`` to ``min_lr`` over the remaining steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, max_steps - warmup_steps, lr, min_lr)


def weight_decay_at(step: int, *, weight_decay: float, max_steps: int, weight_decay_end: float | None = None) -> float:
    """Weight decay for ``step``: constant, or cosine to ``weight_decay_end`` when given."""
    if weight_decay_end is None:
        return weight_decay
    return cosine(step, max_steps, weight_decay, weight_decay_end)
