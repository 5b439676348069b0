"""Per-sample random augmentation on the training device, a pure function of each sample's seed.

Every random choice (crop box, flip, color jitter, grayscale, blur, solarize, MAE's patch mask)
is drawn from a counter-based integer hash of the sample's seed and a purpose tag, computed with
tensor ops on the device. A data worker gives each sample the seed ``sample_seed(train.seed,
stream, position)``, so a sample is augmented the same way whichever rank, micro-batch, world
size or resumed run it lands in: exact resume and elastic resume need no RNG state for it, and
rank 0 and rank 7 never draw correlated crops.

The views follow SimCLR (Chen et al. 2020, arXiv 2002.05709) and BYOL / MoCo v3 (Grill et al.
2020; Chen et al. 2021, arXiv 2104.02057): random resized crop (torchvision's algorithm: 10
tries at scale x aspect, then a center crop), horizontal flip, color jitter (brightness,
contrast, saturation, hue, applied in that fixed order; torchvision's definitions) with probability ``color_jitter_prob``,
grayscale, Gaussian blur and solarization with per-view probabilities. Gray images (C=1) get
brightness and contrast only. Crops use one ``affine_grid`` + ``grid_sample`` per batch
(bilinear); color ops are kornia's, with per-sample factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import kornia.color
import kornia.enhance
import kornia.filters
import torch
import torch.nn.functional as F
from torch import nn

_M32 = 0xFFFFFFFF
_M63 = (1 << 63) - 1

# Purpose tags: every random draw of a sample uses its own tag (view v adds 32 * v).
CROP, FLIP, JITTER, GRAY, BLUR, SOLARIZE, MASK = 1, 2, 3, 4, 5, 6, 7
ROTATE, NOISE, LATENT = 8, 9, 10  # RotNet's rotations, the DAE's corruption, the VAE's epsilon
GUMBEL = 11  # wav2vec 2.0's Gumbel noise of the quantizer
DROP_PATH = 12  # fine-tuning's stochastic depth (sslscale.objectives.classify.DropPath)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_seed(seed: int, stream: int, position: int) -> int:
    """The seed (in ``[0, 2**63)``) of the sample at ``position`` (samples yielded, counting this
    one) of virtual stream ``stream`` in a run seeded ``seed``: unique per slot over all epochs."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ stream) ^ position) & _M63


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32; the
    multipliers are < 2**31 so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, n: int, tag: int) -> torch.Tensor:
    """``(B, n)`` float32 uniforms in ``[0, 1)`` (24-bit resolution) for ``seeds`` ``(B,)`` int64:
    a pure function of (seed, tag, column), identical on CPU and CUDA. Each tag owns 65,536
    counter values; columns from 65,536 on (a Gaussian-noise DAE at 224 px RGB draws 301,056)
    reuse them with their block number ``column // 65536`` hashed in, so they never run into
    another tag's columns."""
    column = torch.arange(n, device=seeds.device, dtype=torch.int64)
    counter = (column & 0xFFFF) + ((tag & 0xFFFF) << 16)
    lo, hi = (seeds & _M32)[:, None], ((seeds >> 32) & _M32)[:, None]
    h = _mix32(_mix32(_mix32(counter[None, :] ^ 0x5BD1E995) ^ hi) ^ lo)
    if n > 1 << 16:  # a size, not a value: no host sync
        block = column >> 16
        h = torch.where(block > 0, _mix32(h ^ _mix32(block)), h)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def normal(seeds: torch.Tensor, n: int, tag: int) -> torch.Tensor:
    """``(B, n)`` float32 standard normals for ``seeds`` ``(B,)`` int64 (Box-Muller on two
    :func:`uniform` draws of ``tag``): a pure function of (seed, tag, column)."""
    u = uniform(seeds, 2 * n, tag)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:, :n]))  # 1 - u in (0, 1]: finite
    return radius * torch.cos(2 * math.pi * u[:, n:])


def random_seeds(batch_size: int, device=None) -> torch.Tensor:
    """Seeds from torch's global RNG, for batches that carry no ``sample_seeds``."""
    return torch.randint(0, 2**62, (batch_size,), dtype=torch.int64, device=device)


