"""Fast decoding in the data workers (``sslscale.data.decode``): JPEGs decoded at a reduced DCT
scale when the crop allows give the right size, stay close to a full decode + crop + resize,
and crops are a pure function of the sample's seed."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslscale.data import decode
from sslscale.data.augment import CROP, NOISE, crop_box, crop_boxes, sample_seed, uniform, uniform_scalar
from sslscale.data.decode import center_box, decode_crop, draft_scale, random_resized_box
from sslscale.data.stream import ImageDecoder, decode_image
from sslscale.data import jpeg_box

from .test_image_folder import photo

# A real photograph when Debian's lomiri-wallpapers-16.04 is installed (CC-BY-4.0).
REAL_PHOTO = Path("/usr/share/backgrounds/aitzgorri_by_Aitzol_Berasategi.jpg")


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def reference(data: bytes, box, size: int, mode: str = "RGB") -> np.ndarray:
    """Full decode, crop (whole pixels), PIL bicubic resize: (C, S, S) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert(mode)
        x0, y0, w, h = box(*im.size)
        area = (round(x0), round(y0), round(x0 + w), round(y0 + h))
        out = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=area))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    if REAL_PHOTO.is_file():
        return REAL_PHOTO.read_bytes()  # 3088 x 2056
    return encoded(photo(7, (1800, 1200)))


def test_draft_scale_keeps_the_crop_at_least_the_output_size():
    assert draft_scale(4000, 3000, 224) == 8 and draft_scale(1791, 1791, 224) == 4
    assert draft_scale(448, 900, 224) == 2 and draft_scale(447, 900, 224) == 1
    assert draft_scale(100, 100, 224) == 1  # an upscale: full resolution


