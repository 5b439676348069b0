"""Manifest cost at the design size: 100,000 shards / 1,000,000,000 samples.

Writes a synthetic ``manifest.json`` (shard names, sample counts around 10,000 each, sizes,
sha256) and measures, each in a fresh process so nothing is cached or shared:
(a) ``load_manifest``: wall time and the RSS it adds (current RSS after minus before, MB);
(b) ``sslscale data plan`` for 512 ranks x 8 workers (4,096 streams): wall time of the whole
    command (interpreter start, imports, load, plan, JSON out);
(c) one data-loader worker's readers: the 1 stream (of 4,096) it reads, positioned mid-epoch;
(d) resuming at 90% of a 1 GB local shard: from its seek index (the sidecar), from a walk of
    its tar headers, and by a replay, page cache warm and cold (dropped with fadvise).
The baseline, measured in the same run, is the old format that inlines every sample's byte
offset (``--baseline-shards`` x ``--baseline-samples``, 1,000 x 10,000,000 by default, as the
issue measured it: 10x fewer samples because at 10^9 the old format needs ~10 GB per process).
Prints one table and the goals (< 5 s, < 300 MB, plan < 10 s); asserts nothing.

    python bench/manifest_scale.py [--shards 100000] [--samples 1000000000] [--short]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, os, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
from sslscale.data.shards import load_manifest
from sslscale.data.stream import StreamReader, DataStats
before = rss_mb()
t0 = time.perf_counter()
m = load_manifest(sys.argv[1])
load_s = time.perf_counter() - t0
after = rss_mb()
t0 = time.perf_counter()
n = len(m.shards)
reader = StreamReader(m, 1, num_streams=int(sys.argv[2]), seed=0, block=64,
                      k=m.num_samples // int(sys.argv[2]) // 2, stats=DataStats(False))
from sslscale.data.plan import locate
locate(reader.counts, reader.num_streams, 0, 1, reader.k)
reader_s = time.perf_counter() - t0
print(json.dumps({"load_s": load_s, "rss_mb": after - before, "reader_s": reader_s,
                  "reader_rss_mb": rss_mb() - after, "num_samples": m.num_samples}))
"""


