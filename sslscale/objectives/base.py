"""The Objective protocol: what the trainer, evaluation and export may rely on.

An objective is an ``nn.Module`` that turns a batch (dict of tensors with transformers' key
names) into a scalar loss. It owns its model, its on-device augmentation and its loss; it has
no optimizer logic. ``encoder()`` returns the transformers model that export publishes, and
``features()`` the frozen representation used by kNN evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """``loss``: scalar tensor (the one that is back-propagated); ``metrics``: detached scalars
    logged as ``train/<name>`` (e.g. ``{"recon_loss": ...}`` becomes ``train/recon_loss``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """Protocol every objective module follows (see ``sslscale/objectives/mae.py``)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput: ...

    def encoder(self) -> nn.Module:
        """The transformers encoder (no heads) that export publishes."""
        ...

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, D)`` features of un-augmented inputs, for kNN / linear-probe evaluation."""
        ...
