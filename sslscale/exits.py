"""How a rank ends: its exit codes, the one-line report of a fatal error, and an exit that never
waits on a child or a peer.

Exit codes of a rank, of ``sslscale train`` and of ``sslscale launch`` (the Slurm job script in
``slurm/train.sbatch`` maps them to requeue or not; the README's table says the same):

======  ============================================================  ===========================
code    meaning                                                       Slurm job
======  ============================================================  ===========================
0       finished (``max_steps`` reached, saved)                        COMPLETED
1       crashed: an error, its cause in one ``error:`` line            requeued (``max_failures``)
2       a config, data-plan or usage error a rerun would repeat        FAILED, not requeued
75      preempted: SIGUSR1 / SIGTERM, all ranks saved (EX_TEMPFAIL)    requeued
124     stalled: the watchdog saw no progress (``train.stall_timeout_s``)  requeued (``max_failures``)
130     interrupted: Ctrl-C (SIGINT), all ranks saved                  not requeued
======  ============================================================  ===========================

A rank killed by a signal has code 128 + signal (137 = SIGKILL) and counts as a crash.

Why a hard exit: a fatal error used to leave the rank waiting forever on its data-loader workers
(Python's ``multiprocessing`` joins every child at interpreter exit, and the workers ignore
SIGTERM so that a job-wide SIGTERM does not kill them before the rank saves). ``hard_exit``
flushes the output, SIGKILLs the rank's child processes and ends the process with ``os._exit``;
``kill_children_at_exit`` does the same for a normal interpreter exit. Pure Python: no torch.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

OK = 0
CRASHED = 1
USAGE = 2
PREEMPTED = 75
STALLED = 124
INTERRUPTED = 130

# RUN_DIR/exit.json: the code all ranks agreed to exit with after a clean end (0 finished, 75 /
# 130 saved after a signal), written by rank 0 before any rank exits and removed when a run
# starts. `sslscale launch` and the Slurm job script (launcher/templates/train.sbatch) trust it
# over the ranks' own codes: a rank that dies after it (in the process teardown, or ended by
# the launcher once the others exited) cannot turn a clean end into a failure.
EXIT_FILE = "exit.json"

MEANING = {OK: "finished", CRASHED: "crashed", USAGE: "config or usage error", PREEMPTED: "preempted (saved)",
           STALLED: "stalled", INTERRUPTED: "interrupted (saved)"}


def agreed_code(run_dir: str | os.PathLike, since: float) -> int | None:
    """The code in ``run_dir``'s ``EXIT_FILE`` if it was written at or after ``since`` (a
    ``time.time()``), else None (no file, an older one, or unreadable)."""
    import json

    path = Path(run_dir) / EXIT_FILE
    try:
        if path.stat().st_mtime < since:
            return None
        return int(json.loads(path.read_text())["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kill_children() -> None:
    """SIGKILL this process's ``multiprocessing`` children (data-loader workers) and reap them.
    The DataLoader's SIGCHLD handler, which raises when a worker dies, is reset first: raised
    here, it would leave the other workers alive for ``multiprocessing`` to join forever."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except ValueError:  # not the main thread (the watchdog): the main thread is stuck anyway
        pass
    for child in multiprocessing.active_children():
        try:
            child.kill()
            child.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass


def kill_children_at_exit() -> None:
    """At interpreter exit, SIGKILL the children before ``multiprocessing`` joins them (registered
    after it, so it runs first): a worker that ignores SIGTERM can no longer hold the exit."""
    import multiprocessing.util  # noqa: F401  registers its _exit_function now, before ours

    atexit.register(kill_children)


def hard_exit(code: int) -> None:
    """Flush stdout / stderr, SIGKILL the children and end this process now with ``code``: no
    atexit handler, no join, no collective (a peer may be gone)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    kill_children()
    os._exit(code)


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def cause_of(error: BaseException) -> str:
    """The error's cause in one line. A data-loader worker's error (re-raised with its whole
    traceback in the message) becomes its last line; a lost connection to another rank says
    so (that rank's own error line has the cause)."""
    message = str(error).strip()
    name = type(error).__name__
    if "Traceback (most recent call last)" in message:
        worker = message.split(".", 1)[0].replace("Caught ", "").strip()
        message = f"{message.splitlines()[-1].strip()} ({worker.split(' in ', 1)[-1]})"
        name = ""
    elif any(s in message for s in _PEER_LOST):
        message = ("lost the connection to another rank, which failed or was killed (its own "
                   f"error line says why): {message.split('. ')[0]}")
    line = " ".join(f"{name}: {message}".split()) if name else " ".join(message.split())
    return line if message else name


def report_fatal(error: BaseException, rank: int, run_dir: str | os.PathLike | None) -> str:
    """Write the full traceback to ``RUN_DIR/errors/rank-XXXXX-<time>.txt`` (when the run dir
    exists and has room; else the temp dir's ``sslscale-errors/``, else stderr) and return the one line to print: ``error: rank R: Type: message (traceback in ...)``."""
    line = f"error: rank {rank}: {cause_of(error)}"
    text = "".join(traceback.format_exception(error))
    name = f"rank-{rank:05d}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    folders = [Path(run_dir) / "errors"] if run_dir is not None and Path(run_dir).is_dir() else []
    for folder in folders + [Path(tempfile.gettempdir()) / "sslscale-errors"]:  # a full run dir
        try:
            folder.mkdir(exist_ok=True)
            (folder / name).write_text(text)
            return f"{line} (traceback in {folder / name})"
        except OSError:
            continue
    sys.stderr.write(text)
    return line
