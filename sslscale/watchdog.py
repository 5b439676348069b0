"""The stall watchdog: a per-rank thread that turns a silent hang into stack dumps and an exit.

A rank that waits forever in a collective (a peer was SIGSTOPped, lost its node, or deadlocked)
idles every device of the job until the process-group timeout. The trainer calls
:meth:`StallWatchdog.beat` after every optimizer step and :meth:`StallWatchdog.phase` when it
saves or evaluates; once armed (after the first step, so start-up work such as compiling is
not timed), a beat older than the timeout makes the thread

1. dump every thread's Python stack of this rank (``faulthandler``) to
   ``RUN_DIR/stalls/rank-XXXXX-<time>.txt``, with the phase, the step and the call the main
   thread is in;
2. read the other ranks' heartbeats (``RUN_DIR/stalls/heartbeat-XXXXX.json``, written by each
   rank's thread every few seconds) and name the ranks that stopped beating (SIGSTOPped, dead)
   or are behind; with ``py-spy`` on the PATH it also dumps those of them that run on this node;
3. print one ``error:`` line and end the rank with ``exits.STALLED`` (124), children included.

Timeout: ``train.stall_timeout_s``; ``None`` means ``max(600 s, 20 x the median step time)``
(a first eval or save is timed like a step: raise it for runs whose saves take longer), ``0``
turns the watchdog off.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from sslscale import exits

MIN_AUTO_TIMEOUT_S = 600.0
AUTO_FACTOR = 20
HEARTBEAT_S = 2.0  # how often each rank's thread writes its heartbeat file


def py_spy() -> str | None:
    """The ``py-spy`` executable: on the PATH or beside this interpreter (a venv's bin/)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


class StallWatchdog:
    """Watches one rank's progress; see the module doc. ``on_stall(message)`` replaces the hard
    exit (tests). Start with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int,
                 timeout_s: float | None = None, poll_s: float = 1.0,
                 on_stall: Callable[[str], None] | None = None):
        self.folder = Path(run_dir) / "stalls"
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.on_stall = on_stall
        self._durations: deque[float] = deque(maxlen=200)
        self._last = time.monotonic()
        self._step, self._phase, self._armed = 0, "start-up", False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sslscale-stall-watchdog", daemon=True)
        self._main_id = threading.main_thread().ident

    # ----------------------------------------------------------------------------- called by the trainer
    def start(self) -> "StallWatchdog":
        if self.timeout_s != 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, step: int) -> None:
        """A step finished: record its duration and arm the watchdog."""
        now = time.monotonic()
        if self._armed and self._phase == "step":
            self._durations.append(now - self._last)
        self._last, self._step, self._phase, self._armed = now, step, "step", True

    def phase(self, name: str) -> None:
        """The rank enters ``name`` (``save``, ``eval``, ``step``): the timer restarts."""
        self._last, self._phase = time.monotonic(), name

    def timeout(self) -> float:
        """Seconds without progress that count as a stall."""
        if self.timeout_s is not None:
            return float(self.timeout_s)
        median = statistics.median(self._durations) if self._durations else 0.0
        return max(MIN_AUTO_TIMEOUT_S, AUTO_FACTOR * median)

    # ----------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if now >= next_beat:
                self._write_heartbeat()
                next_beat = now + HEARTBEAT_S
            if self._armed and now - self._last > self.timeout():
                self._fire(now - self._last)
                return

    def _heartbeat_path(self, rank: int) -> Path:
        return self.folder / f"heartbeat-{rank:05d}.json"

    def _write_heartbeat(self) -> None:
        beat = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                "node": os.environ.get("SLURMD_NODENAME", ""), "step": self._step,
                "phase": self._phase, "time": time.time()}
        tmp = self._heartbeat_path(self.rank).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, self._heartbeat_path(self.rank))
        except OSError:
            pass  # a full or gone file system: the watchdog itself must keep running

    def where(self) -> str:
        """The call the main thread is in: its innermost frame, and the innermost sslscale one."""
        frame = sys._current_frames().get(self._main_id)
        if frame is None:
            return "unknown"
        inner = f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        while frame is not None and "sslscale" not in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None:
            return inner
        return f"{inner}, from {frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"

    def peers(self) -> list[str]:
        """Descriptions of the other ranks that stopped beating or are behind this one."""
        out, now = [], time.time()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(self._heartbeat_path(rank).read_text())
            except (OSError, ValueError):
                out.append(f"rank {rank}: no heartbeat")
                continue
            age = now - beat["time"]
            if age > 3 * HEARTBEAT_S + self.poll_s:
                out.append(f"rank {rank} (pid {beat['pid']} on {beat['node'] or beat['host']}): "
                           f"no heartbeat for {age:.0f} s (stopped or dead), last in {beat['phase']} "
                           f"at step {beat['step']}")
                self._dump_peer(beat)
            elif beat["step"] < self._step:
                out.append(f"rank {rank}: behind, in {beat['phase']} at step {beat['step']}")
        return out

    def _dump_peer(self, beat: dict) -> None:
        """py-spy's dump of a silent peer running on this node, if py-spy is installed."""
        same_node = beat["host"] == socket.gethostname() and \
            beat["node"] == os.environ.get("SLURMD_NODENAME", "")
        spy = py_spy()
        if not (spy and same_node):
            return
        try:
            # --nonblocking reads the memory of a stopped process (attaching would wait on it)
            done = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(beat["pid"])],
                                  capture_output=True, text=True, timeout=30)
            (self.folder / f"rank-{beat['rank']:05d}-py-spy-{time.strftime('%Y%m%d-%H%M%S')}.txt")\
                .write_text(done.stdout + done.stderr)
        except (OSError, subprocess.SubprocessError):
            pass

    def _fire(self, silent_s: float) -> None:
        path = self.folder / f"rank-{self.rank:05d}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        where, peers = self.where(), self.peers()
        header = (f"rank {self.rank} of {self.world_size}, pid {os.getpid()} on {socket.gethostname()}: "
                  f"no progress for {silent_s:.0f} s (timeout {self.timeout():.0f} s) in {self._phase} "
                  f"after step {self._step}\nmain thread in {where}\n"
                  + "".join(f"peer: {p}\n" for p in peers) + "\n")
        try:
            with open(path, "w") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            path = Path("<stderr>")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        message = (f"error: rank {self.rank} stalled: no progress for {silent_s:.0f} s in {self._phase} "
                   f"after step {self._step}, in {where}"
                   + (f"; {'; '.join(peers)}" if peers else "") + f"; stacks in {path}")
        if self.on_stall is not None:
            self.on_stall(message)
            return
        print(message, file=sys.stderr, flush=True)
        exits.hard_exit(exits.STALLED)
