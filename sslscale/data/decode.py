"""Image bytes: what ``data prepare image-folder`` stores, and how data-loader workers decode it.

Storing (``stored_image``): JPEG, PNG and WebP files are kept byte for byte (no re-encode: no
generation loss, and preparing is I/O-bound); other formats (BMP, GIF, TIFF...) become PNG, or
JPEG with ``fmt="jpg"``. An image whose longer side exceeds ``max_size`` is shrunk to it
(aspect kept, Lanczos) and re-encoded: JPEG quality 95 for JPEG files, else as ``fmt``.

Decoding (``decode_crop``) takes a crop box in the original image's pixels and returns it
resized to ``(S, S)`` as uint8 ``(C, S, S)`` (C = 1 gray or 3 RGB; normalization happens on the
device). For a JPEG the box first picks libjpeg's DCT scaling: the largest of 1/8, 1/4, 1/2 that
still leaves the box at least ``S`` pixels wide and high, so a 4000x3000 photo cropped to 224
decodes an eighth of its width and height; gray output decodes the luma channel only. Of that,
libjpeg-turbo decodes only the box (``sslscale.data.jpeg_box``: partial decoding, built on
first use; a random resized crop keeps about half of an image) where a C compiler and
libjpeg-turbo's headers are there, else the whole image through simplejpeg: the same pixels
either way, and the same as PIL's decoder and its ``Image.draft`` scaling, in about half of PIL's
time per image for the whole image. CMYK / YCCK JPEGs and what libjpeg refuses (broken files,
which PIL then reports) go to PIL. Then only the box (rounded to whole pixels) is resized,
with torch's vectorized uint8 antialiased bicubic kernel (the same filter as PIL's bicubic
``resize``, mean difference well under one level, ~3x faster on one core). Other formats (PNG,
WebP...) decode at full size, then crop and resize the same way.

Boxes: ``center_box``, the largest centered square (what training workers hand the device,
whose augmentation crops from it: ``sslscale.data.augment``), and ``random_resized_box``,
torchvision's RandomResizedCrop box as a pure function of the sample's seed
(``augment.crop_box``), for pipelines that crop in the workers.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from sslscale.data import jpeg_box
from sslscale.data.shards import encode_image

if TYPE_CHECKING:
    import torch

# (width, height) -> crop box (x0, y0, w, h) in pixels of that image
Box = tuple[float, float, float, float]
BoxFn = Callable[[int, int], Box]
JPEG_SCALES = (8, 4, 2)
PASSTHROUGH = ("jpg", "png", "webp")  # stored as they are
GRAY_MODES = ("1", "L", "I;16", "I;16B", "I;16L")  # stored images the decoder makes 1-channel


def center_box(width: int, height: int) -> Box:
    """The largest centered square of a ``width`` x ``height`` image: ``(x0, y0, side, side)``."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side, side


def random_resized_box(seed: int, scale: tuple[float, float] = (0.2, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), tag: int | None = None) -> BoxFn:
    """The box function of torchvision's RandomResizedCrop for the sample seeded ``seed`` (area
    fraction ~ U(``scale``), log aspect ~ U(log ``ratio``), 10 tries then a center crop): the
    same draws as the device's ``augment.crop_boxes`` for that seed and ``tag`` (default: view
    0's crop tag), in the original image's pixels."""
    from sslscale.data.augment import CROP, crop_box

    return lambda width, height: crop_box(seed, CROP if tag is None else tag, height, width, scale, ratio)


def draft_scale(box_w: float, box_h: float, size: int) -> int:
    """The largest JPEG DCT scale denominator (8, 4, 2, else 1) that leaves a ``box_w`` x
    ``box_h`` box at least ``size`` pixels on both sides."""
    return next((s for s in JPEG_SCALES if box_w >= size * s and box_h >= size * s), 1)


