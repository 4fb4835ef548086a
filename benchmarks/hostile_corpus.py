"""Write a seeded corpus of hostile image uploads; optionally decode each and count the outcomes.

    python benchmarks/hostile_corpus.py OUT_DIR [--seed 0] [--decode] [--formats PNG,JPEG,...]

OUT_DIR/files/ receives >= 1,000 files; OUT_DIR/manifest.json lists, for each, its category,
a description, the name to upload it under, its SHA-256 and what defectlens should do with it
under the default decode limits ("expect": ok | refused | too_large | format | any), and
separately a list of hostile file names (each to be uploaded with a small valid PNG's
content, "content_file").

Categories: valid (baselines), magic_random (random bytes after image magic numbers),
truncated, corrupt (bad PNG CRCs and chunk structure, broken JPEG markers, TIFF IFDs, WebP and
BMP headers), bomb (PNG / TIFF / JPEG / GIF / WebP / BMP headers claiming huge sizes, real
highly compressed PNGs and TIFFs, deflate and LZMA strip bombs, JPEGs with too many scans),
non_finite (NaN / inf / out-of-range float TIFFs), sixteen_bit, palette, cmyk, multi_frame,
odd_format (ICO, TGA, PCX, QOI, JPEG 2000, SVG, HTML, ...), odd_layout, mutated (bit flips,
insertions, truncations of valid files).

With --decode every file is decoded in this process with
``defectlens.data.images.decode_image_bytes``; the script prints counts per outcome
(ok / ImageReadError by subclass / other exception), per category, expectation mismatches, the
slowest files and the peak RSS while decoding, and exits 1 if any file raised something other
than ImageReadError or did not do what the manifest expects.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import lzma
import resource
import struct
import sys
import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, PngImagePlugin, features

FIXED_DATE = datetime(2000, 1, 1)

# ----------------------------------------------------------------------------- encoders


def pil(array, fmt, mode=None, **save) -> bytes:
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    return save_image(image, fmt, **save)


def save_image(image, fmt, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def tiff(array, **write) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **write)
    return buffer.getvalue()


def cv2_encode(suffix: str, array: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(suffix, array)[1].tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def craft_png(width, height, *, depth=8, color=2, idat=None, extra=b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def real_png_bomb(width, height, channels) -> bytes:
    """A valid PNG of zeros, compressed row by row (never holding the image)."""
    color = {1: 0, 3: 2, 4: 6}[channels]
    compressor = zlib.compressobj(9)
    row = bytes(1 + width * channels)
    parts = [compressor.compress(row) for _ in range(height)] + [compressor.flush()]
    return craft_png(width, height, color=color, idat=b"".join(parts))


def png_chunks(data: bytes):
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((pos, length, kind))
        pos += 12 + length
    return out


def craft_tiff(width, height, strips, *, bits=8, samples=1, sampleformat=1, photometric=1, compression=1,
               rows_per_strip=None, extra_tags=(), next_ifd=0, big_endian=False) -> bytes:
    """A classic TIFF, strips first then one IFD (values out of line after it)."""
    order = ">" if big_endian else "<"
    data = b"".join(strips)
    offsets, position = [], 8
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    ifd_offset = 8 + len(data) + (len(data) % 2)
    tags = [
        (256, 4, [width]), (257, 4, [height]), (258, 3, [bits] * samples), (259, 3, [compression]),
        (262, 3, [photometric]), (273, 4, offsets), (277, 3, [samples]),
        (278, 4, [rows_per_strip or max(1, -(-height // max(1, len(strips))))]),
        (279, 4, [len(s) for s in strips]), (339, 3, [sampleformat] * samples), *extra_tags,
    ]
    tags.sort(key=lambda tag: tag[0])
    extra_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for tag, kind, values in tags:
        packed = b"".join(struct.pack(order + ("H" if kind == 3 else "I"), v) for v in values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack(order + "I", extra_offset + len(extra))
            extra += packed
        entries += struct.pack(order + "HHI", tag, kind, len(values)) + field
    ifd = struct.pack(order + "H", len(tags)) + entries + struct.pack(order + "I", next_ifd)
    magic = b"MM\x00*" if big_endian else b"II*\x00"
    return magic + struct.pack(order + "I", ifd_offset) + data + b"\x00" * (len(data) % 2) + ifd + extra


def zlib_zeros(megabytes: int) -> bytes:
    compressor, block = zlib.compressobj(9), bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(megabytes)) + compressor.flush()


def lzma_zeros(megabytes: int) -> bytes:
    compressor, block = lzma.LZMACompressor(), bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(megabytes)) + compressor.flush()


def jpeg_sof_offset(data: bytes) -> int:
    pos = 2
    while True:
        if data[pos + 1] in (0xC0, 0xC1, 0xC2):
            return pos
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]


def gif_descriptor_offset(data: bytes) -> int:
    pos = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return pos


def webp_vp8x(width, height, inner: bytes) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def patch(data: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


# ----------------------------------------------------------------------------- corpus


class Corpus:
    def __init__(self, out: Path, seed: int) -> None:
        self.out = out
        self.files_dir = out / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.entries: list[dict] = []

    def add(self, category, label, data: bytes, expect, suffix=".png", **extra) -> str:
        index = len(self.entries)
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:60]
        filename = f"{index:04d}_{category}_{slug}{suffix}"
        (self.files_dir / filename).write_bytes(data)
        entry = {
            "file": f"files/{filename}", "category": category, "description": label, "upload_name": f"{slug}{suffix}",
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "expect": expect, **extra,
        }
        self.entries.append(entry)
        return entry["file"]


def valid_files(rng) -> dict:
    """name -> (bytes, suffix): small valid images of every flavour we accept."""
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    gray = rgb[:, :, 0].copy()
    rgb16 = rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (48, 64, 1), dtype=np.uint8)], axis=2)
    cmyk = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(64)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "inspection image")
    files = {
        "png_rgb": (pil(rgb, "PNG", pnginfo=info), ".png"),
        "png_gray": (pil(gray, "PNG"), ".png"),
        "png_gray16": (pil(rgb16[:, :, 0], "PNG"), ".png"),
        "png_rgb16": (cv2_encode(".png", rgb16), ".png"),
        "png_rgba16": (cv2_encode(".png", np.concatenate([rgb16, rgb16[:, :, :1]], axis=2)), ".png"),
        "png_rgba": (pil(rgba, "PNG"), ".png"),
        "png_la": (pil(rgba[:, :, [0, 3]].copy(), "PNG", mode="LA"), ".png"),
        "png_palette": (save_image(palette, "PNG"), ".png"),
        "png_palette_trns": (save_image(palette, "PNG", transparency=5), ".png"),
        "png_bilevel": (save_image(Image.fromarray(gray > 128), "PNG"), ".png"),
        "png_palette_4bit": (save_image(Image.fromarray(rgb).quantize(16), "PNG", bits=4), ".png"),
        "jpeg": (pil(rgb, "JPEG"), ".jpg"),
        "jpeg_progressive": (pil(rgb, "JPEG", progressive=True), ".jpg"),
        "jpeg_gray": (pil(gray, "JPEG"), ".jpg"),
        "jpeg_cmyk": (pil(cmyk, "JPEG", mode="CMYK"), ".jpg"),
        "tiff_pil": (pil(rgb, "TIFF"), ".tif"),
        "tiff_pil_lzw": (pil(rgb, "TIFF", compression="tiff_lzw"), ".tif"),
        "tiff_pil_cmyk": (pil(cmyk, "TIFF", mode="CMYK"), ".tif"),
        "tiff_uint8": (tiff(rgb), ".tif"),
        "tiff_deflate": (tiff(rgb, compression="zlib"), ".tif"),
        "tiff_lzma": (tiff(rgb, compression="lzma"), ".tif"),
        "tiff_gray16": (tiff(rgb16[:, :, 0]), ".tif"),
        "tiff_rgb16": (tiff(rgb16), ".tif"),
        "tiff_rgb16_lzw": (cv2_encode(".tiff", rgb16), ".tif"),
        "tiff_planar": (tiff(np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate"), ".tif"),
        "tiff_float32": (tiff(gray.astype(np.float32) / 255), ".tif"),
        "tiff_float64": (tiff(gray.astype(np.float64) / 255, compression="zlib"), ".tif"),
        "tiff_rgba_unassoc": (tiff(rgba), ".tif"),
        "tiff_rgba_assoc": (tiff(rgba, extrasamples=[1]), ".tif"),
        "tiff_cmyk": (tiff(cmyk, photometric="separated"), ".tif"),
        "tiff_bigendian": (tiff(rgb, byteorder=">"), ".tif"),
        "tiff_bigtiff": (tiff(rgb, bigtiff=True), ".tif"),
        "tiff_tiled": (tiff(np.zeros((64, 64, 3), np.uint8) + 7, tile=(16, 16), compression="zlib"), ".tif"),
        "bmp_24": (pil(rgb, "BMP"), ".bmp"),
        "bmp_32": (pil(rgba, "BMP"), ".bmp"),
        "bmp_palette": (save_image(palette, "BMP"), ".bmp"),
        "bmp_gray": (pil(gray, "BMP"), ".bmp"),
        "webp_lossy": (pil(rgb, "WEBP"), ".webp"),
        "webp_lossless": (pil(rgb, "WEBP", lossless=True), ".webp"),
        "webp_alpha": (pil(rgba, "WEBP"), ".webp"),
    }
    return files


MAGICS = {
    "png": b"\x89PNG\r\n\x1a\n",
    "png_ihdr": b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    "jpeg": b"\xff\xd8\xff",
    "jpeg_jfif": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "jpeg_sof": b"\xff\xd8\xff\xc0\x00\x11\x08",
    "tiff_le": b"II*\x00",
    "tiff_be": b"MM\x00*",
    "bigtiff": b"II+\x00\x08\x00\x00\x00",
    "bmp": b"BM",
    "webp_vp8": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    "webp_vp8l": b"RIFF\x00\x10\x00\x00WEBPVP8L",
    "webp_vp8x": b"RIFF\x00\x10\x00\x00WEBPVP8X",
    "gif87a": b"GIF87a",
    "gif89a": b"GIF89a",
}
SUFFIX = {"png": ".png", "jpe": ".jpg", "tif": ".tif", "big": ".tif", "bmp": ".bmp", "web": ".webp", "gif": ".gif"}

HOSTILE_NAMES = [
    "../../etc/passwd", "..\\..\\windows\\win.ini", "/etc/shadow", "C:\\Windows\\system32\\cmd.exe",
    "a" * 255 + ".png", "b" * 5000 + ".png", "nul\x00byte.png", "new\nline.png", "crlf\r\nX-Injected: 1.png",
    "<script>alert(1)</script>.png", "<img src=x onerror=alert(1)>.png", '"quoted".png', "'single'.png",
    "semi;colon.png", "$(touch pwned).png", "`id`.png", "|pipe.png", "&amp;.png", "CON.png", "NUL", "aux.png",
    "COM1.png", "file.png.exe", "file.exe.png", "\u202egnp.exe", "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48.png",
    "emoji_\U0001f600.png", "combining_e\u0301.png", "%00.png", "%2e%2e%2fetc%2fpasswd.png", "..", ".", "", " ",
    ".png", ".hidden.png", "trailing.dot.", "trailing space.png ", "name with spaces.png", "back\\slash.png",
    "colon:stream.png", "*wild?.png", "ssti_{{7*7}}_${7*7}.png", "sql'); DROP TABLE inspections;--.png",
    "\x1b[31mansi\x1b[0m.png", "tab\tname.png", "bell\x07.png", "del\x7f.png", "lone_surrogate_\ud800.png",
    "zero_width_\u200b\u200d.png", "very/deep/" * 50 + "x.png", "x.PNG", "x.png.", "x.png;.jpg", "x.png%00.jpg",
    "\u0000", "\u2028line_separator.png",
]


def build(corpus: Corpus) -> None:
    rng = corpus.rng
    valid = valid_files(rng)

    # valid baselines ------------------------------------------------------------------------
    for name, (data, suffix) in valid.items():
        category = ("sixteen_bit" if "16" in name else "palette" if "palette" in name
                    else "cmyk" if "cmyk" in name else "valid")
        corpus.add(category, name, data, "ok", suffix)
    gif = pil(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "GIF")
    corpus.add("odd_format", "gif_single_frame_not_accepted", gif, "format", ".gif", expect_if_accepted="ok")

    # random bytes after magic numbers -------------------------------------------------------
    for label, magic in MAGICS.items():
        for trial in range(22):
            tail = rng.bytes(int(rng.integers(0, 4096)))
            expect = "format" if label.startswith("gif") else "refused"
            corpus.add("magic_random", f"{label}_{trial}", magic + tail, expect, SUFFIX[label[:3]],
                       expect_if_accepted="refused")

    # truncations ----------------------------------------------------------------------------
    for name, (data, suffix) in valid.items():
        cuts = sorted({1, 2, 8, 16, 33, len(data) // 4, len(data) // 2, (3 * len(data)) // 4, len(data) - 1})
        for cut in cuts:
            if 0 < cut < len(data):
                corpus.add("truncated", f"{name}_to_{cut}_of_{len(data)}", data[:cut], "refused", suffix)

    # corrupt chunks and headers -------------------------------------------------------------
    png = valid["png_rgb"][0]
    for offset, length, kind in png_chunks(png):
        for where in ("data", "crc") if length else ("crc",):
            broken = bytearray(png)
            broken[offset + 8 if where == "data" else offset + 8 + length] ^= 0x41
            corpus.add("corrupt", f"png_{kind.decode()}_{where}_bad_crc", bytes(broken), "refused")
    pal = valid["png_palette_trns"][0]
    for offset, length, kind in png_chunks(pal):
        if kind in (b"PLTE", b"tRNS"):
            broken = bytearray(pal)
            broken[offset + 8] ^= 0x41
            corpus.add("corrupt", f"png_{kind.decode()}_bad_crc", bytes(broken), "refused")
    first = png_chunks(png)
    corpus.add("corrupt", "png_chunk_length_huge", patch(png, first[1][0], ">I", 0x7FFFFFF0), "refused")
    corpus.add("corrupt", "png_chunk_length_over_2_31", patch(png, first[1][0], ">I", 0xFFFFFFF0), "refused")
    corpus.add("corrupt", "png_chunk_type_garbage", png[:first[1][0] + 4] + b"\x00\x01\x02\x03" + png[first[1][0] + 8:], "refused")
    corpus.add("corrupt", "png_no_iend", png[: first[-1][0]], "refused")
    corpus.add("corrupt", "png_idat_before_ihdr", png[:8] + png_chunk(b"IDAT", b"x") + png[8:], "refused")
    corpus.add("corrupt", "png_two_ihdr", png[:33] + png[8:33] + png[33:], "refused")
    corpus.add("corrupt", "png_bad_zlib_valid_crc", craft_png(16, 16, idat=b"\x78\x9c" + b"\xff" * 40), "refused")
    corpus.add("corrupt", "png_no_idat", png[:33] + png_chunk(b"IEND", b""), "refused")
    corpus.add("corrupt", "png_bit_depth_7", craft_png(16, 16, depth=7), "refused")
    corpus.add("corrupt", "png_colour_type_5", craft_png(16, 16, color=5), "refused")
    corpus.add("corrupt", "png_zero_width", craft_png(0, 16), "refused")
    corpus.add("corrupt", "png_idat_too_short", craft_png(64, 64, idat=zlib.compress(b"\x00" * 10)), "refused")
    corpus.add("corrupt", "png_palette_missing_plte", craft_png(8, 8, color=3, idat=zlib.compress(b"\x00" * 72)), "refused")
    corpus.add("corrupt", "png_huge_text_chunk", craft_png(8, 8, extra=png_chunk(b"zTXt", b"k\x00\x00" + zlib_zeros(16))), "any")
    jpeg = valid["jpeg"][0]
    sof = jpeg_sof_offset(jpeg)
    corpus.add("corrupt", "jpeg_segment_length_0", patch(jpeg, 4, ">H", 0), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_segment_length_past_end", patch(jpeg, 4, ">H", 0xFFFF), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_height_0_dnl", patch(jpeg, sof + 5, ">H", 0), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_width_0", patch(jpeg, sof + 7, ">H", 0), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_255_components", patch(jpeg, sof + 9, ">B", 255), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_2_components", patch(jpeg, sof + 9, ">B", 2), "refused", ".jpg")
    corpus.add("corrupt", "jpeg_precision_16", patch(jpeg, sof + 4, ">B", 16), "any", ".jpg")
    corpus.add("corrupt", "jpeg_no_sof", jpeg[:sof] + jpeg[sof + 2 + struct.unpack_from(">H", jpeg, sof + 2)[0]:], "refused", ".jpg")
    corpus.add("corrupt", "jpeg_soi_eoi_only", b"\xff\xd8\xff\xd9", "refused", ".jpg")
    corpus.add("corrupt", "jpeg_scan_garbage", jpeg[: len(jpeg) // 2] + rng.bytes(len(jpeg) // 2 - 2) + b"\xff\xd9", "any", ".jpg")
    tif = valid["tiff_uint8"][0]
    ifd = struct.unpack_from("<I", tif, 4)[0]
    corpus.add("corrupt", "tiff_ifd_offset_past_end", patch(tif, 4, "<I", 0x7FFFFFFF), "refused", ".tif")
    corpus.add("corrupt", "tiff_ifd_offset_0", patch(tif, 4, "<I", 0), "refused", ".tif")
    corpus.add("corrupt", "tiff_ifd_offset_odd_inside_header", patch(tif, 4, "<I", 1), "refused", ".tif")
    corpus.add("corrupt", "tiff_tag_count_65535", patch(tif, ifd, "<H", 0xFFFF), "refused", ".tif")
    corpus.add("corrupt", "tiff_tag_count_0", patch(tif, ifd, "<H", 0), "refused", ".tif")
    strip = zlib.compress(bytes(64))
    corpus.add("corrupt", "tiff_ifd_loop", craft_tiff(8, 8, [bytes(64)], next_ifd=8 + 64), "any", ".tif")
    corpus.add("corrupt", "tiff_strip_past_end", craft_tiff(8, 8, [bytes(64)])[:-4] + b"\x00" * 4, "any", ".tif")
    corpus.add("corrupt", "tiff_strip_short", craft_tiff(64, 64, [bytes(100)]), "refused", ".tif")
    corpus.add("corrupt", "tiff_bad_deflate", craft_tiff(8, 8, [b"\x78\x9c" + b"\x13" * 40], compression=8), "refused", ".tif")
    corpus.add("corrupt", "tiff_bits_per_sample_3", craft_tiff(8, 8, [bytes(24)], bits=3), "any", ".tif")
    corpus.add("corrupt", "tiff_bits_per_sample_0", craft_tiff(8, 8, [bytes(64)], bits=0), "refused", ".tif")
    corpus.add("corrupt", "tiff_samples_0", craft_tiff(8, 8, [bytes(64)], samples=0), "refused", ".tif")
    corpus.add("corrupt", "tiff_unknown_compression", craft_tiff(8, 8, [strip], compression=12345), "refused", ".tif")
    corpus.add("corrupt", "tiff_jpeg_compression_garbage", craft_tiff(8, 8, [rng.bytes(64)], compression=7), "refused", ".tif")
    corpus.add("corrupt", "tiff_lzw_garbage", craft_tiff(8, 8, [rng.bytes(64)], compression=5), "refused", ".tif")
    corpus.add("corrupt", "tiff_packbits_garbage", craft_tiff(8, 8, [rng.bytes(64)], compression=32773), "any", ".tif")
    corpus.add("corrupt", "tiff_sampleformat_complex", craft_tiff(4, 4, [bytes(128)], bits=64, sampleformat=6), "refused", ".tif")
    corpus.add("corrupt", "tiff_photometric_99", craft_tiff(8, 8, [bytes(64)], photometric=99), "refused", ".tif")
    webp = valid["webp_lossy"][0]
    corpus.add("corrupt", "webp_riff_size_huge", patch(webp, 4, "<I", 0x7FFFFFF0), "refused", ".webp")
    corpus.add("corrupt", "webp_riff_size_small", patch(webp, 4, "<I", 10), "refused", ".webp")
    corpus.add("corrupt", "webp_vp8_start_code", patch(webp, 23, "<B", 0), "refused", ".webp")
    corpus.add("corrupt", "webp_chunk_size_huge", patch(webp, 16, "<I", 0x7FFFFFF0), "refused", ".webp")
    corpus.add("corrupt", "webp_unknown_chunk", webp[:12] + b"ABCD" + webp[16:], "refused", ".webp")
    bmp = valid["bmp_24"][0]
    corpus.add("corrupt", "bmp_header_size_7", patch(bmp, 14, "<I", 7), "refused", ".bmp")
    corpus.add("corrupt", "bmp_negative_width", patch(bmp, 18, "<i", -64), "refused", ".bmp")
    corpus.add("corrupt", "bmp_bits_per_pixel_7", patch(bmp, 28, "<H", 7), "refused", ".bmp")
    corpus.add("corrupt", "bmp_pixel_offset_past_end", patch(bmp, 10, "<I", 0x7FFFFFF0), "refused", ".bmp")
    corpus.add("corrupt", "bmp_compression_99", patch(bmp, 30, "<I", 99), "refused", ".bmp")
    corpus.add("corrupt", "bmp_rle8_garbage", patch(valid["bmp_palette"][0], 30, "<I", 1), "any", ".bmp")
    gif_bad = bytearray(gif)
    gif_bad[gif_descriptor_offset(gif) + 10] = 0x0F  # LZW minimum code size 15
    corpus.add("corrupt", "gif_lzw_code_size_15", bytes(gif_bad), "format", ".gif", expect_if_accepted="refused")

    # decompression bombs --------------------------------------------------------------------
    corpus.add("bomb", "png_ihdr_100000x100000", craft_png(100_000, 100_000), "too_large")
    corpus.add("bomb", "png_ihdr_2_31_square", craft_png(0x7FFFFFFF, 0x7FFFFFFF), "too_large")
    corpus.add("bomb", "png_ihdr_13000_square", craft_png(13_000, 13_000), "too_large")
    corpus.add("bomb", "png_ihdr_16000x16000_rgba16", craft_png(16_000, 16_000, depth=16, color=6), "too_large")
    corpus.add("bomb", "png_ihdr_1x100000000", craft_png(1, 100_000_000, color=0), "too_large")
    corpus.add("bomb", "png_real_13000_square_gray", real_png_bomb(13_000, 13_000, 1), "too_large")
    corpus.add("bomb", "png_real_9000_square_rgb", real_png_bomb(9000, 9000, 3), "too_large")
    corpus.add("bomb", "png_apng_1000000_frames", craft_png(8, 8, extra=png_chunk(b"acTL", struct.pack(">II", 1_000_000, 0))), "refused")
    float_strip = zlib.compress(bytes(100 * 14_000 * 8), 9)
    corpus.add("bomb", "tiff_real_float64_14000_square_deflate",
               craft_tiff(14_000, 14_000, [float_strip] * 140, bits=64, sampleformat=3, compression=8, rows_per_strip=100),
               "too_large", ".tif")
    corpus.add("bomb", "tiff_float64_rgba_5000_square", craft_tiff(5000, 5000, [zlib.compress(bytes(4096))], bits=64,
               samples=4, sampleformat=3, photometric=2, compression=8), "too_large", ".tif")
    corpus.add("bomb", "tiff_uint8_100000_square", craft_tiff(100_000, 100_000, [zlib.compress(bytes(4096))], compression=8), "too_large", ".tif")
    corpus.add("bomb", "tiff_uint8_2_32_wide", craft_tiff(0xFFFFFFFF, 1, [bytes(16)]), "too_large", ".tif")
    corpus.add("bomb", "tiff_deflate_strip_64MiB_in_64x64", craft_tiff(64, 64, [zlib_zeros(64)], compression=8), "too_large", ".tif")
    corpus.add("bomb", "tiff_deflate_strips_many", craft_tiff(256, 256, [zlib_zeros(4)] * 64, compression=8, rows_per_strip=4), "too_large", ".tif")
    corpus.add("bomb", "tiff_lzma_strip_64MiB_in_64x64", craft_tiff(64, 64, [lzma_zeros(64)], compression=34925), "too_large", ".tif")
    corpus.add("bomb", "tiff_lzw_zeros_4000_square_within_limits", pil(np.zeros((4000, 4000), np.uint8), "TIFF", compression="tiff_lzw"), "ok", ".tif")
    for width, height, label in ((60_000, 60_000, "60000_square"), (9000, 9000, "9000_square"), (65_535, 1, "65535x1_then_wide")):
        corpus.add("bomb", f"jpeg_sof_{label}", patch(jpeg, sof + 5, ">HH", height, width),
                   "too_large" if width * height > 50_000_000 or max(width, height) > 16384 else "refused", ".jpg")
    progressive = valid["jpeg_progressive"][0]
    first_sos = progressive.find(b"\xff\xda")
    eoi = progressive.rfind(b"\xff\xd9")
    scans = progressive[first_sos:eoi]
    corpus.add("bomb", "jpeg_1000_scans", progressive[:first_sos] + scans * 100 + b"\xff\xd9", "too_large", ".jpg")
    gif_screen = patch(gif, 6, "<HH", 65535, 65535)
    corpus.add("bomb", "gif_screen_65535_square", gif_screen, "format", ".gif", expect_if_accepted="too_large")
    gif_frame = patch(gif, gif_descriptor_offset(gif) + 5, "<HH", 8000, 8000)
    corpus.add("bomb", "gif_frame_8000_square", gif_frame, "format", ".gif", expect_if_accepted="too_large")
    gif_frame_pil = patch(gif, gif_descriptor_offset(gif) + 5, "<HH", 30000, 30000)
    corpus.add("bomb", "gif_frame_30000_square", gif_frame_pil, "format", ".gif", expect_if_accepted="too_large")
    lossless = valid["webp_lossless"][0]
    corpus.add("bomb", "webp_vp8x_canvas_2_24", webp_vp8x(1 << 24, 1 << 24, lossless), "too_large", ".webp")
    corpus.add("bomb", "webp_vp8x_canvas_16000_square", webp_vp8x(16_000, 16_000, lossless), "too_large", ".webp")
    bits = struct.unpack_from("<I", lossless, 21)[0]
    corpus.add("bomb", "webp_vp8l_16384_square", patch(lossless, 21, "<I", 16383 | (16383 << 14) | (bits & ~((1 << 28) - 1))), "too_large", ".webp")
    corpus.add("bomb", "webp_vp8_16383_square", patch(webp, 26, "<HH", 16383, 16383), "too_large", ".webp")
    corpus.add("bomb", "bmp_100000_square", patch(bmp, 18, "<ii", 100_000, 100_000), "too_large", ".bmp")
    corpus.add("bomb", "bmp_top_down_huge", patch(bmp, 18, "<ii", 20_000, -20_000), "too_large", ".bmp")

    # non-finite and out-of-range floats -----------------------------------------------------
    for dtype in (np.float32, np.float64):
        for bad in (np.nan, np.inf, -np.inf):
            for compression in (None, "zlib"):
                for where in ("corner", "centre", "all"):
                    pixels = np.full((32, 32), 0.5, dtype=dtype)
                    if where == "all":
                        pixels[:] = bad
                    else:
                        pixels[(0, 0) if where == "corner" else (16, 16)] = bad
                    label = f"{np.dtype(dtype).name}_{bad}_{where}_{compression or 'raw'}"
                    corpus.add("non_finite", label, tiff(pixels, compression=compression), "refused", ".tif")
    pixels = np.full((16, 16), 0.5, np.float32)
    pixels[3, 3] = np.nan
    corpus.add("non_finite", "float32_nan_pillow_written", pil(pixels, "TIFF", mode="F"), "refused", ".tif")
    corpus.add("non_finite", "float32_rgb_nan", tiff(np.where(np.eye(16, dtype=bool)[:, :, None], np.nan, 0.5).astype(np.float32) * np.ones(3, np.float32)), "refused", ".tif")
    for label, values in (("0_to_255", np.linspace(0, 255, 256)), ("negative", np.linspace(-1, 1, 256)),
                          ("1e30", np.full(256, 1e30)), ("max_float32", np.full(256, np.finfo(np.float32).max))):
        corpus.add("non_finite", f"float_out_of_range_{label}", tiff(values.reshape(16, 16).astype(np.float32)), "refused", ".tif")
    corpus.add("non_finite", "float16_in_range", tiff((np.arange(256).reshape(16, 16) / 255).astype(np.float16)), "ok", ".tif")

    # multi-frame ----------------------------------------------------------------------------
    frames = [Image.fromarray(np.full((24, 32, 3), 30 * i, np.uint8)) for i in range(1, 4)]
    for pages in (2, 3, 50):
        buffer = io.BytesIO()
        with tifffile.TiffWriter(buffer) as writer:
            for page in range(pages):
                writer.write(np.full((24, 32), page, np.uint8))
        corpus.add("multi_frame", f"tiff_{pages}_pages", buffer.getvalue(), "refused", ".tif")
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(np.full((24, 32), 9, np.uint8))
        writer.write(np.full((6, 8), 1, np.uint8), subfiletype=1)
    corpus.add("multi_frame", "tiff_with_thumbnail_page", buffer.getvalue(), "ok", ".tif")
    corpus.add("multi_frame", "tiff_stack_3d_array", tiff(np.zeros((4, 24, 32), np.uint8), photometric="minisblack"), "refused", ".tif")
    corpus.add("multi_frame", "pil_tiff_2_pages", save_image(frames[0], "TIFF", save_all=True, append_images=frames[1:2]), "refused", ".tif")
    corpus.add("multi_frame", "apng_3_frames", save_image(frames[0], "PNG", save_all=True, append_images=frames[1:]), "refused")
    corpus.add("multi_frame", "webp_animated_3_frames", save_image(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), "refused", ".webp")
    corpus.add("multi_frame", "gif_animated_3_frames", save_image(frames[0], "GIF", save_all=True, append_images=frames[1:]), "format", ".gif", expect_if_accepted="refused")
    try:
        corpus.add("multi_frame", "mpo_2_images", save_image(frames[0], "MPO", save_all=True, append_images=frames[1:2]), "ok", ".jpg")
    except (KeyError, OSError, ValueError):
        pass

    # formats outside the allow-list ---------------------------------------------------------
    small = np.asarray(frames[1])
    for fmt, suffix in (("ICO", ".ico"), ("TGA", ".tga"), ("PCX", ".pcx"), ("SGI", ".sgi"), ("DDS", ".dds"), ("PPM", ".ppm"),
                        ("QOI", ".qoi"), ("JPEG2000", ".jp2"), ("ICNS", ".icns"), ("EPS", ".eps"), ("PDF", ".pdf"),
                        ("IM", ".im"), ("SPIDER", ".spi"), ("DIB", ".dib"), ("TGA", ".png")):
        if fmt not in Image.SAVE or (fmt == "JPEG2000" and not features.check("jpg_2000")):
            continue
        try:  # (a PDF carries dates: fixed ones keep the corpus reproducible)
            data = pil(small, fmt, **({"creationDate": FIXED_DATE, "modDate": FIXED_DATE} if fmt == "PDF" else {}))
        except (OSError, KeyError, ValueError, TypeError):  # Pillow 13: PDF dates
            continue
        corpus.add("odd_format", f"{fmt.lower()}_as_{suffix[1:]}", data, "format", suffix)
    corpus.add("odd_format", "pgm_gray", pil(small[:, :, 0], "PPM"), "format", ".pgm")
    corpus.add("odd_format", "pbm_bilevel", save_image(Image.fromarray(small[:, :, 0] > 50), "PPM"), "format", ".pbm")
    texts = {
        "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"><script>alert(1)</script></svg>',
        "svg_billion_laughs": b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><svg>&b;</svg>',
        "html": b"<!DOCTYPE html><html><body><script>fetch('/admin')</script></body></html>",
        "html_bom": b"\xef\xbb\xbf  <html></html>",
        "xml": b'<?xml version="1.0"?><root/>',
        "plain_text": b"just some text, not an image\n",
        "json": b'{"image": "not really"}',
        "empty_like_spaces": b"    ",
        "zip": b"PK\x03\x04" + rng.bytes(200),
        "gzip": zlib.compress(b"x" * 100)[:0] + b"\x1f\x8b\x08\x00" + rng.bytes(100),
        "elf": b"\x7fELF\x02\x01\x01" + rng.bytes(200),
        "windows_exe": b"MZ\x90\x00" + rng.bytes(200),
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n",
        "psd_header": b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 30000, 30000, 8, 3) + bytes(100),
        "avif_ftyp": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + rng.bytes(100),
        "heic_ftyp": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + rng.bytes(100),
        "jpeg_xl": b"\xff\x0a" + rng.bytes(100),
        "jpeg2000_codestream": b"\xff\x4f\xff\x51" + rng.bytes(100),
        "riff_avi": b"RIFF\x10\x00\x00\x00AVI LIST" + rng.bytes(100),
        "nul_bytes": bytes(512),
        "single_byte": b"\x89",
    }
    for label, data in texts.items():
        corpus.add("odd_format", label, data, "format", ".png")
    corpus.add("odd_format", "empty_file", b"", "refused", ".png")
    corpus.add("odd_format", "png_then_html_polyglot", png + b"<html><script>alert(document.cookie)</script></html>", "ok")
    corpus.add("odd_format", "html_then_png", b"<html>" + png, "format")
    corpus.add("odd_format", "jpeg_then_zip_trailer", jpeg + b"PK\x03\x04" + rng.bytes(300), "ok", ".jpg")
    corpus.add("odd_format", "jpeg_named_png", jpeg, "ok", ".png")
    corpus.add("odd_format", "png_named_exe", png, "ok", ".exe")

    # odd pixel layouts ----------------------------------------------------------------------
    layouts = {
        "rgb_plus_2_unspecified_samples": (tiff(np.zeros((16, 16, 5), np.uint8), photometric="rgb", extrasamples=[0, 0]), "ok"),
        "gray_plus_unspecified_sample": (tiff(np.zeros((16, 16, 2), np.uint8), photometric="minisblack", extrasamples=[0]), "ok"),
        "complex64": (tiff(np.zeros((8, 8), np.complex64)), "refused"),
        "int8_negative": (tiff(np.full((8, 8), -3, np.int8)), "refused"),
        "int16_over_255": (tiff(np.full((8, 8), 1000, np.int16)), "refused"),
        "int32_in_8_bit_range": (tiff(np.full((8, 8), 200, np.int32)), "ok"),
        "uint32": (tiff(np.full((8, 8), 7, np.uint32)), "ok"),
        "bool": (tiff(np.eye(8, dtype=bool)), "ok"),
        "one_row": (tiff(np.zeros((1, 500), np.uint8)), "ok"),
        "one_column": (tiff(np.zeros((500, 1), np.uint8)), "ok"),
        "one_pixel": (pil(np.zeros((1, 1, 3), np.uint8), "PNG"), "ok"),
        "zero_width_tiff": (craft_tiff(0, 8, [bytes(8)]), "refused"),
        "volumetric_depth_4": (tiff(np.zeros((4, 8, 8), np.uint8), volumetric=True), "refused"),
        "minisblack_3_samples": (tiff(np.zeros((8, 8, 3), np.uint8), photometric="minisblack", planarconfig="contig"), "any"),
        "rgb_2_samples": (craft_tiff(8, 8, [bytes(128)], samples=2, photometric=2), "refused"),
        "ycbcr_tiff": (craft_tiff(8, 8, [bytes(192)], samples=3, photometric=6), "any"),
        "cielab_tiff": (craft_tiff(8, 8, [bytes(192)], samples=3, photometric=8), "any"),
        "miniswhite_8bit": (craft_tiff(8, 8, [bytes(64)], photometric=0), "ok"),
        "palette_tiff_no_colormap": (craft_tiff(8, 8, [bytes(64)], photometric=3), "refused"),
        "bits_12": (craft_tiff(8, 8, [bytes(96)], bits=12), "any"),
        "float24": (craft_tiff(8, 8, [bytes(192)], bits=24, sampleformat=3), "any"),
    }
    for label, (data, expect) in layouts.items():
        corpus.add("odd_layout", label, data, expect, ".tif" if data[:2] in (b"II", b"MM") else ".png")

    # mutations of valid files, up to the target size ----------------------------------------
    names = sorted(valid)
    target = max(1000, len(corpus.entries) + 300)
    while len(corpus.entries) < target:
        name = names[int(rng.integers(len(names)))]
        data, suffix = valid[name]
        data = bytearray(data)
        ops = []
        for _ in range(int(rng.integers(1, 6))):
            if len(data) < 2:
                break
            pos = int(rng.integers(0, min(len(data), 128) if rng.random() < 0.5 else len(data)))
            op = ("flip", "byte", "insert", "delete", "truncate", "integer")[int(rng.integers(6))]
            if op == "flip":
                data[pos] ^= 1 << int(rng.integers(8))
            elif op == "byte":
                data[pos] = int(rng.integers(256))
            elif op == "insert":
                data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
            elif op == "delete":
                del data[pos : pos + int(rng.integers(1, 64))]
            elif op == "truncate":
                del data[max(pos, 1):]
            else:
                value = int(rng.choice([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
                width = int(rng.choice([2, 4]))
                data[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little" if rng.random() < 0.5 else "big")
            ops.append(f"{op}@{pos}")
        corpus.add("mutated", f"{name}_{'_'.join(ops)}", bytes(data), "any", suffix)


def write_manifest(corpus: Corpus) -> Path:
    content = next(entry["file"] for entry in corpus.entries if entry["description"] == "png_rgb")
    counts = collections.Counter(entry["category"] for entry in corpus.entries)
    manifest = {
        "seed": corpus.seed,
        "files": len(corpus.entries),
        "categories": dict(sorted(counts.items())),
        "expect_legend": {
            "ok": "decodes to a finite float32 (H, W, 3) array in [0, 1]",
            "refused": "ImageReadError (any subclass)",
            "too_large": "ImageTooLargeError, before decoding",
            "format": "ImageFormatError (format not accepted or unknown)",
            "any": "ok or ImageReadError, never another exception",
            "expect_if_accepted": "what to expect when the file's format (GIF) is on the accepted list",
        },
        "entries": corpus.entries,
        "hostile_filenames": [{"name": name, "content_file": content} for name in HOSTILE_NAMES],
    }
    path = corpus.out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=True))
    return path


# ----------------------------------------------------------------------------- decoding


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets VmHWM (peak RSS) of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_all(corpus_dir: Path, entries: list, formats: tuple | None) -> int:
    from defectlens.data.images import DecodeLimits, decode_image_bytes
    from defectlens.errors import ImageFormatError, ImageReadError, ImageTooLargeError

    limits = DecodeLimits(formats=formats) if formats else DecodeLimits()
    outcomes = collections.Counter()
    per_category = collections.defaultdict(collections.Counter)
    mismatches, others, timings = [], [], []
    rss_before = _peak_rss_mib()
    reset = _reset_peak_rss()
    start_all = time.perf_counter()
    for entry in entries:
        data = (corpus_dir / entry["file"]).read_bytes()
        start = time.perf_counter()
        try:
            image = decode_image_bytes(data, entry["upload_name"], limits=limits)
            ok = (image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
                  and bool(np.isfinite(image).all()) and image.min() >= 0 and image.max() <= 1)
            outcome = "ok" if ok else "ok_but_invalid_array"
            del image
        except ImageTooLargeError:
            outcome = "ImageTooLargeError"
        except ImageFormatError:
            outcome = "ImageFormatError"
        except ImageReadError:
            outcome = "ImageReadError"
        except Exception as error:  # what this benchmark is here to find
            outcome = f"other:{type(error).__name__}"
            others.append((entry["file"], repr(error)[:200]))
        elapsed = time.perf_counter() - start
        timings.append((elapsed, entry["file"]))
        outcomes[outcome] += 1
        per_category[entry["category"]][outcome] += 1
        expect = entry["expect"]
        fmt_accepted = formats and "GIF" in formats and "expect_if_accepted" in entry
        expect = entry["expect_if_accepted"] if fmt_accepted else expect
        allowed = {
            "ok": {"ok"},
            "refused": {"ImageReadError", "ImageTooLargeError", "ImageFormatError"},
            "too_large": {"ImageTooLargeError"},
            "format": {"ImageFormatError"},
            "any": {"ok", "ImageReadError", "ImageTooLargeError", "ImageFormatError"},
        }[expect]
        if outcome not in allowed:
            mismatches.append((entry["file"], expect, outcome))
    total = time.perf_counter() - start_all
    peak = _peak_rss_mib()

    print(f"decoded {len(entries)} files in {total:.1f} s with {'default limits' if not formats else limits}")
    print("outcomes:")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome:24s} {count:6d}")
    grouped = collections.Counter()
    for outcome, count in outcomes.items():
        grouped["ok" if outcome == "ok" else "ImageReadError" if outcome.startswith("Image") else "other exception"] += count
    print("  -- ok / ImageReadError / other exception: "
          f"{grouped['ok']} / {grouped['ImageReadError']} / {grouped['other exception']}")
    print("per category:")
    for category, counter in sorted(per_category.items()):
        print(f"  {category:14s} " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
    print("slowest:")
    for elapsed, file in sorted(timings, reverse=True)[:5]:
        print(f"  {elapsed * 1000:8.1f} ms  {file}")
    rss_note = "VmHWM reset before decoding" if reset else "process peak (could not reset VmHWM)"
    print(f"peak RSS while decoding: {peak:.0f} MiB ({rss_note}; before decoding: {rss_before:.0f} MiB)")
    if others:
        print(f"OTHER EXCEPTIONS ({len(others)}):")
        for file, error in others[:20]:
            print(f"  {file}: {error}")
    if mismatches:
        print(f"EXPECTATION MISMATCHES ({len(mismatches)}):")
        for file, expect, outcome in mismatches[:30]:
            print(f"  {file}: expected {expect}, got {outcome}")
    return 1 if others or mismatches else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write files/ and manifest.json into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true", help="decode every file in-process and report outcomes")
    parser.add_argument("--formats", help="accepted formats for --decode, e.g. PNG,JPEG,TIFF,BMP,WEBP,GIF")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpus = Corpus(args.out, args.seed)
    build(corpus)
    manifest = write_manifest(corpus)
    counts = collections.Counter(entry["category"] for entry in corpus.entries)
    print(f"wrote {len(corpus.entries)} files + {len(HOSTILE_NAMES)} hostile names to {manifest} "
          f"in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if not args.decode:
        return 0
    formats = tuple(name.strip() for name in args.formats.split(",")) if args.formats else None
    return decode_all(args.out, corpus.entries, formats)


if __name__ == "__main__":
    sys.exit(main())
