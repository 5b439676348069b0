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


def test_infonce_bench_short():
    proc = subprocess.run([sys.executable, "bench/infonce.py", "--short"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak memory ratio naive / chunked:" in proc.stdout
    assert "time ratio chunked / naive:" in proc.stdout


def test_gpu_steps_bench_tiny_on_cpu():
    """The GPU suite's step benchmark, tiny models on the CPU: its code paths, not its numbers."""
    proc = subprocess.run([sys.executable, "bench/gpu_steps.py", "--device", "cpu", "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("mae", "mlm", "simclr"):
        assert f"{name} throughput ratio sslscale / hf-baseline:" in proc.stdout


def test_mlm_step_bench_short():
    proc = subprocess.run([sys.executable, "bench/mlm_step.py", "--short"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-pad tokens/s" in proc.stdout and "ratio:" in proc.stdout
