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
    """Both layouts (NT-Xent and the distributed M << N), memory in fresh processes, on the CPU."""
    proc = subprocess.run([sys.executable, "bench/infonce.py", "--short", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("-- ntxent", "-- dist", "chunked memory above the inputs (worst) ~=",
                 "peak memory ratio naive / chunked (worst process) at B=",
                 "time ratio chunked / naive at B=", "load average at start:", "load average at end:"):
        assert line in proc.stdout, (line, proc.stdout[-3000:])


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
    for line in ("loss check (initial weights, one batch):", "tokens/s",
                 "ratio sslscale / HF per window pair:", "load average at end:"):
        assert line in proc.stdout, (line, proc.stdout[-3000:])


def test_step_overhead_bench_short():
    """`sslscale train` (a real subprocess) vs the plain loop, then the per-piece profile."""
    real_source()  # skips without real image data
    proc = subprocess.run([sys.executable, "bench/step_overhead.py", "--short"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("ratio sslscale / plain per pair:", "ms per optimizer step", "total (wall)",
                 "DeepSpeed: forward wrapper", "in-process steps/s:", "load average at end:"):
        assert line in proc.stdout, (line, proc.stdout[-3000:])