def _pixel_box(box: Box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (original pixels) in an image decoded at 1/``scale`` of ``width`` x ``height``
    pixels, rounded to whole pixels (as torchvision's crops are): ``(x0, y0, x1, y1)``, >= 1
    pixel wide and high, inside the image."""
    x0, y0, bw, bh = (v / scale for v in box)
    xa, ya = min(max(round(x0), 0), width - 1), min(max(round(y0), 0), height - 1)
    xb, yb = min(max(round(x0 + bw), xa + 1), width), min(max(round(y0 + bh), ya + 1), height)
    return xa, ya, xb, yb


def decode_crop(data: bytes, size: int, num_channels: int, box: BoxFn = center_box) -> torch.Tensor:
    """Image bytes -> uint8 ``(C, size, size)``: the crop ``box(width, height)`` of the image,
    gray (C=1) or RGB (C=3), resized with antialiased bicubic interpolation (torch's vectorized
    uint8 kernel; PIL's ``resize(BICUBIC)`` filter). JPEGs are
    decoded at the smallest DCT scale that keeps the box >= ``size`` pixels (module docstring).
    An image of exactly ``size`` x ``size`` whose box is the whole image is returned unresampled
    (lossless). Raises PIL's errors on undecodable bytes."""
    import torch  # here: ``data prepare``'s pool workers import this module without torch
    import torch.nn.functional as F

    array = _decode_jpeg(data, size, num_channels, box) if sniff(data) == "jpg" else None
    if array is None:
        array = _decode_pil(data, size, num_channels, box)
    array = array[..., None] if array.ndim == 2 else array  # (h, w, C)
    if array.shape[:2] == (size, size):  # nothing to resample: a writable (C, S, S) copy
        return torch.from_numpy(array.transpose(2, 0, 1).copy())
    with warnings.catch_warnings():  # torch warns once that it is read-only: it is only read
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, C, h, w), channels-last
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)[0]


def _decode_jpeg(data: bytes, size: int, num_channels: int, box: BoxFn) -> np.ndarray | None:
    """The box of a JPEG as ``(h, w, C)`` uint8, decoded at ``draft_scale``: only the box
    (libjpeg-turbo's partial decoding, ``sslscale.data.jpeg_box``) where that is built, else
    the whole image by simplejpeg; None for CMYK / YCCK and what libjpeg cannot decode (corrupt:
    PIL then decodes or reports)."""
    if jpeg_box.available():
        try:
            width, height, supported = jpeg_box.jpeg_info(data)
            if not supported:
                return None
            crop = box(width, height)
            s = draft_scale(crop[2], crop[3], size)  # libjpeg scales by exactly 1/s, rounding up
            pixel_box = _pixel_box(crop, s, -(-width // s), -(-height // s))
            return jpeg_box.decode_box(data, width, s, num_channels, pixel_box)
        except jpeg_box.JpegBoxError:
            return None
    return _decode_jpeg_whole(data, size, num_channels, box)


def _decode_jpeg_whole(data: bytes, size: int, num_channels: int, box: BoxFn) -> np.ndarray | None:
    """``_decode_jpeg`` by simplejpeg, which decodes the whole image (at ``draft_scale``)."""
    import simplejpeg

    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):  # CMYK / YCCK (Adobe's inversion): PIL's way
            return None
        crop = box(width, height)
        s = draft_scale(crop[2], crop[3], size)  # libjpeg picks n/8 >= 1/s: exactly 1/s
        array = simplejpeg.decode_jpeg(data, "GRAY" if num_channels == 1 else "RGB",
                                       min_width=-(-width // s), min_height=-(-height // s))
    except ValueError:
        return None
    # libjpeg scales by exactly 1/s and rounds the size up: width / decoded width is not the scale
    scale = s if array.shape[1] == -(-width // s) else width / array.shape[1]
    x0, y0, x1, y1 = _pixel_box(crop, scale, array.shape[1], array.shape[0])
    return array[y0:y1, x0:x1]


def _decode_pil(data: bytes, size: int, num_channels: int, box: BoxFn) -> np.ndarray:
    """The box of any image PIL reads as ``(h, w)`` or ``(h, w, C)`` uint8 (JPEGs at
    ``draft_scale``); PIL's errors on undecodable bytes."""
    from PIL import Image

    mode = "L" if num_channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        crop = box(width, height)
        scale = 1.0
        if im.format == "JPEG":
            s = draft_scale(crop[2], crop[3], size)
            if s > 1 or (mode == "L" and im.mode != "L"):
                drafted = im.draft(mode, (width // s, height // s))  # picks exactly scale s
                if drafted is not None:
                    scale = width / drafted[1][2]
        if im.mode != mode:
            im = im.convert(mode)
        x0, y0, x1, y1 = _pixel_box(crop, scale, *im.size)
        if (x0, y0, x1, y1) != (0, 0, *im.size):
            im = im.crop((x0, y0, x1, y1))  # only the box is copied out of PIL
        return np.asarray(im)  # read-only (PIL's bytes)


@dataclass
class StoredImage:
    """One image as ``data prepare image-folder`` stores it."""

    ext: str  # the member extension: jpg, png or webp
    data: bytes
    size: tuple[int, int]  # (width, height) as stored
    channels: int  # 1 or 3: what the decoder's conversion gives (gray modes -> 1)
    passthrough: bool  # the file's own bytes


def sniff(data: bytes) -> str | None:
    """``jpg``, ``png`` or ``webp`` by the bytes' magic number; None for other formats."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


def stored_image(path: str | os.PathLike, max_size: int | None = None, fmt: str = "png") -> StoredImage:
    """What ``image-folder`` stores for the file ``path``: its own bytes when it is JPEG, PNG or
    WebP, its longer side is <= ``max_size`` (None: any) and ``fmt="jpg"`` does not ask for
    JPEG; else the image re-encoded (shrunk, aspect kept, Lanczos, when over ``max_size``): JPEG
    quality 95 for JPEG files and with ``fmt="jpg"``, PNG (lossless) otherwise. Raises
    ``OSError`` (PIL's ``UnidentifiedImageError`` too) for a file PIL cannot read."""
    from PIL import Image

    data = Path(path).read_bytes()
    kind = sniff(data)
    with Image.open(io.BytesIO(data)) as im:
        (width, height), channels = im.size, 1 if im.mode in GRAY_MODES else 3
        too_big = max_size is not None and max(width, height) > max_size
        if kind in PASSTHROUGH and not too_big and (fmt == "png" or kind == "jpg"):
            return StoredImage(kind, data, (width, height), channels, True)
        target = (width, height)
        if too_big:
            ratio = max_size / max(width, height)
            target = (max(1, round(width * ratio)), max(1, round(height * ratio)))
            if im.format == "JPEG":  # decode at a DCT scale still >= 2x the target
                im.draft(im.mode, (2 * target[0], 2 * target[1]))
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != target:
            im = im.resize(target, Image.Resampling.LANCZOS)
        ext = "jpg" if kind == "jpg" or fmt == "jpg" else "png"
        return StoredImage(ext, encode_image(np.asarray(im), ext), target, channels, False)
