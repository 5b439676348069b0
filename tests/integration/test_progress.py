"""What a user sees on stderr when it is not a terminal (a log file, a Slurm job): logger lines
with time, rank and level; progress lines of kNN evaluation and export every
``SSLSCALE_PROGRESS_EVERY_S`` seconds; stdout keeps exactly the one JSON line."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from sslscale.hub import EXPORT_STAGES

from ..conftest import DEMO_RECIPE, ROOT, sslscale_cmd, tiny_overrides

pytestmark = pytest.mark.integration

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] (INFO|WARNING) (.*)$")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(sslscale_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def messages(stderr: str) -> list[str]:
    return [m.group(2) for m in map(LOG_LINE.match, stderr.splitlines()) if m]


def test_log_lines_and_progress_of_eval_and_export(real_shards, tmp_path):
    run_dir = tmp_path / "run"
    done = run("train", str(DEMO_RECIPE), *tiny_overrides(real_shards, run_dir, "train.max_steps=2",
                                                          "checkpoint.every_steps=2", "eval.every_steps=0"))
    assert done.returncode == 0, done.stderr[-3000:]
    said = messages(done.stderr)
    assert any(m.startswith("engine: DeepSpeed ZeRO-0, fp32, cpu") for m in said), done.stderr[-3000:]
    assert any(m.startswith(f"saved {run_dir / 'checkpoints' / 'step-00000002'}") for m in said), said

    ev = run("eval", "knn", str(run_dir), SSLSCALE_PROGRESS_EVERY_S="0.2")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert len(ev.stdout.splitlines()) == 1 and json.loads(ev.stdout)["num_test"] == 64
    # 128 images may take less than one progress interval (then nothing is said; the lines
    # themselves: tests/unit/test_eval_progress.py); what it says is about the two passes.
    assert all(m.startswith(("kNN bank (step 2): ", "kNN queries (step 2): ")) for m in messages(ev.stderr))

    out = tmp_path / "export"
    ex = run("export", str(run_dir), "--out", str(out), SSLSCALE_PROGRESS_EVERY_S="0.2")
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert len(ex.stdout.splitlines()) == 1 and json.loads(ex.stdout)["step"] == 2
    stages = [m for m in messages(ex.stderr) if m.startswith("export step-00000002: ")]
    assert stages and stages[-1].startswith("export step-00000002: 5 stages in "), ex.stderr[-3000:]
    # Which stages outlast one progress interval depends on the machine's load; each line that
    # is said names one of the five.
    assert all(any(f" - {name}, " in m for name in EXPORT_STAGES) for m in stages[:-1]), stages

    quiet = run("export", str(run_dir), "--out", str(out), "--overwrite", SSLSCALE_LOG_LEVEL="WARNING",
                SSLSCALE_PROGRESS_EVERY_S="0.2")
    assert quiet.returncode == 0 and messages(quiet.stderr) == [], quiet.stderr[-3000:]
