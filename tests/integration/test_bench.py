"""CPU benchmarks run in their short mode, only to check that they work (no timed assertion)."""

import subprocess
import sys

import pytest

from ..conftest import ROOT, real_source

pytestmark = pytest.mark.integration


def test_data_pipeline_bench_short():
    real_source()  # skips without real image data
    proc = subprocess.run([sys.executable, "bench/data_pipeline.py", "--short"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "throughput ratio sslscale / baseline:" in proc.stdout
    assert "resume cost ratio 90% / 0%:" in proc.stdout
