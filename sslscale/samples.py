"""``sslscale samples RUN_DIR --out grid.png``: what an autoencoder run has learned, as pictures.

For an objective with ``reconstruct`` (``dae``, ``vae``): the first ``num_images`` held-out
images (``eval.test_shards``, else ``data.train_shards``, in manifest order, un-augmented), one
row each of the input, the corrupted input (DAE) and the reconstruction. For an objective with
``sample`` (``vae``), ``<stem>-prior.png`` beside it: a grid of images decoded from latents
drawn from the prior N(0, I) (seeded, so the same checkpoint gives the same picture). For a
generator without reconstructions (``gan``, ``bigan``): that grid of generated images is ``out``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def image_grid(rows: list[torch.Tensor], *, scale: int = 1):
    """A PIL image of ``rows`` (each ``(B, C, S, S)`` float in [0, 1], C = 1 or 3) laid out one
    row per tensor with a 2-pixel white gap; ``scale``: nearest-neighbour upscaling factor."""
    from PIL import Image

    gap = 2
    b, c, s, _ = rows[0].shape
    canvas = torch.ones(c, len(rows) * (s + gap) - gap, b * (s + gap) - gap)
    for r, row in enumerate(rows):
        for i, image in enumerate(row.float().clamp(0, 1).cpu()):
            canvas[:, r * (s + gap):r * (s + gap) + s, i * (s + gap):i * (s + gap) + s] = image
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def prior_png(out: str | os.PathLike) -> Path:
    """Where the prior samples go beside ``out``: ``<stem>-prior.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-prior.png")


def write_samples(run_dir: str, out: str | os.PathLike, *, step: int | None = None, num_images: int = 16,
                  shards: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the reconstruction grid (and the VAE's prior grid) of a run at ``step`` (default:
    the latest complete checkpoint); returns ``{"run_dir", "step", "out", "rows", ["prior_out"]}``.
    ``FileNotFoundError`` for a missing run or checkpoint, ``ValueError`` naming the objective
    when it cannot draw pictures (not an image autoencoder), ``num_images < 1`` or the shards
    hold no image."""
    from sslscale import checkpoint
    from sslscale.data.shards import load_manifest_for
    from sslscale.data.stream import ImageDecoder, eval_batches
    from sslscale.evaluate import _load_run
    from sslscale.objectives import build_objective

    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: must be >= 1")
    cfg, folder = _load_run(run_dir, step)
    objective = build_objective(cfg)
    if not hasattr(objective, "reconstruct") and not hasattr(objective, "sample"):
        raise ValueError(f"{run_dir}: objective {cfg.objective.name} neither reconstructs nor generates "
                         "images; sslscale samples draws dae, vae, gan and bigan runs"
                         + (" (a cyclegan run writes its translation grids to RUN_DIR/images/ while it trains)"
                            if cfg.objective.name == "cyclegan" else ""))
    objective.load_state_dict(checkpoint.load_module_state(folder))
    objective.eval()
    scale = max(1, 64 // cfg.model.image_size)
    if not hasattr(objective, "reconstruct"):  # a generator only (gan, bigan)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        image_grid(list(objective.sample(4 * num_images, seed=seed).chunk(4)), scale=scale).save(out)
        return {"run_dir": str(run_dir), "step": checkpoint.step_of(folder), "out": str(out),
                "rows": ["generated"] * 4}
    key = "--shards" if shards else ("eval.test_shards" if cfg.eval.test_shards else "data.train_shards")
    manifest = load_manifest_for(key, shards or cfg.eval.test_shards or cfg.data.train_shards)
    decode = ImageDecoder.for_manifest(manifest, cfg.model.image_size, cfg.model.num_channels)
    batch = next(eval_batches(manifest, rank=0, world_size=1, batch_size=num_images, decode=decode,
                              limit=num_images), None)
    if batch is None:
        raise ValueError(f"{key} {shards or manifest.root}: no image to reconstruct")
    rows = objective.reconstruct({"pixel_values": batch["pixel_values"], "sample_seeds": batch["sample_seeds"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(list(rows.values()), scale=scale).save(out)
    result: dict[str, Any] = {"run_dir": str(run_dir), "step": checkpoint.step_of(folder),
                              "out": str(out), "rows": list(rows)}
    if hasattr(objective, "sample"):
        drawn = objective.sample(4 * num_images, seed=seed)
        image_grid(list(drawn.chunk(4)), scale=scale).save(prior_png(out))
        result["prior_out"] = str(prior_png(out))
    return result