def crop_boxes(seeds: torch.Tensor, tag: int, height: int, width: int, scale: Sequence[float],
               ratio: Sequence[float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """Random resized crop boxes ``(B, 4)`` as (x0, y0, w, h) in pixels, torchvision's algorithm:
    the first of ``tries`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) that fits, else
    the largest centered box of aspect within ``ratio``."""
    u = uniform(seeds, 4 * tries, tag).view(-1, tries, 4)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    x0 = (width - w) * u[..., 2].gather(1, first)[:, 0]
    y0 = (height - h) * u[..., 3].gather(1, first)[:, 0]
    # fallback: center crop, aspect clamped to ratio
    aspect = width / height
    fw = width if aspect <= ratio[1] else height * ratio[1]
    fh = height if aspect >= ratio[0] else width / ratio[0]
    fw, fh = min(fw, width), min(fh, height)
    ok = fits.any(dim=1)
    return torch.stack([torch.where(ok, x0, torch.full_like(x0, (width - fw) / 2)),
                        torch.where(ok, y0, torch.full_like(y0, (height - fh) / 2)),
                        torch.where(ok, w, torch.full_like(w, fw)),
                        torch.where(ok, h, torch.full_like(h, fh))], dim=1)


def _mix32_int(x: int) -> int:
    """``_mix32`` on one Python int (< 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform_scalar(seed: int, n: int, tag: int, start: int = 0) -> list[float]:
    """Columns ``start .. start+n-1`` of ``uniform(seeds=[seed], start+n, tag)[0]`` in plain
    Python (no tensors): for data workers."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    base = (tag & 0xFFFF) << 16

    def one(i: int) -> float:
        h = _mix32_int(_mix32_int(_mix32_int((base + (i & 0xFFFF)) ^ 0x5BD1E995) ^ hi) ^ lo)
        return (_mix32_int(h ^ _mix32_int(i >> 16)) if i >> 16 else h) >> 8

    return [one(i) / (1 << 24) for i in range(start, start + n)]


def crop_box(seed: int, tag: int, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float] = (3 / 4, 4 / 3), tries: int = 10) -> tuple[float, float, float, float]:
    """``crop_boxes`` for one seed in plain Python: the box ``(x0, y0, w, h)`` in pixels (the
    same draws, made only for the tries needed; float64 instead of float32, so equal to ~1e-6
    relative)."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(tries):
        a, b, c, d = uniform_scalar(seed, 4, tag, 4 * t)
        area = height * width * (scale[0] + (scale[1] - scale[0]) * a)
        r = math.exp(log_lo + (log_hi - log_lo) * b)
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= width and h <= height:
            return (width - w) * c, (height - h) * d, w, h
    aspect = width / height
    fw = min(width if aspect <= ratio[1] else height * ratio[1], width)
    fh = min(height if aspect >= ratio[0] else width / ratio[0], height)
    return (width - fw) / 2, (height - fh) / 2, fw, fh


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` ``(B, 4)`` (x0, y0, w, h pixels) of float ``images`` ``(B, C, H, W)`` and
    resize to ``(B, C, size, size)`` (bilinear); mirror rows where ``flip`` ``(B,)`` is true."""
    b, _, height, width = images.shape
    x0, y0, w, h = boxes.to(images.dtype).unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.dtype) if flip is not None else torch.ones_like(w)
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class ViewConfig:
    """One view's augmentation; probabilities in [0, 1], ``color_jitter`` is SimCLR's strength
    s (brightness / contrast / saturation 0.8 s, hue 0.2 s); 0 disables a step."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    color_jitter: float = 0.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    solarize_prob: float = 0.0


class ViewAugment(nn.Module):
    """uint8 (or [0, 1] float) images ``(B, C, H, W)`` + seeds ``(B,)`` -> normalized float views
    ``(B, C, S, S)``. ``augment=False`` only resizes (evaluation). ``mean``/``std`` are per channel
    in [0, 1] pixel units. ``view`` selects the tag space, so two views of one sample differ."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 views: Sequence[ViewConfig] = (ViewConfig(),)):
        super().__init__()
        self.size, self.views = image_size, list(views)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, seeds: torch.Tensor | None = None, *, view: int = 0,
                augment: bool = True) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if not augment:
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            return (x - self.mean) / self.std
        cfg = self.views[view]
        seeds = random_seeds(len(x), x.device) if seeds is None else seeds.to(x.device)
        base = 32 * view
        flip = (uniform(seeds, 1, base + FLIP)[:, 0] < 0.5) if cfg.hflip else None
        boxes = crop_boxes(seeds, base + CROP, x.shape[-2], x.shape[-1], cfg.crop_scale)
        x = resized_crop(x, boxes, self.size, flip)
        if cfg.color_jitter > 0 and cfg.color_jitter_prob > 0:
            x = self._jitter(x, uniform(seeds, 5, base + JITTER), cfg)
        if cfg.grayscale_prob > 0 and x.shape[1] == 3:
            gray = kornia.color.rgb_to_grayscale(x).expand_as(x)
            x = torch.where(_gate(seeds, base + GRAY, cfg.grayscale_prob), gray, x)
        if cfg.blur_prob > 0:
            sigma = 0.1 + 1.9 * uniform(seeds, 1, base + BLUR + 100)
            kernel = max(3, (self.size // 10) | 1)  # ~10% of the side, odd (SimCLR)
            blurred = kornia.filters.gaussian_blur2d(x, kernel, sigma.expand(-1, 2).contiguous())
            x = torch.where(_gate(seeds, base + BLUR, cfg.blur_prob), blurred, x)
        if cfg.solarize_prob > 0:
            x = torch.where(_gate(seeds, base + SOLARIZE, cfg.solarize_prob) & (x >= 0.5), 1.0 - x, x)
        return (x - self.mean) / self.std

    @staticmethod
    def _jitter(x: torch.Tensor, u: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
        s, on = cfg.color_jitter, (u[:, 0] < cfg.color_jitter_prob).to(x.dtype)

        def factor(col: int, spread: float, center: float = 1.0) -> torch.Tensor:
            return center + on * spread * (2 * u[:, col] - 1)

        x = (x * factor(1, 0.8 * s).view(-1, 1, 1, 1)).clamp(0, 1)  # torchvision's brightness
        x = kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor(2, 0.8 * s)).clamp(0, 1)
        if x.shape[1] == 3:
            x = kornia.enhance.adjust_saturation(x, factor(3, 0.8 * s)).clamp(0, 1)
            x = kornia.enhance.adjust_hue(x, factor(4, 0.2 * s * 2 * math.pi, 0.0)).clamp(0, 1)
        return x


def _gate(seeds: torch.Tensor, tag: int, prob: float) -> torch.Tensor:
    """``(B, 1, 1, 1)`` bool: true with probability ``prob``, per sample."""
    return (uniform(seeds, 1, tag) < prob).view(-1, 1, 1, 1)
