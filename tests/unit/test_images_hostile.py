"""Hostile uploads: bombs, truncations, corrupt chunks, odd pixels and formats all end as ImageReadError.

Every refusal is checked to name the file, and the bombs to be refused from the header: fast
and without allocating the image they claim.
"""

from __future__ import annotations

import io
import resource
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, features

from defectlens.data.images import (
    DecodeLimits,
    as_float_rgb,
    decode_image_bytes,
    get_decode_limits,
    identify_format,
    is_image_file,
    read_image,
    read_mask,
    set_decode_limits,
)
from defectlens.errors import ConfigError, ImageFormatError, ImageReadError, ImageTooLargeError

ALL_FORMATS = DecodeLimits(formats=("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"))
FIRST_FRAME = DecodeLimits(formats=ALL_FORMATS.formats, multi_frame="first")
RNG = np.random.default_rng(1234)
PIXELS = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- builders


def pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **write) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **write)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def craft_png(width: int, height: int, *, depth: int = 8, color: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR claims any size, with a tiny IDAT (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list:
    """[(offset, length, type)] of a PNG's chunks."""
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((pos, length, kind))
        pos += 12 + length
    return out


def craft_tiff(width, height, strips, *, bits=8, samples=1, sampleformat=1, photometric=1, compression=1) -> bytes:
    """A little-endian classic TIFF with the given strips (raw bytes, already compressed)."""
    data = b"".join(strips)
    offsets, position = [], 8
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    ifd_offset = 8 + len(data) + (len(data) % 2)
    tags = [
        (256, 4, [width]), (257, 4, [height]), (258, 3, [bits] * samples), (259, 3, [compression]),
        (262, 3, [photometric]), (273, 4, offsets), (277, 3, [samples]),
        (278, 4, [max(1, -(-height // len(strips)))]), (279, 4, [len(s) for s in strips]),
        (339, 3, [sampleformat] * samples),
    ]
    extra_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for tag, kind, values in tags:
        packed = b"".join(struct.pack("<H" if kind == 3 else "<I", v) for v in values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", extra_offset + len(extra))
            extra += packed
        entries += struct.pack("<HHI", tag, kind, len(values)) + field
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + data + b"\x00" * (len(data) % 2) + ifd + extra


def zlib_zeros(megabytes: int) -> bytes:
    """A zlib stream of `megabytes` MiB of zeros, made without holding them."""
    compressor, block = zlib.compressobj(9), bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(megabytes)) + compressor.flush()


def jpeg_sof_offset(data: bytes) -> int:
    pos = 2
    while True:
        marker = data[pos + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return pos
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]


def gif_descriptor_offset(data: bytes) -> int:
    pos = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extension blocks
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C
    return pos


def webp_vp8x(width: int, height: int) -> bytes:
    """A WebP whose VP8X chunk claims a canvas of any size (up to 2**24), then a tiny image."""
    small = pil_bytes(PIXELS, "WEBP", lossless=True)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + small[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bounded(call, *, seconds: float = 1.0, traced_mb: float = 32, rss_mb: float = 200):
    """Run call(); assert it took < seconds, traced allocations stayed < traced_mb and the
    process's peak RSS grew < rss_mb. Returns the exception it raised (or None)."""
    rss_before = maxrss_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    raised = None
    try:
        call()
    except Exception as error:  # examined by the caller
        raised = error
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert peak < traced_mb * 2**20, f"allocated {peak / 2**20:.0f} MiB"
    assert maxrss_bytes() - rss_before < rss_mb * 2**20, "peak RSS grew"
    return raised


# --------------------------------------------------------------------------- bombs


def _patched_jpeg(width: int, height: int) -> bytes:
    data = bytearray(pil_bytes(PIXELS, "JPEG"))
    struct.pack_into(">HH", data, jpeg_sof_offset(data) + 5, height, width)
    return bytes(data)


def _patched_gif_screen() -> bytes:
    data = bytearray(pil_bytes(PIXELS, "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)
    return bytes(data)


def _patched_gif_frame() -> bytes:
    # a small logical screen, a first frame claiming 8000 x 8000: Pillow grows the image to it
    data = bytearray(pil_bytes(PIXELS, "GIF"))
    struct.pack_into("<HH", data, gif_descriptor_offset(data) + 5, 8000, 8000)
    return bytes(data)


def _patched_bmp() -> bytes:
    data = bytearray(pil_bytes(PIXELS, "BMP"))
    struct.pack_into("<ii", data, 18, 100_000, 100_000)
    return bytes(data)


def _patched_webp_vp8l() -> bytes:
    data = bytearray(pil_bytes(PIXELS, "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = (16383) | (16383 << 14) | (struct.unpack_from("<I", data, 21)[0] & ~((1 << 28) - 1))
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


BOMBS = {
    "png_100000_square": (lambda: craft_png(100_000, 100_000), "max_side"),
    "png_13000_square": (lambda: craft_png(13_000, 13_000), "max_pixels"),
    "png_16bit_rgba_huge": (lambda: craft_png(16_000, 16_000, depth=16, color=6), "max_pixels"),
    "tiff_float64_14000": (
        lambda: craft_tiff(14_000, 14_000, [zlib.compress(bytes(4096))], bits=64, sampleformat=3, compression=8),
        "max_pixels",
    ),
    "tiff_float64_rgba_5000": (
        lambda: craft_tiff(5000, 5000, [zlib.compress(bytes(4096))], bits=64, samples=4, sampleformat=3,
                           photometric=2, compression=8),
        "max_decoded_bytes",
    ),
    "tiff_zlib_bomb_strip": (lambda: craft_tiff(64, 64, [zlib_zeros(48)], compression=8), "max_decoded_bytes"),
    "jpeg_60000_square": (lambda: _patched_jpeg(60_000, 60_000), "max_side"),
    "jpeg_9000_square": (lambda: _patched_jpeg(9000, 9000), "max_pixels"),
    "gif_screen_65535": (_patched_gif_screen, "max_side"),
    "gif_frame_8000": (_patched_gif_frame, "max_pixels"),
    "webp_vp8x_2_24": (lambda: webp_vp8x(1 << 24, 1 << 24), "max_side"),
    "webp_vp8l_16384": (_patched_webp_vp8l, "max_pixels"),
    "bmp_100000_square": (_patched_bmp, "max_side"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_bombs_are_refused_from_the_header_fast_and_small(case):
    make, limit = BOMBS[case]
    data = make()
    assert len(data) < 2 * 2**20  # small on disk
    error = bounded(lambda: decode_image_bytes(data, f"{case}.upload", limits=ALL_FORMATS))
    assert isinstance(error, ImageTooLargeError), repr(error)
    assert error.limit == limit
    assert f"{case}.upload" in str(error) and "too large" in str(error)


def test_bomb_limits_are_named_in_the_message():
    with pytest.raises(ImageTooLargeError, match=r"DecodeLimits\.max_pixels") as error:
        decode_image_bytes(craft_png(13_000, 13_000), "big.png")
    assert error.value.value == 13_000 * 13_000 and error.value.maximum == 50_000_000
    assert isinstance(error.value, ImageReadError)


def test_limits_per_call_and_process_wide():
    data = pil_bytes(PIXELS, "PNG")  # 32 x 24
    assert decode_image_bytes(data, "ok.png").shape == (24, 32, 3)
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        decode_image_bytes(data, "small_limit.png", limits=DecodeLimits(max_pixels=500))
    with pytest.raises(ImageTooLargeError, match="max_side"):
        decode_image_bytes(data, "side.png", limits=DecodeLimits(max_side=31))
    with pytest.raises(ImageTooLargeError, match="max_decoded_bytes"):
        decode_image_bytes(data, "bytes.png", limits=DecodeLimits(max_decoded_bytes=1000))
    with pytest.raises(ImageTooLargeError, match="max_file_bytes"):
        decode_image_bytes(data, "file.png", limits=DecodeLimits(max_file_bytes=100))
    previous = set_decode_limits(max_pixels=500)
    try:
        assert get_decode_limits().max_pixels == 500 and previous.max_pixels == 50_000_000
        with pytest.raises(ImageTooLargeError):
            decode_image_bytes(data, "global.png")
        assert decode_image_bytes(data, "override.png", limits=DecodeLimits()).shape == (24, 32, 3)
    finally:
        set_decode_limits(previous)
    assert get_decode_limits() == DecodeLimits()


def test_read_image_checks_the_file_size_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(pil_bytes(PIXELS, "PNG"))
    with pytest.raises(ImageTooLargeError, match="max_file_bytes") as error:
        read_image(path, limits=DecodeLimits(max_file_bytes=64))
    assert str(path) in str(error.value)


def test_jpeg_scan_count_is_limited():
    progressive = pil_bytes(PIXELS, "JPEG", progressive=True)
    assert decode_image_bytes(progressive, "p.jpg").shape == (24, 32, 3)
    with pytest.raises(ImageTooLargeError, match="scans") as error:
        decode_image_bytes(progressive, "p.jpg", limits=DecodeLimits(max_jpeg_scans=3))
    assert error.value.limit == "max_jpeg_scans"


def test_pillows_own_bomb_check_is_an_image_read_error():
    generous = DecodeLimits(max_pixels=10**12, max_side=10**6, max_decoded_bytes=10**15)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS") as error:
        decode_image_bytes(craft_png(20_000, 10_000), "pil_error.png", limits=generous)
    assert error.value.limit == "PIL.Image.MAX_IMAGE_PIXELS"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
            decode_image_bytes(craft_png(10_000, 10_000), "pil_warning.png", limits=generous)


# --------------------------------------------------------------------------- broken files


def _valid_files() -> dict:
    return {
        "png": pil_bytes(PIXELS, "PNG"),
        "png_optimized": pil_bytes(PIXELS, "PNG", optimize=True),
        "png_gray16": pil_bytes(PIXELS[:, :, 0].astype(np.uint16) * 257, "PNG"),
        "jpeg": pil_bytes(PIXELS, "JPEG"),
        "jpeg_progressive": pil_bytes(PIXELS, "JPEG", progressive=True),
        "tiff_pil": pil_bytes(PIXELS, "TIFF"),
        "tiff_lzw": pil_bytes(PIXELS, "TIFF", compression="tiff_lzw"),
        "tiff_tifffile": tiff_bytes(PIXELS),
        "tiff_deflate": tiff_bytes(PIXELS, compression="zlib"),
        "tiff_float": tiff_bytes(PIXELS[:, :, 0].astype(np.float32) / 255),
        "bmp": pil_bytes(PIXELS, "BMP"),
        "webp": pil_bytes(PIXELS, "WEBP"),
        "webp_lossless": pil_bytes(PIXELS, "WEBP", lossless=True),
        "gif": pil_bytes(PIXELS, "GIF"),
    }


VALID = _valid_files()


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_files_decode(kind):
    image = decode_image_bytes(VALID[kind], f"{kind}.bin", limits=ALL_FORMATS)
    assert image.shape == (24, 32, 3) and image.dtype == np.float32 and image.flags.c_contiguous
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("kind", sorted(VALID))
def test_truncated_files_are_refused(kind, fraction):
    data = VALID[kind][: max(1, int(len(VALID[kind]) * fraction))]
    with pytest.raises(ImageReadError) as error:
        decode_image_bytes(data, f"cut_{kind}.bin", limits=ALL_FORMATS)
    assert f"cut_{kind}.bin" in str(error.value)


@pytest.mark.parametrize("kind", sorted(set(VALID) - {"gif"}))
def test_missing_last_byte_is_refused(kind):
    # (a GIF cut by one byte loses only its trailer; its pixels are complete)
    with pytest.raises(ImageReadError):
        decode_image_bytes(VALID[kind][:-1], f"{kind}.bin", limits=ALL_FORMATS)


MAGICS = {
    "png": b"\x89PNG\r\n\x1a\n",
    "png_ihdr": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    "jpeg": b"\xff\xd8\xff",
    "jpeg_jfif": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "tiff_le": b"II*\x00",
    "tiff_be": b"MM\x00*",
    "bigtiff": b"II+\x00\x08\x00\x00\x00",
    "bmp": b"BM",
    "webp_vp8": b"RIFF\xff\xff\x00\x00WEBPVP8 ",
    "webp_vp8l": b"RIFF\xff\xff\x00\x00WEBPVP8L",
    "webp_vp8x": b"RIFF\xff\xff\x00\x00WEBPVP8X",
    "gif87": b"GIF87a",
    "gif89": b"GIF89a",
}


@pytest.mark.parametrize("magic", sorted(MAGICS))
def test_random_bytes_after_a_magic_number_are_an_image_read_error(magic):
    rng = np.random.default_rng(sum(magic.encode()))
    for trial in range(30):
        data = MAGICS[magic] + rng.bytes(int(rng.integers(0, 3000)))
        name = f"random_{magic}_{trial}.bin"
        try:
            decode_image_bytes(data, name, limits=ALL_FORMATS)
        except ImageReadError as error:
            assert name in str(error)
        else:  # pragma: no cover - would need a lucky valid image
            pytest.fail(f"{name} decoded")


def test_tiff_garbage_is_not_an_index_error():
    # the hostile-upload finding: TIFF signature + junk raised IndexError from the decoder
    for seed in range(20):
        data = b"II*\x00" + np.random.default_rng(seed).bytes(64)
        with pytest.raises(ImageReadError, match="not a readable image"):
            decode_image_bytes(data, "junk.tif")


def _corrupt_chunk(kind: bytes, where: str) -> bytes:
    data = bytearray(pil_bytes(PIXELS, "PNG", pnginfo=_text_info()))
    for offset, length, chunk in png_chunks(bytes(data)):
        if chunk == kind:
            index = offset + 8 if where == "data" else offset + 8 + length
            data[index] ^= 0x5A
            return bytes(data)
    raise AssertionError(kind)


def _text_info():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return info


@pytest.mark.parametrize(
    "kind, where",
    [(b"IHDR", "data"), (b"IHDR", "crc"), (b"tEXt", "data"), (b"tEXt", "crc"), (b"IDAT", "data"), (b"IDAT", "crc"),
     (b"IEND", "crc")],
)
def test_png_chunk_with_a_bad_crc_is_refused(kind, where):
    with pytest.raises(ImageReadError, match="CRC"):
        decode_image_bytes(_corrupt_chunk(kind, where), "crc.png")


def test_png_structure_errors():
    good = pil_bytes(PIXELS, "PNG")
    chunks = png_chunks(good)
    iend = chunks[-1][0]
    # huge chunk length
    broken = bytearray(good)
    struct.pack_into(">I", broken, chunks[1][0], 0x7FFFFFF0)
    with pytest.raises(ImageReadError, match="truncated"):
        decode_image_bytes(bytes(broken), "length.png")
    with pytest.raises(ImageReadError, match="IEND"):
        decode_image_bytes(good[:iend], "no_iend.png")
    with pytest.raises(ImageReadError, match="IHDR"):
        decode_image_bytes(good[:8] + png_chunk(b"IDAT", b"x") + good[8:], "order.png")
    with pytest.raises(ImageReadError, match="bit depth"):
        decode_image_bytes(craft_png(4, 4, depth=7), "depth.png")
    # IDAT with a valid CRC but a broken zlib stream
    with pytest.raises(ImageReadError, match="not a readable image"):
        decode_image_bytes(craft_png(4, 4, idat=b"\x78\x9c" + b"\xff" * 20), "zlib.png")
    no_idat = good[:8] + png_chunk(b"IHDR", good[16:29]) + png_chunk(b"IEND", b"")
    with pytest.raises(ImageReadError, match="IDAT"):
        decode_image_bytes(no_idat, "no_idat.png")


def test_tiff_strips_past_the_end_and_zlib_errors():
    with pytest.raises(ImageReadError, match="truncated"):
        decode_image_bytes(tiff_bytes(PIXELS)[:-50], "short.tif")
    with pytest.raises(ImageReadError, match="not a readable image"):
        decode_image_bytes(craft_tiff(8, 8, [b"\x78\x9c" + b"\x13" * 40], compression=8), "zlib.tif")


def test_jpeg_structure_errors():
    good = pil_bytes(PIXELS, "JPEG")
    with pytest.raises(ImageReadError, match="end-of-image"):
        decode_image_bytes(good[:-2], "no_eoi.jpg")
    with pytest.raises(ImageReadError, match="frame header"):
        decode_image_bytes(b"\xff\xd8\xff\xd9", "empty.jpg")


# --------------------------------------------------------------------------- pixel content


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_non_finite_float_tiff_is_refused(bad, dtype, compression):
    pixels = np.full((6, 5), 0.5, dtype=dtype)
    pixels[2, 3] = bad
    with pytest.raises(ImageReadError, match="NaN or infinite") as error:
        decode_image_bytes(tiff_bytes(pixels, compression=compression), "nan.tif")
    assert "nan.tif" in str(error.value) and "1 of 30" in str(error.value)


def test_non_finite_float_tiff_written_by_pillow_is_refused():
    pixels = np.full((4, 4), 0.25, dtype=np.float32)
    pixels[0, 0] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        decode_image_bytes(pil_bytes(pixels, "TIFF", mode="F"), "nan_pil.tif")


def test_float_tiff_range_is_kept_not_rescaled():
    pixels = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    np.testing.assert_array_equal(decode_image_bytes(tiff_bytes(pixels), "f.tif")[:, :, 1], pixels)
    with pytest.raises(ImageReadError, match=r"outside \[0, 1\]"):
        decode_image_bytes(tiff_bytes(pixels * 255), "f255.tif")
    with pytest.raises(ImageReadError, match=r"outside \[0, 1\]"):
        decode_image_bytes(tiff_bytes(pixels - 0.5), "negative.tif")
    tolerated = pixels.copy()
    tolerated[0, 0] = 1.00005
    assert decode_image_bytes(tiff_bytes(tolerated), "tol.tif").max() == 1.0


def test_sixteen_bit_colour_png_keeps_sixteen_bits():
    import cv2

    rgb = np.zeros((3, 4, 3), dtype=np.uint16)
    rgb[0, 0] = [1, 257, 65535]
    rgb[2, 3] = [40000, 3, 12345]
    data = cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes()
    image = decode_image_bytes(data, "rgb16.png")
    np.testing.assert_allclose(image, rgb / 65535.0, rtol=0, atol=1e-7)
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 65535, np.uint16)], axis=2)
    rgba[0, 0, 3] = 32768
    data = cv2.imencode(".png", rgba[:, :, [2, 1, 0, 3]])[1].tobytes()
    expected = rgb / 65535.0 * (rgba[:, :, 3:] / 65535.0)
    np.testing.assert_allclose(decode_image_bytes(data, "rgba16.png"), expected, rtol=0, atol=1e-6)


def test_sixteen_bit_tiffs_keep_sixteen_bits():
    gray = np.array([[1, 257], [65535, 40000]], dtype=np.uint16)
    np.testing.assert_allclose(decode_image_bytes(tiff_bytes(gray), "g16.tif")[:, :, 2], gray / 65535.0, atol=1e-7)
    rgb = np.stack([gray, gray[::-1], gray.T], axis=2)
    for compression in (None, "zlib"):
        image = decode_image_bytes(tiff_bytes(rgb, compression=compression), "rgb16.tif")
        np.testing.assert_allclose(image, rgb / 65535.0, atol=1e-7)
    planar = decode_image_bytes(tiff_bytes(np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate"), "p.tif")
    np.testing.assert_allclose(planar, rgb / 65535.0, atol=1e-7)


def test_sixteen_bit_gray_png_dark_values_use_65535():
    pixels = np.array([[0, 100], [255, 200]], dtype=np.uint16)  # all <= 255, still 16-bit
    image = decode_image_bytes(pil_bytes(pixels, "PNG"), "dark16.png")
    np.testing.assert_allclose(image[:, :, 0], pixels / 65535.0, atol=1e-8)


def test_palette_png_with_and_without_transparency(tmp_path):
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([10, 20, 30, 200, 100, 0, 255, 255, 255] + [0] * 759)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    np.testing.assert_allclose(decode_image_bytes(buffer.getvalue(), "p.png")[0, 1], [200 / 255, 100 / 255, 0], atol=1e-6)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=1)  # index 1 fully transparent: composited to black
    decoded = decode_image_bytes(buffer.getvalue(), "pt.png")
    assert decoded[0, 1].tolist() == [0, 0, 0] and decoded[1, 1].tolist() == [0, 0, 0]
    np.testing.assert_allclose(decoded[0, 0], [10 / 255, 20 / 255, 30 / 255], atol=1e-6)
    path = tmp_path / "mask.png"
    path.write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(read_mask(path), index > 0)  # a mask's palette index is its label


@pytest.mark.parametrize(
    "make",
    [
        lambda cmyk: pil_bytes(cmyk, "JPEG", mode="CMYK", quality=98),
        lambda cmyk: pil_bytes(cmyk, "TIFF", mode="CMYK"),
        lambda cmyk: tiff_bytes(cmyk, photometric="separated"),
        lambda cmyk: tiff_bytes(cmyk, photometric="separated", compression="zlib"),
    ],
    ids=["jpeg", "tiff_pil", "tiff_tifffile", "tiff_deflate"],
)
def test_cmyk_becomes_rgb(make):
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:8, :, 0] = 255  # cyan
    cmyk[8:, :, 3] = 128  # half black
    image = decode_image_bytes(make(cmyk), "cmyk.bin")
    np.testing.assert_allclose(image[2, 2], [0, 1, 1], atol=0.03)
    np.testing.assert_allclose(image[12, 12], [127 / 255] * 3, atol=0.03)


def test_gray_alpha_and_rgba_are_composited_over_black():
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 200, [[255, 0], [51, 255]]
    for data in (pil_bytes(la, "PNG", mode="LA"), tiff_bytes(la, photometric="minisblack", extrasamples=[2])):
        image = decode_image_bytes(data, "la.bin")
        np.testing.assert_allclose(image[:, :, 1], 200 / 255 * la[..., 1] / 255, atol=1e-6)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, [[255, 0], [102, 255]]
    unassociated = decode_image_bytes(tiff_bytes(rgba), "unassoc.tif")
    np.testing.assert_allclose(unassociated[:, :, 0], 100 / 255 * rgba[..., 3] / 255, atol=1e-6)
    # premultiplied alpha is composited already; unspecified extra samples are not alpha
    for extra in (1, 0):
        image = decode_image_bytes(tiff_bytes(rgba, extrasamples=[extra]), "extra.tif")
        np.testing.assert_allclose(image, np.full((2, 2, 3), 100 / 255), atol=1e-6)


# --------------------------------------------------------------------------- several frames


def _tiff_pages(count: int) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for value in range(count):
            writer.write(np.full((4, 5), 60 * (value + 1), dtype=np.uint8))
    return buffer.getvalue()


def test_multi_page_tiff_is_refused_by_default_and_first_page_on_request():
    data = _tiff_pages(3)
    with pytest.raises(ImageReadError, match="several full-resolution pages") as error:
        decode_image_bytes(data, "stack.tif")
    assert "stack.tif" in str(error.value) and "multi_frame='first'" in str(error.value)
    np.testing.assert_allclose(decode_image_bytes(data, "stack.tif", limits=FIRST_FRAME), 60 / 255)


def test_tiff_thumbnail_pages_do_not_count_as_frames():
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(np.full((8, 8), 90, dtype=np.uint8))
        writer.write(np.full((2, 2), 10, dtype=np.uint8), subfiletype=1)  # reduced resolution
    np.testing.assert_allclose(decode_image_bytes(buffer.getvalue(), "thumb.tif"), 90 / 255)


def _frames(fmt: str, **save) -> bytes:
    frames = [Image.fromarray(np.full((6, 7, 3), 40 * (i + 1), dtype=np.uint8)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, save", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})], ids=["gif", "apng", "webp"])
def test_animations_are_refused_by_default_and_first_frame_on_request(fmt, save):
    data = _frames(fmt, **save)
    with pytest.raises(ImageReadError, match="frames") as error:
        decode_image_bytes(data, "anim.bin", limits=ALL_FORMATS)
    assert "anim.bin" in str(error.value)
    np.testing.assert_allclose(decode_image_bytes(data, "anim.bin", limits=FIRST_FRAME), 40 / 255, atol=2 / 255)


def test_single_frame_gif_only_when_accepted():
    data = pil_bytes(np.full((4, 4), 80, dtype=np.uint8), "GIF")
    with pytest.raises(ImageFormatError, match="format GIF is not accepted; accepted: PNG, JPEG, TIFF, BMP, WebP"):
        decode_image_bytes(data, "one.gif")
    np.testing.assert_allclose(decode_image_bytes(data, "one.gif", limits=ALL_FORMATS), 80 / 255, atol=1e-6)


# --------------------------------------------------------------------------- formats


def _foreign_files() -> dict:
    files = {}
    for fmt in ("ICO", "TGA", "PCX", "SGI", "DDS", "PPM", "QOI", "JPEG2000", "ICNS", "EPS", "PDF"):
        if fmt not in Image.SAVE or (fmt == "JPEG2000" and not features.check("jpg_2000")):
            continue
        try:
            files[fmt] = pil_bytes(PIXELS, fmt)
        except (OSError, KeyError, ValueError):  # an encoder this Pillow build lacks
            continue
    files["SVG"] = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    files["HTML"] = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
    files["HTML_then_PNG"] = b"<html></html>" + pil_bytes(PIXELS, "PNG")
    return files


FOREIGN = _foreign_files()
FOREIGN_NAMES = {"PPM": "PNM", "JPEG2000": "JPEG 2000", "SVG": "SVG/HTML/XML text", "HTML": "SVG/HTML/XML text",
                 "HTML_then_PNG": "SVG/HTML/XML text"}


@pytest.mark.parametrize("fmt", sorted(FOREIGN))
def test_formats_outside_the_allow_list_are_refused_by_content(tmp_path, fmt):
    path = tmp_path / "innocent.png"  # the name says PNG; the content decides
    path.write_bytes(FOREIGN[fmt])
    with pytest.raises(ImageFormatError, match="is not accepted; accepted: PNG, JPEG, TIFF, BMP, WebP") as error:
        read_image(path)
    assert str(path) in str(error.value) and FOREIGN_NAMES.get(fmt, fmt) in str(error.value)


def test_pillow_formats_are_all_named_or_unknown():
    assert {"ICO", "TGA", "PCX", "QOI"} <= set(FOREIGN)
    for data in (b"plain text, no image", b"\x00" * 40, np.random.default_rng(5).bytes(100)):
        with pytest.raises(ImageFormatError, match="not a readable image"):
            decode_image_bytes(data, "unknown.bin")


def test_png_html_polyglot_decodes_as_the_png_only():
    png = pil_bytes(PIXELS, "PNG")
    polyglot = png + b"<html><body><script>alert(document.cookie)</script></body></html>"
    assert identify_format(polyglot) == "PNG"
    np.testing.assert_array_equal(decode_image_bytes(polyglot, "poly.png"), decode_image_bytes(png, "p.png"))


def test_format_comes_from_content_not_name_and_is_image_file_agrees(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(pil_bytes(PIXELS, "JPEG"))
    assert read_image(path).shape == (24, 32, 3)
    for suffix in (".png", ".PNG", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"):
        assert is_image_file(f"a{suffix}")
    for suffix in (".gif", ".ico", ".svg", ".html", ".tga", ".qoi", ".jp2", ""):
        assert not is_image_file(f"a{suffix}")
    assert is_image_file("a.gif", ALL_FORMATS) and not is_image_file("a.bmp", DecodeLimits(formats=("png",)))
    with pytest.raises(ImageFormatError, match="format BMP is not accepted; accepted: PNG"):
        decode_image_bytes(pil_bytes(PIXELS, "BMP"), "a.bmp", limits=DecodeLimits(formats=("png",)))


def test_decode_limits_are_validated():
    assert DecodeLimits(formats=("jpg", "Tif", "webp")).formats == ("JPEG", "TIFF", "WEBP")
    for bad in ({"formats": ("PNG", "ICO")}, {"formats": ()}, {"formats": "PNG"}, {"multi_frame": "all"},
                {"max_pixels": 0}, {"max_side": -1}, {"max_decoded_bytes": 1.5}, {"max_jpeg_scans": True}):
        with pytest.raises(ConfigError):
            DecodeLimits(**bad)
    with pytest.raises(ConfigError):
        set_decode_limits(max_pixel=3)
    assert get_decode_limits() == DecodeLimits()


def test_hostile_names_are_made_printable():
    name = "../../etc/passwd\n\x1b[31mred\u202egnp.exe" + "x" * 1000
    with pytest.raises(ImageReadError) as error:
        decode_image_bytes(b"junk", name)
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
    assert len(message) < 600 and "../../etc/passwd" in message


def test_non_bytes_input_is_an_image_read_error():
    for value in ("a string", None, 12, [1, 2]):
        with pytest.raises(ImageReadError, match="bytes"):
            decode_image_bytes(value, "value")


def test_mask_reading_uses_the_same_guards(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(craft_png(100_000, 10))
    with pytest.raises(ImageTooLargeError):
        read_mask(path)
    path.write_bytes(FOREIGN["ICO"])
    with pytest.raises(ImageFormatError):
        read_mask(path)
    path.write_bytes(tiff_bytes(np.array([[0.0, np.nan]], dtype=np.float32)))
    with pytest.raises(ImageReadError, match="NaN"):
        read_mask(path)
    path.write_bytes(tiff_bytes(np.array([[0, 3], [0, 0]], dtype=np.uint16)))
    np.testing.assert_array_equal(read_mask(path), [[False, True], [False, False]])


# --------------------------------------------------------------------------- caller arrays


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros(10, dtype=np.uint8), "1-D"),
        (np.float32(0.5), "scalar"),
        (np.zeros((0, 5), dtype=np.uint8), "zero width or height"),
        (np.zeros((5, 0, 3), dtype=np.uint8), "zero width or height"),
        (np.zeros((4, 4, 0), dtype=np.uint8), "zero width or height"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "channel count 5"),
        (np.zeros((3, 8, 9), dtype=np.uint8), "channels-first"),
        (np.zeros((1, 4, 4, 3), dtype=np.uint8), "one at a time"),
        (np.zeros((4, 4), dtype=np.complex64), "complex64"),
        (np.array([["a", "b"]]), "unsupported pixel type"),
        (np.zeros((2, 2), dtype=object), "unsupported pixel type"),
        (np.array([[0, 300]], dtype=np.int64), "cast 16-bit data to uint16"),
        (np.array([[-1, 3]], dtype=np.int16), "0..255"),
        (np.array([[0.5, np.nan]], dtype=np.float32), "NaN or infinite"),
        (np.array([[0.5, np.inf]], dtype=np.float64), "NaN or infinite"),
        (np.array([[0.5, 2.0]], dtype=np.float32), r"outside \[0, 1\]"),
        (np.array([[1e300, 0.0]], dtype=np.float64), "outside"),
    ],
)
def test_odd_arrays_are_refused(array, match):
    with pytest.raises(ImageReadError, match=match) as error:
        as_float_rgb(array, "<odd array>")
    assert "<odd array>" in str(error.value)


def test_accepted_arrays_are_converted_explicitly():
    row = as_float_rgb(np.array([[0, 255, 51]], dtype=np.uint8))  # (1, N): a one-row gray image
    assert row.shape == (1, 3, 3)
    np.testing.assert_allclose(row[0, :, 0], [0, 1, 0.2])
    np.testing.assert_array_equal(as_float_rgb(np.array([[True, False]]))[0, :, 1], [1.0, 0.0])
    np.testing.assert_allclose(as_float_rgb(np.array([[0, 255]], dtype=np.int64))[0, 1], 1.0)
    np.testing.assert_allclose(as_float_rgb(np.array([[65535]], dtype=np.uint16)), 1.0)
    np.testing.assert_allclose(as_float_rgb(np.array([[[0.5]]], dtype=np.float16)), 0.5)
    out = as_float_rgb(np.ones((3, 4, 3), dtype=np.float64))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    la = np.zeros((1, 1, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 255, 51
    np.testing.assert_allclose(as_float_rgb(la), 0.2, atol=1e-6)
    view = np.zeros((6, 8, 3), dtype=np.uint8)[::2, ::2]  # non-contiguous input
    assert as_float_rgb(view).flags.c_contiguous
