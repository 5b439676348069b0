"""InfoNCE loss, forward + backward: naive (materialized logits) vs sslscale's tiled kernels.

Two layouts, temperature 0.1, unit-norm float32 embeddings of width ``d``:
- ``ntxent``: SimCLR's NT-Xent on one process: B embeddings (two views of B/2 images) against
  themselves (``rows is cols``), self excluded, positive = the other view.
- ``dist``: the distributed shape, M = B / ``--local-split`` local rows against N = B gathered
  columns (both with gradient, as ``gather_with_grad``), own column excluded, positive = the
  partner view among the columns.

(a) CPU (``--device cpu``, the default without CUDA), float32, B in ``--batches``: naive
    (``info_nce_reference``: M x N logits + ``cross_entropy``) vs the chunked PyTorch version.
    Peak memory: each (layout, B, impl) in ``--procs`` fresh child processes, interleaved
    (naive, chunked, naive, ...); a child's number is its peak RSS (VmHWM) during one
    forward + backward minus its RSS holding the inputs, in MiB; the worst (largest) of the
    processes is reported, and the memory ratio as the smallest naive over the largest chunked.
    Chunked memory above the inputs, less its one logit tile (``min(M, 2048) x min(N, 2048)``
    float32, at most 16 MiB), is fitted as ``a + b * B`` (least squares) to show it is linear in
    B. Time: median and min-max of ``--repeats`` interleaved repeats in this process (wall ms),
    and of the per-pair ratio chunked / naive. Each row is printed when its B is done.
(b) CUDA (``--device cuda``, the default with CUDA), bf16: naive vs the Triton kernel for B up
    to 32768 in both layouts; CUDA-event time (median of the repeats) and peak memory from
    ``torch.cuda.max_memory_allocated`` above the inputs.

Goals (issue 14): CPU >= 8x less memory than naive at B=8192 and >= 25x at B=16384 in the worst
fresh process, memory above the inputs linear in B; CUDA >= 1.0x naive time at B=32768. The
load average is printed at the start and the end; nothing is asserted.

    python bench/infonce.py [--batches 1024,2048,4096,8192,16384] [--dim 256] [--procs 5]
                            [--repeats 5] [--local-split 8] [--layouts ntxent,dist]
                            [--device cpu|cuda] [--json FILE] [--short]
"""

from __future__ import annotations

import argparse
import json
import os
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
from sslscale.kernels.infonce import CHUNK_COLS, CHUNK_ROWS  # noqa: E402

TEMPERATURE = 0.1
LAYOUTS = ("ntxent", "dist")
GOALS = {8192: 8.0, 16384: 25.0}  # CPU memory ratio goals of issue 14
CUDA_GOAL = 1.0  # triton / naive speed at B=32768 (issue 14)


