"""Checkpoint files are data, never code: every ``torch.load`` while sslscale reads a checkpoint
is a ``weights_only`` load.

DeepSpeed 0.19 unpickles its own files with ``torch.load(..., weights_only=False)`` (engine
resume, universal conversion, ``zero_to_fp32``), so a crafted ``*_optim_states.pt`` in a copied
run dir would run arbitrary code in ``resume``, ``export``, ``eval`` or ``train.init_from``.
Inside :func:`weights_only_loads` every ``torch.load`` (DeepSpeed's included, and those of the
processes it forks) is forced to ``weights_only=True``, with an allow-list of the few DeepSpeed
types its checkpoints hold (:data:`DEEPSPEED_TYPES`, found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints). Anything else
in a pickle fails the load with :class:`UnsafeCheckpointError` naming the file and the type,
before that type's code could run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
from typing import Iterator

import torch

DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds something other than tensors, containers and the allowed types."""


def _allowed() -> list:
    out = []
    for dotted in DEEPSPEED_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: its files cannot hold that type either
    return out


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """A context in which every ``torch.load`` is ``weights_only=True`` with the allow-list;
    ``UnsafeCheckpointError`` names the file of a pickle that needs anything else. Not
    re-entrant across threads (it swaps ``torch.load`` for the process)."""
    real = torch.load
    allowed = _allowed()

    @functools.wraps(real)
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)
            raise UnsafeCheckpointError(
                f"refusing to load {name}: it holds a pickled object that is not a tensor, a "
                f"container or an allowed DeepSpeed type, so loading it could run code "
                f"({str(e).splitlines()[0]})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