@pytest.fixture(params=["box", "whole"])
def jpeg_path(request, monkeypatch) -> str:
    """Both JPEG paths: box decoding (libjpeg-turbo built here) and simplejpeg's whole image."""
    if request.param == "box" and not jpeg_box.available():
        pytest.skip(f"JPEG box decoding unavailable: {jpeg_box.unavailable()}")
    if request.param == "whole":
        monkeypatch.setattr(jpeg_box, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("box", ["center", "random"])
@pytest.mark.parametrize("channels", [3, 1])
def test_draft_decode_is_close_to_a_full_decode(big_jpeg, box, channels, jpeg_path, monkeypatch):
    import simplejpeg

    drafted, decode_box, decode_whole = [], jpeg_box.decode_box, simplejpeg.decode_jpeg

    def box_spy(data, width, scale, *args):
        drafted.append(scale)
        return decode_box(data, width, scale, *args)

    def whole_spy(data, *args, **kwargs):
        out = decode_whole(data, *args, **kwargs)
        drafted.append(simplejpeg.decode_jpeg_header(data)[1] / out.shape[1])
        return out

    monkeypatch.setattr(jpeg_box, "decode_box", box_spy)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", whole_spy)
    fn = center_box if box == "center" else random_resized_box(sample_seed(0, 1, 5), (0.5, 1.0))
    out = decode_crop(big_jpeg, 224, channels, fn)
    assert out.shape == (channels, 224, 224) and out.dtype == torch.uint8
    assert len(drafted) == 1 and drafted[0] >= 2 - 1e-3  # decoded at 1/2 or less of the width
    ref = reference(big_jpeg, fn, 224, "L" if channels == 1 else "RGB")
    diff = np.abs(out.numpy().astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 3.0, diff.mean()


def jpeg_variants() -> list[bytes]:
    """Chroma subsampling 4:2:0, 4:2:2, 4:4:4, progressive, gray, and a size that is not a
    multiple of any DCT scale or iMCU (rounded-up decodes, partial iMCUs at the edges)."""
    out = []
    for size, options in (((1001, 777), {}), ((640, 480), {"subsampling": 1}),
                          ((500, 375), {"subsampling": 0}), ((733, 501), {"progressive": True}),
                          ((517, 389), {"mode": "L"})):
        image = photo(len(out) + 3, size)
        buf = io.BytesIO()
        (image.convert("L") if options.pop("mode", None) else image).save(buf, "JPEG", quality=90, **options)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_both_jpeg_paths_give_the_pixels_of_pil_at_every_scale(big_jpeg, channels, jpeg_path):
    """The JPEG paths (box decoding, simplejpeg) and PIL's (draft + convert + crop) give the
    same array: every subsampling, progressive and gray files, boxes touching the edges."""
    cases = [(big_jpeg, 224, 0), (big_jpeg, 224, 3), (big_jpeg, 96, 5), (big_jpeg, 600, 7)]
    cases += [(data, size, seed) for data in jpeg_variants() for size, seed in ((60, 1), (100, 2), (224, 4))]
    for data, size, seed in cases:  # scales 1/8 .. 1
        for box in (random_resized_box(seed, (0.05, 1.0)), random_resized_box(seed + 9, (0.6, 1.0)),
                    center_box, lambda w, h: (0, 0, w, h), lambda w, h: (w / 2, h / 3, w / 2, h / 3)):
            fast = decode._decode_jpeg(data, size, channels, box)
            slow = decode._decode_pil(data, size, channels, box)
            np.testing.assert_array_equal(fast, slow[..., None] if slow.ndim == 2 else slow)
    cmyk = encoded(photo(2, (300, 200)).convert("CMYK"))  # PIL's CMYK conversion, not libjpeg's
    assert decode._decode_jpeg(cmyk, 96, 3, center_box) is None
    assert decode_crop(cmyk, 96, 3).shape == (3, 96, 96)
    with pytest.raises(Image.UnidentifiedImageError):  # a broken JPEG: PIL's error
        decode_crop(b"\xff\xd8\xff" + bytes(100), 96, 3)


def test_png_and_small_jpegs_decode_at_full_scale_close_to_pil():
    for fmt in ("PNG", "JPEG"):
        data = encoded(photo(3, (300, 200)), fmt)
        box = random_resized_box(11)
        out = decode_crop(data, 96, 3, box)
        assert out.shape == (3, 96, 96)
        diff = np.abs(out.numpy().astype(np.int16) - reference(data, box, 96).astype(np.int16))
        assert diff.mean() < 1.0, (fmt, diff.mean())


def test_exact_size_images_are_returned_losslessly():
    array = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    data = encoded(Image.fromarray(array), "PNG")
    np.testing.assert_array_equal(decode_crop(data, 28, 1)[0].numpy(), array)
    np.testing.assert_array_equal(decode_image(data, 28, 1)[0].numpy(), array)


def test_random_crops_are_a_pure_function_of_the_seed(big_jpeg):
    decoder = ImageDecoder(64, 3, crop="random", crop_scale=(0.2, 1.0))
    sample = {"__key__": "k", "jpg": big_jpeg, "cls": b"3"}
    seeds = [sample_seed(7, s, k) for s in range(2) for k in range(1, 4)]
    first = [decoder(sample, seed)["pixel_values"] for seed in seeds]
    again = [decoder(sample, seed)["pixel_values"] for seed in reversed(seeds)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    center = ImageDecoder(64, 3)(sample, seeds[0])["pixel_values"]
    assert torch.equal(center, ImageDecoder(64, 3)(sample, seeds[1])["pixel_values"])
    with pytest.raises(ValueError, match="unknown crop 'middle'"):
        ImageDecoder(64, 3, crop="middle")


def test_large_draws_stay_inside_their_tag():
    """A tag owns 65,536 counter values: columns past them (Gaussian noise of a 224 px RGB image)
    must not repeat the next tags' draws, and the columns below keep their values."""
    seeds = torch.tensor([sample_seed(0, 0, k) for k in range(1, 3)])
    big = uniform(seeds, 3 * 65536, NOISE)
    assert torch.equal(big[:, :65536], uniform(seeds, 65536, NOISE))
    for block in (1, 2):
        assert not torch.equal(big[:, block * 65536:(block + 1) * 65536], uniform(seeds, 65536, NOISE + block))
    assert (big[:, 65536:] != big[:, :-65536]).float().mean() > 0.99
    for start in (0, 65530, 131072):
        assert uniform_scalar(int(seeds[1]), 8, NOISE, start) == big[1, start:start + 8].tolist()


def test_scalar_crop_box_matches_the_device_boxes():
    seeds = [sample_seed(0, s, k) for s in range(3) for k in range(200)]
    for height, width, scale in [(375, 500, (0.2, 1.0)), (224, 224, (0.08, 1.0)), (60, 900, (0.5, 1.0))]:
        batched = crop_boxes(torch.tensor(seeds), CROP, height, width, scale).double()
        scalar = torch.tensor([crop_box(s, CROP, height, width, scale) for s in seeds], dtype=torch.float64)
        torch.testing.assert_close(scalar, batched, rtol=1e-5, atol=1e-3)
    box = random_resized_box(seeds[0])(500, 375)
    assert box == crop_box(seeds[0], CROP, 375, 500, (0.2, 1.0))
    assert decode.center_box(500, 375) == (62.5, 0.0, 375, 375)


def test_without_a_compiler_jpegs_decode_whole_and_say_why(big_jpeg, tmp_path):
    """No C compiler (or no libjpeg headers): box decoding is off, ``unavailable()`` names the
    cause, and decoding gives the same pixels through simplejpeg."""
    script = ("import sys, numpy as np; from sslscale.data import jpeg_box; "
              "from sslscale.data.decode import decode_crop; "
              "data = open(sys.argv[1], 'rb').read(); out = decode_crop(data, 224, 3); "
              "print(jpeg_box.available(), jpeg_box.unavailable()); np.save(sys.argv[2], out.numpy())")
    path = tmp_path / "photo.jpg"
    path.write_bytes(big_jpeg)
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False ") and "no-such-cc could not run" in done.stdout, done.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), decode_crop(big_jpeg, 224, 3).numpy())