def make_inputs(layout: str, batch: int, dim: int, split: int, dtype: torch.dtype, device: str):
    """``(rows (M, D), cols (N, D), positives (M,), exclude (M,))``, rows/cols requiring grad.

    ``ntxent``: ``rows is cols`` (B, D). ``dist``: this rank's M = B / split rows and the N = B
    gathered columns (rank 0's slice [0, M) of them holds its own rows' values)."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype)
    idx = torch.arange(batch, device=device)
    if layout == "ntxent":
        z.requires_grad_()
        return z, z, (idx + batch // 2) % batch, idx
    local = batch // split
    rows = z[:local].clone().requires_grad_()
    own = idx[:local]
    return rows, z.requires_grad_(), (own + batch // 2) % batch, own


def step(impl: str, rows, cols, pos, excl) -> None:
    """One forward + backward; gradients are dropped so that repeats do not accumulate."""
    loss = info_nce(rows, cols, pos, temperature=TEMPERATURE, exclude=excl, impl=impl).mean()
    loss.backward()
    rows.grad = cols.grad = None


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child_peak(impl: str, layout: str, batch: int, dim: int, split: int) -> None:
    """In a fresh process: peak RSS of one step above the RSS holding the inputs (JSON, MiB)."""
    step(impl, *make_inputs(layout, 64, dim, 8, torch.float32, "cpu"))  # page in the code
    inputs = make_inputs(layout, batch, dim, split, torch.float32, "cpu")
    base = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(impl, *inputs)
    print(json.dumps({"peak_mib": (_proc_kib("VmHWM") - base) / 1024}))


def fresh_peak_mib(impl: str, layout: str, batch: int, dim: int, split: int) -> float:
    cmd = [sys.executable, __file__, "--child", impl, layout, str(batch), str(dim), str(split)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def fresh_peaks(layout: str, batch: int, dim: int, split: int, procs: int) -> dict:
    """``{impl: [MiB per fresh process]}`` at one B, processes interleaved naive / chunked."""
    runs: dict[str, list[float]] = {"naive": [], "chunked": []}
    for _ in range(procs):
        for impl, values in runs.items():
            values.append(fresh_peak_mib(impl, layout, batch, dim, split))
    return runs


def step_times(layout: str, batch: int, dim: int, split: int, repeats: int) -> dict:
    """``{impl: [wall s per forward + backward]}`` at one B, impls interleaved after a warm-up."""
    inputs = make_inputs(layout, batch, dim, split, torch.float32, "cpu")
    runs: dict[str, list[float]] = {"naive": [], "chunked": []}
    for impl in runs:
        step(impl, *inputs)  # warm-up
    for _ in range(repeats):
        for impl, values in runs.items():
            t0 = time.perf_counter()
            step(impl, *inputs)
            values.append(time.perf_counter() - t0)
    return runs


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: ``(a, b, largest |residual|)``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in zip(xs, ys))


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """``median [min-max]`` of ``values * scale``."""
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} [{fmt.format(min(v))}-{fmt.format(max(v))}]"


def rows_of(layout: str, batch: int, split: int) -> int:
    return batch if layout == "ntxent" else batch // split


def tile_mib(layout: str, batch: int, split: int) -> float:
    """The chunked version's one float32 logit tile, ``min(M, 2048) x min(N, 2048)``."""
    return min(rows_of(layout, batch, split), CHUNK_ROWS) * min(batch, CHUNK_COLS) * 4 / 2**20


def cpu_row(layout: str, batch: int, mem: dict, sec: dict) -> None:
    naive, chunked = mem["naive"], mem["chunked"]
    ratio = min(naive) / max(max(chunked), 1e-3)  # the worst case for sslscale
    pairs = [c / n for n, c in zip(sec["naive"], sec["chunked"])]
    print(f"{batch:6d} {max(naive):15.1f} {max(chunked):17.1f} {statistics.median(chunked):14.1f} "
          f"{ratio:8.1f}x {spread(sec['naive'], 1e3):>27} {spread(sec['chunked'], 1e3):>23} "
          f"{spread(pairs, fmt='{:.2f}') + 'x':>26}", flush=True)
    if layout == "ntxent" and batch in GOALS:
        verdict = "met" if ratio >= GOALS[batch] else "NOT met"
        print(f"       goal at B={batch}: >= {GOALS[batch]:.0f}x less memory in the worst "
              f"process: {ratio:.1f}x, {verdict}", flush=True)


def bench_cpu_layout(layout: str, args) -> dict:
    """Memory and time of every B (one row each, printed as it comes), then the linear fit."""
    split = args.local_split
    shape = "M = N = B, rows is cols" if layout == "ntxent" else f"M = B/{split} rows, N = B cols"
    print(f"\n-- {layout} ({shape}) --")
    print(f"{'B':>6} {'naive MiB worst':>15} {'chunked MiB worst':>17} {'chunked median':>14} "
          f"{'mem ratio':>9} {'naive ms median [min-max]':>27} {'chunked ms':>23} "
          f"{'time ratio chunked/naive':>26}", flush=True)
    mem, sec = {}, {}
    for batch in args.batches:
        mem[batch] = fresh_peaks(layout, batch, args.dim, split, args.procs)
        sec[batch] = step_times(layout, batch, args.dim, split, args.repeats)
        cpu_row(layout, batch, mem[batch], sec[batch])
    xs = list(mem)
    a, b, res = linear_fit(xs, [max(mem[x]["chunked"]) - tile_mib(layout, x, split) for x in xs])
    unit = args.dim * 4 / 2**20  # MiB of one float32 row of width d
    print(f"chunked memory above the inputs (worst) ~= one logit tile (min(M, {CHUNK_ROWS}) x "
          f"min(N, {CHUNK_COLS}) x 4 bytes, <= {CHUNK_ROWS * CHUNK_COLS * 4 / 2**20:.0f} MiB) + "
          f"{a:.1f} MiB + {b / unit:.2f} x B x d x 4 bytes, fit over B in {xs} (largest residual "
          f"{res:.1f} MiB); naive grows as B^2 (M x N logits)")
    last = args.batches[-1]
    print(f"peak memory ratio naive / chunked (worst process) at B={last}: "
          f"{min(mem[last]['naive']) / max(mem[last]['chunked']):.2f}x")
    print(f"time ratio chunked / naive at B={last}: "
          f"{statistics.median(sec[last]['chunked']) / statistics.median(sec[last]['naive']):.2f}x "
          f"wall (medians)", flush=True)
    return {"memory_mib": mem, "seconds": sec}


