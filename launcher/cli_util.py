"""What the ``sslscale`` sub-commands share: an error the user can fix as one ``error:`` line
(exit 2), and stdout kept for a command's one JSON result line."""

from __future__ import annotations

import argparse
import importlib
import sys

RUN_DIR_HELP = "the run's directory (run_dir), e.g. runs/mae_vit_tiny_fmnist"


def one_line_errors(*types: type | str):
    """Decorator: the sub-command's errors of ``types`` become one ``error:`` line, exit 2. A
    type given as ``"module:Name"`` is imported when the command runs (it may pull in torch)."""
    def wrap(func):
        def run(args: argparse.Namespace) -> int:
            caught = tuple(getattr(importlib.import_module(t.split(":")[0]), t.split(":")[1])
                           if isinstance(t, str) else t for t in types)
            try:
                return func(args)
            except caught as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def result_on_stdout(func):
    """Decorator for sub-commands whose stdout is one JSON line for machines: while ``func(args,
    out)`` works, whatever else writes to ``sys.stdout`` (DeepSpeed's logger does) goes to
    stderr; ``func`` prints its result to ``out``, the real stdout."""
    def run(args: argparse.Namespace) -> int:
        import contextlib

        out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return func(args, out)
    return run
