"""``sslscale launch --nproc N``: N local ranks, started, signalled and ended by this process.

Each rank runs ``python -m sslscale.train CONFIG overrides`` with RANK / LOCAL_RANK / WORLD_SIZE
/ MASTER_ADDR / MASTER_PORT set (a free local port), in a session of its own, so that only this
launcher decides what reaches it:

- SIGTERM and SIGUSR1 are forwarded to every rank (preemption: they save at the next step and
  exit 75); SIGINT (Ctrl-C) too (they save and exit 130); a second SIGINT kills them at once.
- A rank that fails (any code but 0, 75, 130) ends the run: the others get ``FAIL_GRACE_S`` to
  notice and exit on their own, then they and their data-loader workers are SIGKILLed.
- If this launcher dies, even by SIGKILL, the kernel sends its ranks SIGTERM (Linux
  ``PR_SET_PDEATHSIG``): they save and exit instead of training on, orphaned.

Returns the first failing rank's code, else 130 / 75 if the ranks stopped on a signal, else 0
(the codes of ``sslscale.exits``); but the code all ranks agreed on in ``RUN_DIR/exit.json``
(``sslscale.exits.EXIT_FILE``) wins when this run wrote one, as in the Slurm job script: a rank
that dies after it, in its teardown, does not turn a clean end into a failure. No process of
the run outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from launcher.env import free_port
from sslscale import exits

FAIL_GRACE_S = 10.0  # after a rank failed, the others' time to exit before SIGKILL
DONE_GRACE_S = 300.0  # after a rank finished, the others' time to finish too (srun --wait)
_PR_SET_PDEATHSIG = 1


def rank_command(recipe: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "sslscale.train", recipe, *overrides]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own handlers still forward signals


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a rank and everything in its session (its data-loader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class LocalRun:
    """The ranks of one ``sslscale launch``; :meth:`wait` returns the run's exit code."""

    def __init__(self, nproc: int, recipe: str, overrides: Sequence[str],
                 master_port: int | None = None, run_dir: str | None = None):
        if nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {nproc}")
        if master_port is not None and not 1 <= master_port <= 65535:
            raise ValueError(f"--master-port must be in 1..65535, got {master_port}")
        port = str(master_port or free_port())
        self.run_dir, self.started = run_dir, time.time()
        self.procs: list[subprocess.Popen] = []
        self._interrupts = 0
        # Not the caller's wandb-core session (WANDB_SERVICE, set by a wandb.init in the process
        # that launches): rank 0 starts its own, so the run's wandb run closes with the ranks.
        inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        for rank in range(nproc):
            env = {**inherited, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}
            self.procs.append(subprocess.Popen(rank_command(recipe, overrides), env=env,
                                               start_new_session=True, preexec_fn=_die_with_parent))

    def forward(self, signum: int, frame=None) -> None:
        """Send ``signum`` to every live rank; the second SIGINT kills them instead."""
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                print("sslscale launch: second Ctrl-C: killing the ranks without saving", file=sys.stderr)
                for p in self.procs:
                    _kill_group(p)
                return
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        failed: int | None = None
        deadline = None
        while any(p.poll() is None for p in self.procs):
            codes = [p.returncode for p in self.procs if p.returncode is not None]
            bad = [c for c in codes if c not in (exits.OK, exits.PREEMPTED, exits.INTERRUPTED)]
            if bad and failed is None:
                failed = bad[0]
                deadline = time.monotonic() + FAIL_GRACE_S
            elif codes and deadline is None:
                deadline = time.monotonic() + DONE_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                print(f"sslscale launch: ending the ranks still running "
                      f"({'a rank failed' if failed is not None else 'the others finished'})", file=sys.stderr)
                for p in self.procs:
                    _kill_group(p)
                break
            time.sleep(0.1)
        for p in self.procs:
            p.wait()
            _kill_group(p)  # leftovers of its session (workers of a SIGKILLed rank)
        code = _run_code([p.returncode for p in self.procs])
        agreed = exits.agreed_code(self.run_dir, self.started) if self.run_dir else None
        if agreed is not None and agreed != code:
            print(f"sslscale launch: a rank ended with code {code} after all ranks had agreed to end "
                  f"with {agreed} ({os.path.join(self.run_dir, exits.EXIT_FILE)}): the run's code is "
                  f"{agreed}", file=sys.stderr)
            return agreed
        return code


def _run_code(codes: list[int]) -> int:
    """The run's exit code from its ranks' (a negative code is death by that signal)."""
    codes = [128 - c if c < 0 else c for c in codes]
    bad = [c for c in codes if c not in (exits.OK, exits.PREEMPTED, exits.INTERRUPTED)]
    if bad:
        return bad[0]
    for code in (exits.INTERRUPTED, exits.PREEMPTED):
        if code in codes:
            return code
    return exits.OK


def launch(nproc: int, recipe: str, overrides: Sequence[str], master_port: int | None = None) -> int:
    """Run ``nproc`` local ranks to the end, forwarding SIGTERM / SIGUSR1 / SIGINT to them;
    returns the run's exit code (see the module doc). ``master_port``: the rendezvous port on
    127.0.0.1 (default: a free one); ``ValueError`` outside 1..65535."""
    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in handled}
    run = None

    def forward(signum, frame):
        if run is not None:
            run.forward(signum)

    for s in handled:
        signal.signal(s, forward)
    from sslscale.config import load_config

    run_dir = load_config(recipe, overrides).run_dir
    try:
        run = LocalRun(nproc, recipe, overrides, master_port=master_port, run_dir=run_dir)
        return run.wait()
    finally:
        if run is not None:
            for p in run.procs:
                _kill_group(p)
        for s, h in old.items():
            signal.signal(s, h)
