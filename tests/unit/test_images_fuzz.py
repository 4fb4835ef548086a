"""Property-based fuzzing of the image decoder (hypothesis, derandomized so CI is reproducible).

Property: :func:`decode_image_bytes` on any bytes either returns a finite float32 (H, W, 3)
array in [0, 1] within the limits, or raises ImageReadError naming the file; nothing else,
and quickly. Inputs: bit flips, byte changes, truncations, insertions, deletions and
"interesting" integers written over valid PNG / JPEG / TIFF / BMP / WebP / GIF files, and
random bytes after each magic number.
"""

from __future__ import annotations

import io
import time
from datetime import timedelta

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from defectlens.data.images import DecodeLimits, as_float_rgb, decode_image_bytes
from defectlens.errors import ImageReadError

LIMITS = DecodeLimits(
    max_pixels=2_000_000,
    max_side=4096,
    max_decoded_bytes=64 * 2**20,
    formats=("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"),
    multi_frame="first",  # decode more of what the mutations make
)
SECONDS_PER_DECODE = 3.0
FUZZ = settings(
    max_examples=800,
    deadline=timedelta(seconds=SECONDS_PER_DECODE),
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _pil(array, fmt, mode=None, **save):
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, fmt, **save)
    return buffer.getvalue()


def _save(image, fmt, **save):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _tiff(array, **write):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **write)
    return buffer.getvalue()


def _seeds() -> dict:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1].copy())]
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:])
    return {
        "png": _pil(rgb, "PNG"),
        "png_palette": _save(Image.fromarray(rgb).quantize(16), "PNG", transparency=3),
        "png_la": _pil(rgb[:, :, :2].copy(), "PNG", mode="LA"),
        "png_rgb16": cv2.imencode(".png", rgb16)[1].tobytes(),
        "apng": apng.getvalue(),
        "jpeg": _pil(rgb, "JPEG"),
        "jpeg_progressive": _pil(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _pil(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "JPEG", mode="CMYK"),
        "tiff": _tiff(rgb),
        "tiff_deflate": _tiff(rgb, compression="zlib"),
        "tiff_float": _tiff(rgb[:, :, 0].astype(np.float32) / 255),
        "tiff_lzw16": cv2.imencode(".tiff", rgb16)[1].tobytes(),
        "tiff_pil_lzw": _pil(rgb, "TIFF", compression="tiff_lzw"),
        "tiff_pages": _tiff(np.stack([rgb, rgb])),
        "bmp": _pil(rgb, "BMP"),
        "bmp_rle": _pil(rgb[:, :, 0], "BMP", mode="L"),
        "webp": _pil(rgb, "WEBP"),
        "webp_lossless": _pil(rgb, "WEBP", lossless=True),
        "gif": _pil(rgb, "GIF"),
    }


SEEDS = _seeds()
MAGICS = [
    b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\xff\xd8\xff\xc0\x00\x11\x08", b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00", b"BM",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"RIFF\x00\x01\x00\x00WEBPVP8L", b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"GIF87a", b"GIF89a",
]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def mutated_files(draw, header_only: bool = False):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 5))):
        if not data:
            break
        span = min(len(data), 96) if header_only else len(data)
        pos = draw(st.integers(0, span - 1))
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "repeat", "integer"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[max(pos, 1) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=48))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 48))]
        elif op == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
        else:
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
    return name, bytes(data)


def check_decode(data: bytes, name: str) -> None:
    start = time.perf_counter()
    try:
        image = decode_image_bytes(data, name, limits=LIMITS)
    except ImageReadError as error:
        assert name in str(error)
    else:
        assert isinstance(image, np.ndarray) and image.dtype == np.float32
        assert image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous
        height, width = image.shape[:2]
        assert 0 < height <= LIMITS.max_side and 0 < width <= LIMITS.max_side
        assert height * width <= LIMITS.max_pixels
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert time.perf_counter() - start < SECONDS_PER_DECODE


def test_seed_files_decode():
    for name, data in SEEDS.items():
        image = decode_image_bytes(data, name, limits=LIMITS)
        assert image.shape == (12, 16, 3), name


@FUZZ
@given(mutated_files())
def test_mutated_files_decode_or_raise_image_read_error(case):
    name, data = case
    check_decode(data, f"mutated_{name}.bin")


@FUZZ
@given(mutated_files(header_only=True))
def test_mutated_headers_decode_or_raise_image_read_error(case):
    name, data = case
    check_decode(data, f"header_{name}.bin")


@settings(FUZZ, max_examples=500)
@given(st.sampled_from(MAGICS), st.binary(max_size=4096))
def test_random_bytes_after_magic_numbers_raise_image_read_error(magic, tail):
    check_decode(magic + tail, "random.bin")


ARRAY_DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.uint32, np.float16, np.float32, np.float64, np.bool_,
     np.complex64]
)


@settings(FUZZ, max_examples=300)
@given(hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
def test_as_float_rgb_accepts_or_raises_image_read_error(array):
    try:
        image = as_float_rgb(array, "<fuzzed>")
    except ImageReadError as error:
        assert "<fuzzed>" in str(error)
    else:
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[:2] == array.shape[:2]
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_truncation_point_of_small_files(name):
    # exhaustive where the files are small: every prefix of the first 300 bytes
    data = SEEDS[name]
    for cut in range(1, min(len(data), 300)):
        check_decode(data[:cut], f"prefix_{name}.bin")
