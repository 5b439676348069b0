"""Diagnostics of every sslscale process: the ``sslscale`` logger, progress of long steps, and a
note when DeepSpeed compiles one of its C++ ops.

- ``get_logger(name)``: the ``sslscale`` logger (or a child), configured once on first use:
  ``2026-12-02 15:04:05 [rank 0] INFO message`` lines on stderr, the level from
  ``SSLSCALE_LOG_LEVEL`` (``DEBUG``, ``INFO`` (default), ``WARNING``, ``ERROR``), the rank from
  ``RANK`` (torchrun, ``sslscale launch``) or ``SLURM_PROCID`` (srun) when the line is written.
- ``progress(what, total, unit)``: a rich bar when stderr is a terminal; otherwise (a log file,
  a pipe, a Slurm job) a plain log line every ``SSLSCALE_PROGRESS_EVERY_S`` seconds (default
  10), and a last one when it ends, if it printed any: a step shorter than that stays silent.
- ``announce_op_builds()``: one ``building DeepSpeed op NAME in DIR`` line when torch's JIT
  extension loader starts compiling an op that is not built yet (DeepSpeed's ``cpu_adam``,
  ``shm_comm`` ... take minutes on a first run), instead of minutes of silence.

Not log lines, never routed here: the one JSON line a command prints for machines (stdout), the
one-line ``error: ...`` of a fatal error (``sslscale.exits``) and the ``warning: ...`` lines of
config checks (stderr), which scripts and tests match from the start of the line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

LOGGER = "sslscale"
LEVEL_ENV = "SSLSCALE_LOG_LEVEL"
PROGRESS_ENV = "SSLSCALE_PROGRESS_EVERY_S"
FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
_lock = threading.Lock()


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is written (pytest's capture,
    rich's redirection above a live progress bar), not the one at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Rank(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        return True


def _level() -> tuple[int, str | None]:
    """(level, complaint): ``SSLSCALE_LOG_LEVEL`` as a level, INFO if unset or unknown."""
    name = os.environ.get(LEVEL_ENV, "").strip().upper()
    if not name:
        return logging.INFO, None
    level = logging.getLevelName(name)
    if isinstance(level, int):
        return level, None
    return logging.INFO, f"{LEVEL_ENV}={name!r} is not a level (DEBUG, INFO, WARNING, ERROR): using INFO"


def setup() -> logging.Logger:
    """Configure the ``sslscale`` logger (once per process; later calls return it as it is)."""
    logger = logging.getLogger(LOGGER)
    with _lock:
        if any(isinstance(h, _Stderr) for h in logger.handlers):
            return logger
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler.addFilter(_Rank())
        logger.addHandler(handler)
        logger.propagate = False  # an application's root handlers would print every line twice
        level, complaint = _level()
        logger.setLevel(level)
    if complaint:
        logger.warning(complaint)
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    """``sslscale`` (or ``sslscale.<name>``), set up on first use."""
    setup()
    return logging.getLogger(LOGGER if not name else f"{LOGGER}.{name}")


# ------------------------------------------------------------------------------------ progress
def progress_every_s() -> float:
    """Seconds between plain progress lines (``SSLSCALE_PROGRESS_EVERY_S``, default 10)."""
    try:
        return max(0.1, float(os.environ.get(PROGRESS_ENV, "") or 10.0))
    except ValueError:
        return 10.0


class Progress:
    """Progress of one long step (``with progress(...) as p: p.advance(n)``): a rich bar on a
    terminal, else a plain line every ``every_s`` seconds (from a timer thread, so a single slow
    stage still shows it is alive) and one at the end if any was printed. ``enabled=False``
    (e.g. ranks other than 0) shows nothing. ``stage(text)`` names what runs now (export)."""

    def __init__(self, what: str, total: int | None, unit: str = "", *, enabled: bool = True,
                 every_s: float | None = None, terminal: bool | None = None):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.done, self.detail = 0, ""
        self.every_s = progress_every_s() if every_s is None else every_s
        self._terminal = terminal
        self._bar = self._task = self._thread = None
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._lines = 0

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        terminal = console.is_terminal if self._terminal is None else self._terminal
        if terminal:
            self._bar = self._rich_bar(console)
        if self._bar is None:
            self._thread = threading.Thread(target=self._tick, name="sslscale-progress", daemon=True)
            self._thread.start()
        return self

    def _rich_bar(self, console) -> Any:
        from rich.errors import LiveError
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn(self.unit), TextColumn("{task.fields[detail]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                           console=console, transient=False)
        self._task = bar.add_task(self.what, total=self.total, detail="")
        try:
            bar.start()
        except LiveError:  # another live display (the training bar) owns the terminal
            return None
        return bar

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def stage(self, detail: str) -> None:
        """Name the part that runs now (shown beside the bar / in the plain lines)."""
        self.detail = detail
        if self._bar is not None:
            self._bar.update(self._task, detail=detail)

    def line(self) -> str:
        """``what: done/total unit (P%) - detail, E s elapsed, ETA R s``."""
        elapsed = time.monotonic() - self._start
        text = f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "")
        text += f" {self.unit}".rstrip()
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        if self.detail:
            text += f" - {self.detail}"
        text += f", {elapsed:.0f} s"
        if self.total and 0 < self.done < self.total:
            text += f", ETA {elapsed * (self.total - self.done) / self.done:.0f} s"
        return text

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            get_logger().info(self.line())
            self._lines += 1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._lines and exc[0] is None:
                get_logger().info(f"{self.what}: {self.done} {self.unit} in "
                                  f"{time.monotonic() - self._start:.1f} s".replace("  ", " "))


def progress(what: str, total: int | None, unit: str = "", *, enabled: bool = True,
             every_s: float | None = None, terminal: bool | None = None) -> Progress:
    """A ``Progress`` context manager (see the class)."""
    return Progress(what, total, unit, enabled=enabled, every_s=every_s, terminal=terminal)


# ------------------------------------------------------------------------- DeepSpeed op builds
_announced: set[str] = set()


def _announce(name: str, build_directory: str) -> None:
    if name not in _announced:
        _announced.add(name)
        get_logger().info(f"building DeepSpeed op {name} in {build_directory} (C++ compile, once "
                          "per virtualenv and torch version; can take minutes)")


def announce_op_builds() -> bool:
    """Say when torch compiles a JIT extension (DeepSpeed loads its ops through
    ``torch.utils.cpp_extension.load`` with ``verbose=False``: silent minutes otherwise). Wraps
    the loader's build step, which runs in every fresh process and lets ninja decide; the
    notice comes only when the op's library is not built yet. Idempotent; call once per process
    before DeepSpeed loads its ops. False if this torch has no such step (nothing is said)."""
    import torch.utils.cpp_extension as cpp

    build = getattr(cpp, "_write_ninja_file_and_build_library", None)
    if build is None or getattr(build, "_sslscale_announces", False):
        return build is not None
    suffix = getattr(cpp, "LIB_EXT", ".so")

    def build_announced(*args, **kwargs):
        name = kwargs.get("name", args[0] if args else None)
        folder = kwargs.get("build_directory")
        if name and folder and not os.path.exists(os.path.join(folder, f"{name}{suffix}")):
            _announce(str(name), str(folder))
        return build(*args, **kwargs)

    build_announced._sslscale_announces = True
    cpp._write_ninja_file_and_build_library = build_announced
    return True
