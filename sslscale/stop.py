"""Stopping a run on a signal, together: ``StopSignals`` records SIGTERM / SIGUSR1 (preemption)
and SIGINT (Ctrl-C) in a rank; ``StopVote`` makes every rank agree on them at the same step
without stalling the step. The trainer saves and exits with the code (``sslscale.exits``)."""

from __future__ import annotations

import signal
from typing import Any

import torch

from sslscale import exits


# The exit code a stop signal leads to, after all ranks saved (``sslscale.exits``): SIGTERM /
# SIGUSR1 are preemption (75, requeued), SIGINT (Ctrl-C) an interruption (130, not requeued).
STOP_SIGNALS = {signal.SIGTERM: exits.PREEMPTED, signal.SIGUSR1: exits.PREEMPTED,
                signal.SIGINT: exits.INTERRUPTED}


class StopSignals:
    """The stop signals this process got: installed at start-up (``install``), before the slow
    engine build, so a signal that comes early is kept for the first step boundary instead of
    killing the rank. ``code`` is 0 or the highest of ``STOP_SIGNALS``' codes received."""

    def __init__(self):
        self.code = 0

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        self.code = max(self.code, STOP_SIGNALS[signum])
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once, without saving
            signal.signal(signal.SIGINT, signal.default_int_handler)


class StopVote:
    """Agrees on a stop signal across ranks without stalling the step: ``post(code)`` starts a
    non-blocking all-reduce (MAX) of this rank's code on a CPU (gloo) group and returns the
    result of the previous post, which arrived while the step ran. Every rank reads the same
    value at the same step, so all stop together, one step after the signal reached any of them.
    On one process the code is its own. Raises what ``work.wait()`` raises (a lost peer, the
    process group's timeout)."""

    def __init__(self):
        self.group = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # gloo: CPU tensors, so neither the post nor the read touches a CUDA stream. On CPU
            # runs the default group is gloo already; a group of its own keeps this op out of
            # the order of DeepSpeed's collectives.
            self.group = torch.distributed.new_group(backend="gloo")
        self._pending: tuple[Any, torch.Tensor] | None = None

    def post(self, code: int) -> int:
        agreed = self.wait()
        flag = torch.tensor([code], dtype=torch.int64)
        work = None if self.group is None else torch.distributed.all_reduce(
            flag, torch.distributed.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, flag)
        return agreed

    def wait(self) -> int:
        """The result of the last post (0 if none is pending); nothing stays in flight."""
        if self._pending is None:
            return 0
        (work, flag), self._pending = self._pending, None
        if work is not None:
            work.wait()
        return int(flag[0])
