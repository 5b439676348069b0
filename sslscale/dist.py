"""Process-group helpers shared by the trainer, checkpoints, losses and objectives: this
process's rank and world size, the device collectives run on, and in-place weight updates that
also work when ZeRO-3 has partitioned the parameters. Code elsewhere asks these instead of
branching on DeepSpeed or the backend itself.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current CUDA device under NCCL (which
    reduces CUDA tensors only), the CPU otherwise (gloo, or no process group)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = 0):
    """A context in which ``params`` hold their full values: DeepSpeed's ``GatheredParameters``
    when ZeRO-3 partitioned them (changes made on ``modifier_rank`` are kept and re-partitioned;
    ``None``: read only), nothing otherwise (collective under ZeRO-3)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def fail_together(error: Exception | None, what: str) -> None:
    """Raise on every rank if ``error`` happened on any (collective), so no rank waits forever on
    one that failed alone. Reduces on the collective backend's device (NCCL: CUDA only)."""
    failed = torch.tensor([float(error is not None)], device=collective_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"another rank failed while {what}")