def counts_for(shards: int, samples: int, seed: int = 0) -> list[int]:
    """``shards`` sample counts (+-10% around the mean) that sum to ``samples``."""
    rng = random.Random(seed)
    mean = samples // shards
    counts = [mean + rng.randint(-mean // 10, mean // 10) for _ in range(shards)]
    counts[-1] += samples - sum(counts)
    i = 0
    while counts[-1] < 1:  # rebalance when the last one went non-positive
        take = min(counts[i] - 1, 1 - counts[-1])
        counts[i] -= take
        counts[-1] += take
        i += 1
    return counts


def write_manifest(folder: Path, shards: int, samples: int, offsets: bool) -> Path:
    """A synthetic manifest (no tar files): the new format, or the old one with ``offsets``."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(counts_for(shards, samples)):
        row = {"name": f"shard-{i:06d}.tar", "num_samples": n, "size": n * 110_000,
               "sha256": f"{rng.getrandbits(256):064x}"}
        if offsets:
            row["offsets"] = list(range(0, n * 110_000, 110_000))
        rows.append(row)
    head = {"format": "webdataset", "version": 1 if offsets else 2, "modality": "image",
            "source": "synthetic", "license": "none", "created": "", "num_shards": shards,
            "num_samples": samples, "meta": {}}
    if not offsets:
        head["seek_index"] = "{name}.idx"
    file = folder / "manifest.json"
    with open(file, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "shards": [\n')
        f.write(",\n".join(json.dumps(r, separators=(",", ":")) for r in rows))
        f.write("\n]}\n")
    return file


def fresh(args: list[str], timeout: float = 600) -> tuple[str, float]:
    """Run ``python args`` in a fresh process from the repository root: (stdout, wall s)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    return out.stdout, wall


def measure(file: Path, streams: int, ranks: int, workers: int) -> dict:
    load, _ = fresh(["-c", LOAD, str(file), str(streams)])
    result = json.loads(load)
    plan, wall = fresh(["-m", "launcher.cli", "data", "plan", str(file), "--world-size", str(ranks),
                        "--workers", str(workers), "--num-streams", str(streams),
                        "--micro-batch-size", "64"])
    described = json.loads(plan)
    return {**result, "plan_s": wall, "plan_samples_per_rank": described["epochs"][0]["samples_per_rank"],
            "file_mb": file.stat().st_size / 2**20}


def _cold(*paths: Path) -> None:
    """Drop the page cache of ``paths`` (``POSIX_FADV_DONTNEED``; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def seek_costs(folder: Path, samples: int, sample_kb: int, at: float = 0.9, repeats: int = 5) -> dict:
    """Time to the first sample of a shard of ``samples`` x ``sample_kb`` KB at ``at`` of it:
    seek index (sidecar), tar-header walk, replay (read and discard), each with the page cache
    warm and cold (median of ``repeats``, ms); and at 0% for the ratio."""
    import statistics

    from sslscale.data.seek import open_at
    from sslscale.data.shards import ShardWriter
    from sslscale.data.tar import read_tar_samples

    writer, payload = ShardWriter(folder, samples_per_shard=samples), os.urandom(sample_kb * 1024)
    for i in range(samples):
        writer.write({"__key__": f"{i:08d}", "jpg": payload, "cls": i % 1000})
    manifest = writer.close("synthetic", "none")
    shard, index = Path(manifest.url(0)), Path(manifest.index_url(0))
    walk = replace(manifest, seek_index=None)
    target = int(samples * at)

    def first(m, k):
        opened = open_at(m, 0, k)
        with opened.stream:
            sample = next(itertools.islice(read_tar_samples(opened.stream, str(shard)), opened.skip, None))
        assert sample["__key__"] == f"{k:08d}", (sample["__key__"], k)

    def replay(_, k):
        with open(shard, "rb") as f:
            next(itertools.islice(read_tar_samples(f, str(shard)), k, None))

    out = {"shard_mb": shard.stat().st_size / 2**20, "index_kb": index.stat().st_size / 1024}
    for name, how, m in [("index", first, manifest), ("walk", first, walk), ("replay", replay, manifest)]:
        for cache in ("warm", "cold"):
            times = []
            for _ in range(repeats):
                if cache == "cold":
                    _cold(shard, index)
                t0 = time.perf_counter()
                how(m, target)
                times.append((time.perf_counter() - t0) * 1000)
            out[f"{name}_{cache}_ms"] = statistics.median(times)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            how(m, 0)
            times.append((time.perf_counter() - t0) * 1000)
        out[f"{name}_at0_ms"] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--samples", type=int, default=1_000_000_000)
    p.add_argument("--ranks", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--baseline-shards", type=int, default=1_000)
    p.add_argument("--baseline-samples", type=int, default=10_000_000)
    p.add_argument("--seek-samples", type=int, default=10_000, help="samples in the seek-cost shard")
    p.add_argument("--seek-sample-kb", type=int, default=100, help="KB per sample (100: a 1 GB shard)")
    p.add_argument("--short", action="store_true", help="10x smaller everywhere (a smoke run)")
    args = p.parse_args()
    scale = 10 if args.short else 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, shards, samples, offsets in [
                ("old: per-sample offsets inlined", args.baseline_shards // scale,
                 args.baseline_samples // scale, True),
                ("new: O(shards), seek index per shard", args.shards // scale, args.samples // scale, False)]:
            file = write_manifest(Path(tmp) / label[:3], shards, samples, offsets)
            ranks = max(min(args.ranks // scale, shards // args.workers), 1)  # a plan that can be dealt
            r = measure(file, ranks * args.workers, ranks, args.workers)
            rows.append((label, shards, samples, ranks, r))
    print("| manifest | shards | samples | file MB | load s | load RSS MB | one worker's reader s / MB "
          "| `data plan` ranks x workers: s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, shards, samples, ranks, r in rows:
        print(f"| {label} | {shards:,} | {samples:,} | {r['file_mb']:.1f} | {r['load_s']:.2f} | "
              f"{r['rss_mb']:.0f} | {r['reader_s']:.2f} / {r['reader_rss_mb']:.0f} | "
              f"{ranks} x {args.workers}: {r['plan_s']:.2f} |")
    old, new = rows[0][4], rows[1][4]
    per_sample_old = old["rss_mb"] / rows[0][2]
    print(f"\nold format extrapolated to {rows[1][2]:,} samples: ~{per_sample_old * rows[1][2] / 1024:.1f} GB "
          f"RSS per process; new: {new['rss_mb']:.0f} MB "
          f"({per_sample_old * rows[1][2] / max(new['rss_mb'], 1e-9):.0f}x less)")
    print(f"goals at {rows[1][1]:,} shards: load {new['load_s']:.2f} s (< 5), RSS {new['rss_mb']:.0f} MB "
          f"(< 300), data plan {new['plan_s']:.2f} s (< 10)")
    with tempfile.TemporaryDirectory() as tmp:
        seek = seek_costs(Path(tmp), args.seek_samples // scale, args.seek_sample_kb)
    print(f"\nresume at 90% of one local shard of {args.seek_samples // scale:,} samples "
          f"({seek['shard_mb']:.0f} MB; its seek index {seek['index_kb']:.0f} KB), ms to the first sample:")
    print("| way | page cache warm | cold | at 0% (warm) |")
    print("| --- | --- | --- | --- |")
    for name in ("index", "walk", "replay"):
        print(f"| {name} | {seek[name + '_warm_ms']:.2f} | {seek[name + '_cold_ms']:.2f} | "
              f"{seek[name + '_at0_ms']:.2f} |")
    print(f"the seek index is {seek['walk_warm_ms'] / seek['index_warm_ms']:.0f}x (warm) / "
          f"{seek['walk_cold_ms'] / seek['index_cold_ms']:.0f}x (cold) faster than the walk")


if __name__ == "__main__":
    main()