def bench_cpu(args) -> dict:
    print(f"== CPU float32, d={args.dim}, {torch.get_num_threads()} threads; memory: peak RSS above "
          f"the inputs, worst of {args.procs} fresh processes per (B, impl); time: median "
          f"[min-max] of {args.repeats} interleaved repeats ==", flush=True)
    return {layout: bench_cpu_layout(layout, args) for layout in args.layouts}


def cuda_measure(impl: str, layout: str, batch: int, dim: int, split: int,
                 repeats: int) -> tuple[list[float], float]:
    """(ms per repeat, peak MiB above the inputs) of one bf16 forward + backward on CUDA."""
    inputs = make_inputs(layout, batch, dim, split, torch.bfloat16, "cuda")
    step(impl, *inputs)  # warm-up (and autotuning)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, *inputs)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(impl, *inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times, peak


def bench_cuda(args) -> dict:
    batches, dim, split, repeats = args.batches, args.dim, args.local_split, args.repeats
    print(f"== CUDA bf16 ({torch.cuda.get_device_name()}), d={dim}, {repeats} repeats; time: "
          f"CUDA events, median [min-max]; memory: peak above the inputs ==")
    results = {}
    for layout in args.layouts:
        shape = "M = N = B, rows is cols" if layout == "ntxent" else f"M = B/{split}, N = B"
        print(f"-- {layout} ({shape}) --\n{'B':>6s} {'naive ms':>22s} {'triton ms':>22s} "
              f"{'speedup':>8s} {'naive MiB':>10s} {'triton MiB':>10s} {'mem ratio':>9s}")
        results[layout] = {}
        for batch in batches:
            t_n, m_n = cuda_measure("naive", layout, batch, dim, split, repeats)
            t_t, m_t = cuda_measure("triton", layout, batch, dim, split, repeats)
            speedup = statistics.median(t_n) / statistics.median(t_t)
            print(f"{batch:6d} {spread(t_n, fmt='{:.2f}'):>22s} {spread(t_t, fmt='{:.2f}'):>22s} "
                  f"{speedup:7.2f}x {m_n:10.1f} {m_t:10.1f} {m_n / max(m_t, 1e-3):8.1f}x", flush=True)
            results[layout][batch] = {"ms": {"naive": t_n, "triton": t_t},
                                      "peak_mib": {"naive": m_n, "triton": m_t}}
            torch.cuda.empty_cache()
        verdict = "met" if speedup >= CUDA_GOAL else "NOT met"
        print(f"triton speedup over naive at B={batches[-1]} ({layout}): {speedup:.2f}x "
              f"(goal >= {CUDA_GOAL:.1f}x at B=32768: {verdict})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated B (default CPU 1024..16384, CUDA 4096..32768)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--procs", type=int, default=5, help="fresh processes per memory number")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--local-split", type=int, default=8, help="N / M of the dist layout")
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS),
                        help="comma-separated, of " + ",".join(LAYOUTS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--short", action="store_true", help="a quick run that only checks it works")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, layout, batch, dim, split = args.child
        child_peak(impl, layout, int(batch), int(dim), int(split))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.short:
        args.batches, args.dim, args.procs, args.repeats = args.batches or [256, 512], 32, 1, 2
    print(f"load average at start: {os.getloadavg()}")
    if device == "cuda":
        args.batches = args.batches or [4096, 8192, 16384, 32768]
        results = bench_cuda(args)
    else:
        args.batches = args.batches or [1024, 2048, 4096, 8192, 16384]
        results = bench_cpu(args)
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "dim": args.dim, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
