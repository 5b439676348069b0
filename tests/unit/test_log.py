"""Diagnostics (issue 15, "Output and progress"): the ``sslscale`` logger's line format, level
and rank; progress lines when stderr is not a terminal; the DeepSpeed op-build notice; and the
per-virtualenv ``TORCH_EXTENSIONS_DIR`` default of direct ``sslscale`` runs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest

from sslscale import log

from ..conftest import ROOT

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank (\d+)\] (DEBUG|INFO|WARNING|ERROR) (.*)$")


def _fresh_logger(monkeypatch, **env: str) -> None:
    """Forget the sslscale logger's set-up (it is configured once per process)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    logger = logging.getLogger(log.LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    monkeypatch.setattr(logger, "handlers", [])


def test_lines_have_time_rank_level_on_stderr(monkeypatch, capsys):
    _fresh_logger(monkeypatch, RANK="3", SSLSCALE_LOG_LEVEL="")
    log.get_logger("eval").info("features of 128 samples")
    log.get_logger().debug("not shown at INFO")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    m = LINE.match(lines[0])
    assert m and m.groups() == ("3", "INFO", "features of 128 samples"), lines[0]


def test_level_from_the_environment(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="warning")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    log.get_logger().info("hidden")
    log.get_logger().warning("shown")
    assert [LINE.match(x).groups() for x in capsys.readouterr().err.splitlines()] == [("0", "WARNING", "shown")]
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="loud")
    log.get_logger().info("still INFO")
    err = capsys.readouterr().err
    assert "SSLSCALE_LOG_LEVEL='LOUD' is not a level" in err and "still INFO" in err


def test_setup_once(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="")
    for _ in range(3):
        log.setup()
    log.get_logger().info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_plain_progress_lines_when_not_a_terminal(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="")
    with log.progress("kNN features", 100, "samples", every_s=0.2, terminal=False) as p:
        for _ in range(4):
            p.advance(10)
            time.sleep(0.15)
    lines = [LINE.match(x).group(3) for x in capsys.readouterr().err.splitlines()]
    assert len(lines) >= 2, lines
    assert re.fullmatch(r"kNN features: \d+/100 samples \(\d+%\), \d+ s(, ETA \d+ s)?", lines[0]), lines
    assert re.fullmatch(r"kNN features: 40 samples in \d+\.\d s", lines[-1]), lines


def test_short_step_is_silent_and_disabled_shows_nothing(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="")
    with log.progress("quick", 3, "batches", every_s=30, terminal=False) as p:
        p.advance(3)
    with log.progress("other rank", 3, every_s=0.01, enabled=False, terminal=False) as p:
        time.sleep(0.05)
        p.advance(3)
    assert capsys.readouterr().err == ""


def test_stage_names_the_running_part(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="")
    with log.progress("export", 4, "stages", every_s=0.1, terminal=False) as p:
        p.stage("round trip check")
        p.advance(2)
        time.sleep(0.25)
    assert "export: 2/4 stages (50%) - round trip check, " in capsys.readouterr().err


def test_rich_bar_on_a_terminal(monkeypatch, capsys):
    _fresh_logger(monkeypatch, SSLSCALE_LOG_LEVEL="")
    with log.progress("kNN features", 4, "batches", terminal=True) as p:
        assert p._bar is not None and p._thread is None
        p.advance(4)
    assert "kNN features" in capsys.readouterr().err


# -- the DeepSpeed op build notice -------------------------------------------------------------

PROBE = """
import sys
import torch.utils.cpp_extension as cpp
from sslscale.log import announce_op_builds
assert announce_op_builds() and announce_op_builds()  # idempotent
for _ in range(2):  # built once, loaded from the cache the second time
    cpp.load(name="sslscale_probe", sources=[sys.argv[1]], is_python_module=False)
"""


def test_op_build_is_announced_once_and_not_when_cached(tmp_path):
    """A real (tiny: no torch headers, ~3 s) JIT build through torch's loader, as DeepSpeed's
    ops are built (``verbose=False``: torch itself says nothing)."""
    import shutil

    import torch.utils.cpp_extension as cpp

    if not cpp.is_ninja_available() or shutil.which("c++") is None:
        pytest.skip("no ninja or C++ compiler: cannot JIT-build an extension")
    source = tmp_path / "probe.cpp"
    source.write_text("int sslscale_probe_answer() { return 42; }\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "SSLSCALE_LOG_LEVEL": "INFO"}

    def run() -> list[str]:
        done = subprocess.run([sys.executable, "-c", PROBE, str(source)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return [LINE.match(x).group(3) for x in done.stderr.splitlines() if LINE.match(x)]

    assert run() == [f"building DeepSpeed op sslscale_probe in {tmp_path / 'ext' / 'sslscale_probe'} "
                     "(C++ compile, once per virtualenv and torch version; can take minutes)"]
    assert (tmp_path / "ext" / "sslscale_probe" / "sslscale_probe.so").is_file()
    assert run() == []  # a new process, the op already built: nothing to say


def test_filter_known_warnings_installs_the_notice():
    import torch.utils.cpp_extension as cpp

    from sslscale.metrics import filter_known_warnings

    filter_known_warnings()
    assert getattr(cpp._write_ninja_file_and_build_library, "_sslscale_announces", False)


# -- TORCH_EXTENSIONS_DIR for direct sslscale runs ----------------------------------------------


def test_default_extensions_dir_is_per_venv_and_torch_version(monkeypatch, tmp_path):
    from importlib.metadata import version

    from launcher.cli import default_torch_extensions_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_torch_extensions_dir()
    assert path.parent == tmp_path / "sslscale" / "torch_extensions"
    assert path.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch{version('torch')}-")
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    other = default_torch_extensions_dir()
    assert other.parent == path.parent and other != path  # another virtualenv, another folder


def _extensions_dir_seen_by_the_cli(env: dict[str, str]) -> str:
    """TORCH_EXTENSIONS_DIR after ``launcher.cli.main`` ran a (failing) command, in a new
    interpreter with ``env``."""
    code = ("import os, sys\nfrom launcher.cli import main\n"
            "main(['data', 'plan', sys.argv[1], '--world-size', '1'])\n"
            "print(os.environ.get('TORCH_EXTENSIONS_DIR'))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "no-such-manifest")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("error: "), done.stderr  # nothing said about the cache
    return done.stdout.strip().splitlines()[-1]


def test_cli_sets_the_default_only_when_unset(monkeypatch, tmp_path):
    from launcher.cli import default_torch_extensions_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    assert _extensions_dir_seen_by_the_cli(env) == str(default_torch_extensions_dir())
    # the Makefile's (or the user's) setting wins
    assert _extensions_dir_seen_by_the_cli({**env, "TORCH_EXTENSIONS_DIR": "/explicit"}) == "/explicit"


def test_makefile_sets_its_own_cache():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^export TORCH_EXTENSIONS_DIR := \$\(CURDIR\)/\.cache/torch_extensions$", makefile, re.M)
