"""Decode only a box of a JPEG: libjpeg-turbo's partial decoding (``jpeg_crop_scanline``,
``jpeg_skip_scanlines``, an early stop), the C in ``jpeg_box.c`` beside this file.

A random resized crop keeps on average about half of an image; decoding only its box (widened
to whole iMCUs) skips the inverse DCT, upsampling and color conversion of the rest and the
entropy decoding of the rows below it: measured on 500 px photos (2026-12-07), a box of 70% of
each side decodes in 0.34 ms where the whole image takes 0.50 ms. The pixels are the whole
image's at the same DCT scale (tested against simplejpeg's).

The C is compiled once per source version with the system's C compiler against the system's
libjpeg-turbo (``cc -O2 -shared -fPIC ... -ljpeg``; Debian/Ubuntu: ``apt-get install gcc
libjpeg-dev``) into ``$TORCH_EXTENSIONS_DIR/sslscale_jpeg_box/`` (default
``~/.cache/torch_extensions``), about a second; processes that find it there just load it. Where
it cannot be built, ``decode_box`` is None (``unavailable()`` says why) and JPEGs are decoded
whole (``sslscale.data.decode``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("jpeg_box.c")
UNSUPPORTED = 1  # CMYK / YCCK: left to PIL


class JpegBoxError(ValueError):
    """libjpeg's message for bytes it cannot decode (the caller lets PIL report them)."""


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "sslscale_jpeg_box"


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why it is unavailable); built on first use."""
    if os.environ.get("SSLSCALE_JPEG_BOX") == "0":
        return None, "turned off by SSLSCALE_JPEG_BOX=0"
    source = SOURCE.read_bytes()
    path = _build_dir() / f"jpeg_box-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cc = os.environ.get("CC", "cc")
        try:
            done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-ljpeg"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            os.unlink(tmp)
            return None, f"{cc} could not run: {error}"
        if done.returncode != 0:
            os.unlink(tmp)
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            return None, f"{cc} could not build it against libjpeg-turbo ({first})"
        os.replace(tmp, path)  # atomic: concurrent builders each write their own file
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"{path} does not load: {error}"
    c_bytes, c_int, c_ulong, c_long = ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong, ctypes.c_long
    lib.sslscale_jpeg_decode_box.argtypes = [c_bytes, c_ulong, ctypes.POINTER(c_int), c_int, c_int, c_int,
                                             c_int, c_int, c_int, ctypes.c_void_p, c_long,
                                             ctypes.POINTER(c_int), c_bytes, c_int]
    lib.sslscale_jpeg_decode_box.restype = c_int
    return lib, ""


def unavailable() -> str:
    """Why box decoding is off on this machine; "" when it works."""
    return _library()[1]


def available() -> bool:
    return _library()[0] is not None


def jpeg_info(data: bytes) -> tuple[int, int, bool]:
    """``(width, height, supported)`` of a JPEG's header; ``supported`` is False for CMYK /
    YCCK (decoded by PIL). Raises ``JpegBoxError`` (libjpeg's message) on a bad header and
    ``RuntimeError`` where box decoding is unavailable."""
    info, _ = _call(data)
    return info[0], info[1], info[2] not in (4, 5)  # JCS_CMYK, JCS_YCCK


def decode_box(data: bytes, width: int, scale: int, num_channels: int,
               box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels ``box = (x0, y0, x1, y1)`` (exclusive ends, in the image decoded at
    1/``scale``, ``scale`` in 1, 2, 4, 8) of a JPEG ``width`` pixels wide (``jpeg_info``) as
    uint8 ``(y1 - y0, x1 - x0, C)``, C = ``num_channels`` (1: luma, 3: RGB). Raises
    ``JpegBoxError`` (libjpeg's message) on bytes it cannot decode, a box outside the image and
    CMYK / YCCK files, ``RuntimeError`` where box decoding is unavailable."""
    x0, y0, x1, y1 = box
    width = -(-width // scale)  # the scaled width: libjpeg rounds up
    out = np.empty((y1 - y0, width, num_channels), np.uint8)
    _, x_start = _call(data, scale, num_channels == 1, box, out)
    return out[:, x0 - x_start:x1 - x_start]


def _call(data: bytes, scale: int = 1, gray: bool = False, box: tuple[int, int, int, int] = (0, 0, 1, 1),
          out: np.ndarray | None = None) -> tuple[list[int], int]:
    """``sslscale_jpeg_decode_box`` (the header only without ``out``): ``([width, height,
    color space], the first column decoded)``."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"JPEG box decoding is unavailable: {why}")
    info, x_start, err = (ctypes.c_int * 3)(), ctypes.c_int(), ctypes.create_string_buffer(200)
    code = lib.sslscale_jpeg_decode_box(data, len(data), info, scale, int(gray), *box,
                                        None if out is None else out.ctypes.data,
                                        0 if out is None else out.strides[0], ctypes.byref(x_start),
                                        err, len(err))
    if code == UNSUPPORTED:
        raise JpegBoxError("CMYK / YCCK JPEG")
    if code != 0:
        raise JpegBoxError(err.value.decode(errors="replace"))
    return list(info), x_start.value
