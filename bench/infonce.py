"""InfoNCE loss, forward + backward: naive (materialized logits) vs sslscale's tiled kernels.

NT-Xent layout of SimCLR: B unit-norm embeddings (two views of B/2 images) against themselves,
self-similarity excluded, positive = the other view, temperature 0.1.

(a) CPU, float32: naive (``info_nce_reference``: B x B logits + ``cross_entropy``) vs the
    chunked PyTorch version. Peak memory of one forward + backward, measured in a fresh child
    process per implementation (Linux peak RSS above the inputs); time as the median of
    interleaved repeats in this process.
(b) CUDA, bf16 (when a GPU is present): naive vs the Triton kernel for B up to 32768; time with
    CUDA events (median), peak memory from ``torch.cuda.max_memory_allocated`` above the inputs,
    and how the kernel's memory grows with B.

Prints the ratios (goals: CPU >= 8x lower peak memory and <= 1.5x time; CUDA >= 1.0x speed at
B=32768 and memory linear in B); asserts nothing.

    python bench/infonce.py [--batch 8192] [--dim 256] [--repeats 5] [--short]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sslscale.kernels import info_nce  # noqa: E402

TEMPERATURE = 0.1


def ntxent_inputs(batch: int, dim: int, dtype: torch.dtype, device: str):
    """``z`` (B, D) requiring grad, positives (other view) and exclude (self), B even."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype)
    idx = torch.arange(batch, device=device)
    return z.requires_grad_(), (idx + batch // 2) % batch, idx


def step(impl: str, z, pos, excl) -> None:
    """One forward + backward; the gradient is dropped so that repeats do not accumulate."""
    loss = info_nce(z, z, pos, temperature=TEMPERATURE, exclude=excl, impl=impl).mean()
    loss.backward()
    z.grad = None


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child_peak_mib(impl: str, batch: int, dim: int) -> None:
    """In a fresh process: peak RSS of one step above the RSS holding the inputs (printed JSON)."""
    step(impl, *ntxent_inputs(64, dim, torch.float32, "cpu"))  # page in the code, not counted
    z, pos, excl = ntxent_inputs(batch, dim, torch.float32, "cpu")
    base = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(impl, z, pos, excl)
    print(json.dumps({"impl": impl, "peak_mib": (_proc_kib("VmHWM") - base) / 1024}))


def cpu_peak_mib(impl: str, batch: int, dim: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child-memory", impl, "--batch", str(batch),
                          "--dim", str(dim)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def cpu_times(impls: list[str], batch: int, dim: int, repeats: int) -> dict[str, tuple]:
    """Median (wall, process CPU) seconds per forward + backward, implementations interleaved.

    CPU time is reported beside wall time because a shared machine's load moves wall time."""
    z, pos, excl = ntxent_inputs(batch, dim, torch.float32, "cpu")
    times: dict[str, list[tuple[float, float]]] = {i: [] for i in impls}
    for impl in impls:
        step(impl, z, pos, excl)  # warm-up
    for _ in range(repeats):
        for impl in impls:
            t0, c0 = time.perf_counter(), time.process_time()
            step(impl, z, pos, excl)
            times[impl].append((time.perf_counter() - t0, time.process_time() - c0))
    return {i: tuple(statistics.median(x) for x in zip(*t)) for i, t in times.items()}


def bench_cpu(batch: int, dim: int, repeats: int) -> None:
    print(f"== CPU float32, B={batch}, d={dim}, {torch.get_num_threads()} threads, "
          f"{repeats} interleaved repeats ==")
    mem = {i: cpu_peak_mib(i, batch, dim) for i in ("naive", "chunked")}
    sec = cpu_times(["naive", "chunked"], batch, dim, repeats)
    for impl in ("naive", "chunked"):
        print(f"{impl:8s} peak memory {mem[impl]:9.1f} MiB   forward+backward "
              f"{sec[impl][0] * 1e3:9.1f} ms wall, {sec[impl][1] * 1e3:9.1f} ms CPU")
    print(f"peak memory ratio naive / chunked: {mem['naive'] / max(mem['chunked'], 1e-3):.2f}x")
    print(f"time ratio chunked / naive: {sec['chunked'][0] / sec['naive'][0]:.2f}x wall, "
          f"{sec['chunked'][1] / sec['naive'][1]:.2f}x CPU time")


def cuda_measure(impl: str, batch: int, dim: int, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) of one bf16 forward + backward on CUDA."""
    z, pos, excl = ntxent_inputs(batch, dim, torch.bfloat16, "cuda")
    step(impl, z, pos, excl)  # warm-up (and autotuning)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, z, pos, excl)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(impl, z, pos, excl)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def bench_cuda(batches: list[int], dim: int, repeats: int) -> None:
    print(f"== CUDA bf16 ({torch.cuda.get_device_name()}), d={dim}, median of {repeats} ==")
    print(f"{'B':>6s} {'naive ms':>9s} {'triton ms':>9s} {'speedup':>8s} "
          f"{'naive MiB':>10s} {'triton MiB':>10s} {'mem ratio':>9s}")
    for batch in batches:
        t_n, m_n = cuda_measure("naive", batch, dim, repeats)
        t_t, m_t = cuda_measure("triton", batch, dim, repeats)
        print(f"{batch:6d} {t_n:9.2f} {t_t:9.2f} {t_n / t_t:7.2f}x {m_n:10.1f} {m_t:10.1f} "
              f"{m_n / max(m_t, 1e-3):8.1f}x")
        torch.cuda.empty_cache()
    print(f"triton speedup over naive at B={batches[-1]}: {t_n / t_t:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192, help="B for the CPU comparison")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", action="store_true", help="a quick run that only checks it works")
    parser.add_argument("--child-memory", metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_peak_mib(args.child_memory, args.batch, args.dim)
        return
    if args.short:
        args.batch, args.dim, args.repeats = 1024, 64, 1
    bench_cpu(args.batch, args.dim, args.repeats)
    if torch.cuda.is_available():
        batches = [1024, 2048] if args.short else [4096, 8192, 16384, 32768]
        bench_cuda(batches, args.dim, args.repeats)
    else:
        print("no CUDA device: GPU comparison skipped")


if __name__ == "__main__":
    main()
