"""Decode image files into float32 RGB arrays (H, W, 3) in [0, 1], safely and explicitly.

Every decode (CLI, Python API, REST service) goes through :func:`decode_image_bytes`; it either
returns a C-contiguous finite float32 (H, W, 3) array in [0, 1] within the decode limits, or
raises :class:`~defectlens.errors.ImageReadError` (or a subclass) naming the file. No other
exception escapes: whatever a decoder raises on a hostile or broken file (``IndexError``,
``struct.error``, ``zlib.error``, ``MemoryError``, tifffile errors, Pillow's decompression-bomb
error or warning, ...) is reported as an ``ImageReadError``.

Formats
    The format is identified from the content's magic bytes, never from the file name (a JPEG
    named ``.png`` is decoded as a JPEG), and only that format's decoder is ever run on it.
    Accepted by default: PNG, JPEG, TIFF, BMP and WebP; GIF can be enabled
    (``DecodeLimits(formats=...)``). Anything else - ICO, TGA, PCX, QOI, JPEG 2000, PSD, SVG or
    HTML text, ... - raises :class:`~defectlens.errors.ImageFormatError` ("format X is not
    accepted; accepted: ..."). Bytes after a PNG's IEND chunk or a JPEG's end (polyglots,
    camera trailers) are ignored: only the image itself is decoded. :func:`is_image_file`
    (used to list folders) accepts exactly the suffixes of the accepted formats.

Limits (:class:`DecodeLimits`, per call with ``limits=`` or process-wide with
:func:`set_decode_limits`)
    Width, height, channels and sample size are read from the header before any pixel is
    decoded; a file over ``max_side`` (16384 px), ``max_pixels`` (50 megapixels) or
    ``max_decoded_bytes`` (pixels x channels x bytes per sample, 600 MiB) raises
    :class:`~defectlens.errors.ImageTooLargeError` naming the limit. The float32 result is
    12 bytes per pixel (at most 600 MB at the default 50 megapixels). Also refused before
    decoding: files over ``max_file_bytes``, JPEGs with more than ``max_jpeg_scans`` scans (a
    CPU bomb in progressive JPEG), TIFF strips or tiles whose deflate/LZMA data expands beyond
    twice the image's own size (a memory bomb no header check sees; counted in 1 MiB pieces,
    never held). Pillow's own bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on
    top and is reported the same way.

Decoders
    Our own header walk comes first for every format (PNG: every chunk's length, type and CRC
    up to IEND; JPEG: markers up to the frame header, scan count, end marker; TIFF: tifffile's
    IFDs, strips inside the file). Then PNG (8-bit and 16-bit gray), JPEG, BMP, WebP and GIF
    decode with Pillow; 16-bit colour PNGs with OpenCV (Pillow keeps only 8 bits of those);
    TIFF with tifffile when it can do so itself (uncompressed, deflate, LZMA; gray, RGB, CMYK),
    16-bit RGB with other compressions (LZW, PackBits) with OpenCV, everything else with
    Pillow. A truncated file is refused, not padded.

Several frames (``DecodeLimits.multi_frame``)
    Default ``"refuse"``: an animated GIF, APNG or WebP, or a TIFF with more than one
    full-resolution page, raises ``ImageReadError`` saying how many frames it holds. Silently
    inspecting frame 0 could pass a part whose defect is on page 2: a quality check should
    not guess which image was meant. ``"first"`` inspects the first frame instead. Pages that
    are not separate images are ignored either way: TIFF reduced-resolution pages (thumbnails,
    pyramid levels) and transparency masks, and the extra images of an MPO JPEG (previews,
    depth maps; the primary image is decoded).

Pixel conversions (files and caller arrays alike, see :func:`as_float_rgb`)
    - uint8 / 255; uint16 (16-bit PNG, TIFF) / 65535 at full 16-bit precision; bool -> 0 or 1;
      other integer types must hold 8-bit values 0..255 (scaled by 255; anything else is
      ambiguous and refused: cast 16-bit data to uint16).
    - Floating-point pixels (e.g. float32 / float64 TIFF) must already lie in [0, 1] (a
      tolerance of 1e-4, then clipped): they are never rescaled, because per-image min-max
      scaling would hide exactly the brightness defects the detector looks for. NaN or
      infinite values are refused, so a score is never NaN.
    - Gray (H, W) or (H, W, 1) -> three equal channels; palette -> RGB (RGBA with
      transparency); CMYK (JPEG, TIFF) -> RGB by R = (1 - C)(1 - K) (no ICC profile);
      YCbCr -> RGB.
    - Alpha (gray+alpha, RGBA, palette transparency) is composited over black: the background
      of a part on a light table is unknown, black keeps masked-out regions at zero.
      Premultiplied alpha is therefore dropped, and TIFF extra samples that are not alpha are
      ignored.
    - Refused: 1-D, empty or zero-sized arrays, 4-D stacks, channel counts other than
      1 to 4 (a channels-first (3, H, W) array gets a hint), complex, object, string and
      date types. A (1, N) array is a valid one-row gray image.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from defectlens.errors import ConfigError, ImageFormatError, ImageReadError, ImageTooLargeError

__all__ = [
    "DECODABLE_FORMATS",
    "DEFAULT_FORMATS",
    "DecodeLimits",
    "IMAGE_SUFFIXES",
    "PathLike",
    "as_float_rgb",
    "decode_image_bytes",
    "get_decode_limits",
    "identify_format",
    "is_image_file",
    "read_image",
    "read_mask",
    "save_png",
    "set_decode_limits",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Formats this module can decode (Pillow's names), with the file suffixes that announce them.
FORMAT_SUFFIXES = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
}
DECODABLE_FORMATS = tuple(FORMAT_SUFFIXES)
DEFAULT_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
#: Suffixes of the default formats (kept for callers that import it; see :func:`is_image_file`).
IMAGE_SUFFIXES = tuple(suffix for fmt in DEFAULT_FORMATS for suffix in FORMAT_SUFFIXES[fmt])

_DISPLAY = {"WEBP": "WebP"}
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
MULTI_FRAME_POLICIES = ("refuse", "first")
FLOAT_RANGE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class DecodeLimits:
    """What a decode may cost and which files it accepts; checked from the header, before decoding.

    Attributes:
        max_pixels: most pixels (width x height) of an image.
        max_side: longest side in pixels.
        max_decoded_bytes: most bytes the decoded pixels may take: width x height x channels x
            bytes per sample, as stored in the file (the float32 RGB result is 12 bytes/pixel).
        max_file_bytes: largest encoded file accepted.
        max_jpeg_scans: most scans (SOS markers) in a JPEG; progressive JPEGs have about 10,
            each scan costs a pass over the whole image.
        formats: accepted formats, any of :data:`DECODABLE_FORMATS` (case-insensitive; "JPG"
            and "TIF" are aliases).
        multi_frame: ``"refuse"`` (default) a file with several frames or pages, or decode
            only its ``"first"``.
    """

    max_pixels: int = 50_000_000
    max_side: int = 16_384
    max_decoded_bytes: int = 600 * 1024**2
    max_file_bytes: int = 1024**3
    max_jpeg_scans: int = 100
    formats: tuple = DEFAULT_FORMATS
    multi_frame: str = "refuse"

    def __post_init__(self) -> None:
        for field in ("max_pixels", "max_side", "max_decoded_bytes", "max_file_bytes", "max_jpeg_scans"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"DecodeLimits.{field} must be a positive integer, got {value!r}")
            object.__setattr__(self, field, int(value))
        if isinstance(self.formats, str):
            raise ConfigError(f"DecodeLimits.formats must be a sequence of format names, got the string {self.formats!r}")
        formats = []
        for name in self.formats:
            canonical = _ALIASES.get(str(name).upper(), str(name).upper())
            if canonical not in DECODABLE_FORMATS:
                raise ConfigError(
                    f"DecodeLimits.formats: {name!r} is not a format defectlens decodes; choose from {', '.join(DECODABLE_FORMATS)}"
                )
            if canonical not in formats:
                formats.append(canonical)
        if not formats:
            raise ConfigError("DecodeLimits.formats must name at least one format")
        object.__setattr__(self, "formats", tuple(formats))
        if self.multi_frame not in MULTI_FRAME_POLICIES:
            raise ConfigError(f"DecodeLimits.multi_frame must be one of {MULTI_FRAME_POLICIES}, got {self.multi_frame!r}")

    @property
    def accepted(self) -> str:
        """The accepted formats as a message fragment: "PNG, JPEG, TIFF, BMP, WebP"."""
        return ", ".join(_display(fmt) for fmt in self.formats)

    @property
    def suffixes(self) -> tuple:
        return tuple(suffix for fmt in self.formats for suffix in FORMAT_SUFFIXES[fmt])


_limits = DecodeLimits()


def get_decode_limits() -> DecodeLimits:
    """The process-wide limits used when a call passes none."""
    return _limits


def set_decode_limits(limits: Optional[DecodeLimits] = None, /, **changes) -> DecodeLimits:
    """Set the process-wide limits; returns the previous ones (to restore them later).

    ``set_decode_limits(DecodeLimits(...))`` installs those, ``set_decode_limits(max_pixels=...)``
    changes fields of the current ones, ``set_decode_limits()`` restores the defaults. Meant for
    start-up; per-call ``limits=`` is the thread-safe way to differ for one decode.
    """
    global _limits
    previous = _limits
    if limits is None:
        limits = previous if changes else DecodeLimits()
    if not isinstance(limits, DecodeLimits):
        raise ConfigError(f"expected DecodeLimits, got {type(limits).__name__}")
    try:
        _limits = dataclasses.replace(limits, **changes) if changes else limits
    except TypeError as error:
        raise ConfigError(f"unknown decode limit: {error}") from None
    return previous


def is_image_file(path: PathLike, limits: Optional[DecodeLimits] = None) -> bool:
    """True when the file name has the suffix of an accepted format (the decode itself trusts
    the content, not the name)."""
    return Path(path).suffix.lower() in (limits or _limits).suffixes


# --------------------------------------------------------------------------- identification

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FOREIGN_SIGNATURES = (
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"8BPS", "PSD"),
    (b"DDS ", "DDS"),
    (b"\x01\xda", "SGI"),
    (b"icns", "ICNS"),
    (b"BLP1", "BLP"),
    (b"BLP2", "BLP"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"),
    (b"/* XPM */", "XPM"),
    (b"#define", "XBM"),
    (b"\xb1\x68\xde\x3a", "DCX"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
)


def identify_format(data: bytes) -> Optional[str]:
    """The image format the content's magic bytes announce.

    Returns the Pillow name of a decodable format ("PNG", "JPEG", "TIFF", "BMP", "WEBP",
    "GIF"), a descriptive name of a format recognised but never decoded ("ICO", "QOI",
    "JPEG 2000", "TGA", "SVG/HTML/XML text", ...), or None when the content is unknown.
    """
    head = bytes(data[:64])
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    for signature, name in _FOREIGN_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 6 and _u16le(head, 4) >= 1:
        return "ICO" if head[2] == 1 else "CUR"  # reserved 0, type, image count >= 1
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1").strip().lower()
        return "AVIF" if brand.startswith("avi") else "HEIF" if brand[:3] in ("hei", "hev", "mif", "msf") else "ISO media (MP4/MOV/HEIF)"
    if head.startswith(b"RIFF"):
        return f"RIFF {head[8:12].decode('latin-1').strip() or '?'} (not WebP)"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PNM (PBM/PGM/PPM/PAM)"
    if len(head) >= 4 and head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] == 1:
        return "PCX"
    if len(data) >= 26 and bytes(data[-18:]) == b"TRUEVISION-XFILE.\x00":
        return "TGA"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        return "SVG/HTML/XML text"
    if _looks_like_tga(head):
        return "TGA"
    return None


def _looks_like_tga(head: bytes) -> bool:
    """TGA has no magic number (only an optional footer): the usual header-shape heuristic."""
    if len(head) < 18 or head[1] not in (0, 1) or head[2] not in (1, 2, 3, 9, 10, 11):
        return False
    if head[16] not in (8, 15, 16, 24, 32) or head[12:14] == b"\0\0" or head[14:16] == b"\0\0":
        return False
    colormap = head[3:8]
    return colormap == b"\0" * 5 if head[1] == 0 else head[7] in (15, 16, 24, 32)


def _display(fmt: str) -> str:
    return _DISPLAY.get(fmt, fmt)


# --------------------------------------------------------------------------- errors, limits


class _Header(NamedTuple):
    width: int
    height: int
    channels: int
    bytes_per_sample: int


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _display_name(name: object) -> str:
    """The file name as it goes into a message: control characters and bidi overrides
    replaced, very long names shortened (uploads name themselves)."""
    text = _CONTROL.sub("?", str(name))
    return text if len(text) <= 300 else text[:200] + "..." + text[-80:]


def _describe(error: BaseException) -> str:
    message = _OBJECT_REPR.sub("", str(error)).replace("\n", " ").strip()
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _unreadable(name: str, fmt: str, detail: str) -> ImageReadError:
    return ImageReadError(name, f"not a readable image ({_display(fmt)}: {detail})")


def _check_limits(name: str, fmt: str, header: _Header, limits: DecodeLimits) -> None:
    width, height, channels, nbytes = header
    if width <= 0 or height <= 0:
        raise _unreadable(name, fmt, f"the header gives a size of {width}x{height} pixels")
    kind = _display(fmt)
    side = max(width, height)
    if side > limits.max_side:
        raise ImageTooLargeError(
            name,
            f"too large to decode: the {kind} image is {width}x{height} pixels, the longest side may be at most "
            f"{limits.max_side} px (DecodeLimits.max_side)",
            limit="max_side", value=side, maximum=limits.max_side,
        )
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageTooLargeError(
            name,
            f"too large to decode: the {kind} image is {width}x{height} = {pixels / 1e6:.1f} megapixels, at most "
            f"{limits.max_pixels / 1e6:g} megapixels are decoded (DecodeLimits.max_pixels)",
            limit="max_pixels", value=pixels, maximum=limits.max_pixels,
        )
    decoded = pixels * channels * nbytes
    if decoded > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            name,
            f"too large to decode: the {kind} image ({width}x{height} px x {channels} channels x {nbytes} bytes) "
            f"decodes to {decoded / 2**20:.0f} MiB, at most {limits.max_decoded_bytes / 2**20:.0f} MiB "
            f"(DecodeLimits.max_decoded_bytes)",
            limit="max_decoded_bytes", value=decoded, maximum=limits.max_decoded_bytes,
        )


def _check_file_size(name: str, size: int, limits: DecodeLimits) -> None:
    if size > limits.max_file_bytes:
        raise ImageTooLargeError(
            name,
            f"too large to decode: the file is {size / 2**20:.0f} MiB, at most {limits.max_file_bytes / 2**20:.0f} MiB "
            f"(DecodeLimits.max_file_bytes)",
            limit="max_file_bytes", value=size, maximum=limits.max_file_bytes,
        )


def _refuse_frames(name: str, fmt: str, frames: str) -> ImageReadError:
    return ImageReadError(
        name,
        f"the {_display(fmt)} file holds {frames}; defectlens inspects one image per file and does not guess "
        f"which one was meant: save each frame as its own file (or decode only the first with "
        f"DecodeLimits(multi_frame='first'))",
    )


# --------------------------------------------------------------------------- headers


def _u16le(data: bytes, pos: int) -> int:
    return struct.unpack_from("<H", data, pos)[0]


def _png_header(data: bytes, name: str, limits: DecodeLimits) -> tuple:
    """Walk every chunk up to IEND: lengths, types and CRCs checked; returns (header, IHDR info,
    animation frame count or None)."""
    view = memoryview(data)
    size = len(data)
    pos = len(_PNG_SIGNATURE)
    ihdr = None
    frames = None
    seen_data = seen_palette = False
    count = 0
    while True:
        if pos + 12 > size:
            raise _unreadable(name, "PNG", f"file truncated at offset {pos} (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        label = kind.decode("latin-1")
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise _unreadable(name, "PNG", f"corrupt chunk header at offset {pos}")
        end = pos + 12 + length
        if end > size:
            raise _unreadable(name, "PNG", f"file truncated inside chunk {label!r} at offset {pos}")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            raise _unreadable(name, "PNG", f"chunk {label!r} at offset {pos} fails its CRC check (corrupt file)")
        if ihdr is None and kind != b"IHDR":
            raise _unreadable(name, "PNG", f"first chunk is {label!r}, not IHDR")
        if kind == b"IHDR":
            if ihdr is not None or length != 13:
                raise _unreadable(name, "PNG", "malformed IHDR chunk")
            width, height, depth, color, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, pos + 8)
            valid = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
            if depth not in valid.get(color, ()) or compression or filtering or interlace > 1:
                raise _unreadable(name, "PNG", f"invalid IHDR (bit depth {depth}, colour type {color})")
            if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
                raise _unreadable(name, "PNG", "invalid IHDR size")
            ihdr = (width, height, depth, color)
        elif kind == b"acTL" and length == 8 and not seen_data:
            frames = struct.unpack_from(">I", data, pos + 8)[0]
        elif kind == b"PLTE":
            seen_palette = True
        elif kind == b"IDAT":
            if ihdr[3] == 3 and not seen_palette:
                raise _unreadable(name, "PNG", "palette image without a PLTE chunk")
            seen_data = True
        elif kind == b"IEND":
            break
        pos = end
        count += 1
        if count > 1_000_000:
            raise _unreadable(name, "PNG", "more than a million chunks")
    if not seen_data:
        raise _unreadable(name, "PNG", "no IDAT chunk (no pixel data)")
    width, height, depth, color = ihdr
    channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}[color]  # palette: RGB(A) once expanded
    return _Header(width, height, channels, 2 if depth == 16 else 1), ihdr, frames


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes, name: str, limits: DecodeLimits) -> _Header:
    """Walk the markers to the frame header (SOF); count scans and look for the end marker."""
    size = len(data)
    pos = 2
    while True:
        if pos >= size:
            raise _unreadable(name, "JPEG", "file truncated before the frame header")
        if data[pos] != 0xFF:
            raise _unreadable(name, "JPEG", f"corrupt marker structure at offset {pos}")
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos >= size:
            raise _unreadable(name, "JPEG", "file truncated before the frame header")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD8, 0xD9, 0xDA, 0x00):
            raise _unreadable(name, "JPEG", f"marker 0x{marker:02X} before the frame header")
        if pos + 2 > size:
            raise _unreadable(name, "JPEG", "file truncated before the frame header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > size:
            raise _unreadable(name, "JPEG", f"corrupt or truncated segment 0x{marker:02X} at offset {pos - 2}")
        if marker in _JPEG_SOF:
            if length < 8:
                raise _unreadable(name, "JPEG", "malformed frame header")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            start = pos + length
            break
        pos += length
    if height == 0:
        raise _unreadable(name, "JPEG", "height given by a DNL marker (not supported)")
    if components not in (1, 3, 4):
        raise _unreadable(name, "JPEG", f"{components} colour components (expected 1, 3 or 4)")
    first_scan = data.find(b"\xff\xda", start)
    if first_scan < 0:
        raise _unreadable(name, "JPEG", "file truncated: no scan data")
    scans = data.count(b"\xff\xda", first_scan)
    if scans > limits.max_jpeg_scans:
        raise ImageTooLargeError(
            name,
            f"too costly to decode: the JPEG has {scans} scans, at most {limits.max_jpeg_scans} "
            f"(DecodeLimits.max_jpeg_scans)",
            limit="max_jpeg_scans", value=scans, maximum=limits.max_jpeg_scans,
        )
    if data.rfind(b"\xff\xd9") < first_scan:
        raise _unreadable(name, "JPEG", "file truncated (no end-of-image marker)")
    return _Header(width, height, components, 1 if precision <= 8 else 2)


def _gif_header(data: bytes, name: str, limits: DecodeLimits) -> _Header:
    if len(data) < 13:
        raise _unreadable(name, "GIF", "file truncated inside the header")
    return _Header(_u16le(data, 6), _u16le(data, 8), 4, 1)


def _bmp_header(data: bytes, name: str, limits: DecodeLimits) -> _Header:
    if len(data) < 26:
        raise _unreadable(name, "BMP", "file truncated inside the header")
    (dib,) = struct.unpack_from("<I", data, 14)
    if dib == 12:
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
    elif dib >= 16 and len(data) >= 30:
        width, height, _planes, bits = struct.unpack_from("<iiHH", data, 18)
        height = abs(height)
    else:
        raise _unreadable(name, "BMP", f"unknown header size {dib}")
    return _Header(width, height, 4 if bits == 32 else 3, 1)


def _webp_header(data: bytes, name: str, limits: DecodeLimits) -> _Header:
    """The canvas size from the first chunk (libwebp allocates the canvas before decoding)."""
    if len(data) < 30:
        raise _unreadable(name, "WEBP", "file truncated inside the header")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 > len(data):
        raise _unreadable(name, "WEBP", f"file truncated ({len(data)} of {riff_size + 8} bytes)")
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _unreadable(name, "WEBP", "corrupt VP8 frame header")
        width = _u16le(data, 26) & 0x3FFF
        height = _u16le(data, 28) & 0x3FFF
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _unreadable(name, "WEBP", "corrupt VP8L header")
        (bits,) = struct.unpack_from("<I", data, 21)
        width = 1 + (bits & 0x3FFF)
        height = 1 + ((bits >> 14) & 0x3FFF)
    else:
        raise _unreadable(name, "WEBP", f"unknown first chunk {chunk!r}")
    return _Header(width, height, 4, 1)


# --------------------------------------------------------------------------- Pillow

# mode -> (channels, bytes per sample) of the decoded pixels, for the limit check after open
_MODE_SIZE = {
    "1": (1, 1), "L": (1, 1), "P": (4, 1), "LA": (2, 1), "La": (2, 1), "PA": (4, 1),
    "RGB": (3, 1), "RGBA": (4, 1), "RGBX": (4, 1), "RGBa": (4, 1), "CMYK": (4, 1), "YCbCr": (3, 1),
    "LAB": (3, 1), "HSV": (3, 1), "I": (1, 4), "F": (1, 4),
    "I;16": (1, 2), "I;16L": (1, 2), "I;16B": (1, 2), "I;16N": (1, 2),
}


def _pil_pixels(image: Image.Image, name: str, fmt: str, mask: bool) -> tuple:
    """A loaded Pillow image -> (array, layout) with layout one of L, LA, RGB, RGBA, CMYK."""
    mode = image.mode
    if mode in ("P", "PA"):
        if mask:  # a mask's palette indices are its labels: index 0 is background
            return np.asarray(image), "L" if mode == "P" else "LA"
        rgba = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if rgba else "RGB")), "RGBA" if rgba else "RGB"
    if mode in ("1", "L", "F"):
        return np.asarray(image), "L"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # unsigned 16-bit, any byte order
        return np.asarray(image).astype(np.uint16), "L"
    if mode.startswith("I;16"):  # signed: the integer rule of _scale decides
        return np.asarray(image).astype(np.int32), "L"
    if mode == "I":
        pixels = np.asarray(image)
        # Pillow may give 16-bit gray PNGs as 32-bit mode "I": the header says 16 bits
        return (pixels.astype(np.uint16) if fmt == "PNG" else pixels), "L"
    if mode == "LA":
        return np.asarray(image), "LA"
    if mode == "La":  # premultiplied: composited over black already
        return np.asarray(image)[:, :, 0], "L"
    if mode == "RGB":
        return np.asarray(image), "RGB"
    if mode == "RGBA":
        return np.asarray(image), "RGBA"
    if mode in ("RGBX", "RGBa"):  # padding byte / premultiplied alpha: colour as stored
        return np.asarray(image)[:, :, :3], "RGB"
    if mode == "CMYK":
        return np.asarray(image), "CMYK"
    if mode in ("YCbCr", "HSV"):
        return np.asarray(image.convert("RGB")), "RGB"
    raise _unreadable(name, fmt, f"pixel mode {mode} is not supported")


def _decode_with_pil(data: bytes, name: str, fmt: str, limits: DecodeLimits, mask: bool, page: int = 0) -> tuple:
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        if page:
            image.seek(page)
        channels, nbytes = _MODE_SIZE.get(image.mode, (4, 4))
        _check_limits(name, fmt, _Header(image.size[0], image.size[1], channels, nbytes), limits)
        if fmt in ("PNG", "GIF", "WEBP") and limits.multi_frame == "refuse" and getattr(image, "is_animated", False):
            frames = getattr(image, "n_frames", 0) if fmt != "GIF" else 0  # counting GIF frames reads it all
            raise _refuse_frames(name, fmt, f"{frames} animation frames" if frames else "an animation (several frames)")
        image.load()
        return _pil_pixels(image, name, fmt, mask)


def _decode_with_cv2(data: bytes, name: str, fmt: str) -> tuple:
    """16-bit colour (Pillow keeps 8 bits of those): OpenCV keeps all 16."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise _unreadable(name, fmt, "OpenCV could not decode it")
    if pixels.ndim == 2:
        return pixels, "L"
    channels = pixels.shape[2]
    if channels == 3:
        return pixels[:, :, ::-1], "RGB"
    if channels == 4:
        return pixels[:, :, [2, 1, 0, 3]], "RGBA"
    return pixels, {1: "L", 2: "LA"}.get(channels, "?")


# --------------------------------------------------------------------------- formats


def _decode_png(data: bytes, name: str, limits: DecodeLimits, mask: bool) -> tuple:
    header, (_w, _h, depth, color), frames = _png_header(data, name, limits)
    _check_limits(name, "PNG", header, limits)
    if frames is not None and frames > 1 and limits.multi_frame == "refuse":
        raise _refuse_frames(name, "PNG", f"{frames} animation frames (APNG)")
    if depth == 16 and color in (2, 4, 6):
        return _decode_with_cv2(data, name, "PNG")
    return _decode_with_pil(data, name, "PNG", limits, mask)


def _pil_decoder(fmt: str, read_header: Callable) -> Callable:
    """Our own header check first (before Pillow allocates anything), then Pillow."""

    def decode(data: bytes, name: str, limits: DecodeLimits, mask: bool) -> tuple:
        _check_limits(name, fmt, read_header(data, name, limits), limits)
        return _decode_with_pil(data, name, fmt, limits, mask)

    return decode


# TIFF --------------------------------------------------------------------------------------

_TIFF_INFLATE = {8: "zlib", 32946: "zlib", 34925: "lzma"}  # compressions tifffile decodes itself
_TIFF_MINISBLACK, _TIFF_RGB, _TIFF_SEPARATED = 1, 2, 5
_TIFF_PAGES_EXAMINED = 64
_INFLATE_CHUNK = 1 << 20


def _inflated_size(segment: memoryview, kind: str, budget: int) -> int:
    """Bytes a deflate / LZMA segment expands to, counted in 1 MiB pieces; stops past budget."""
    total = 0
    if kind == "zlib":
        inflater = zlib.decompressobj()
        pending = segment
        while True:
            out = inflater.decompress(pending, _INFLATE_CHUNK)
            total += len(out)
            if total > budget:
                return total
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and len(out) < _INFLATE_CHUNK):
                return total
    import lzma

    inflater = lzma.LZMADecompressor()
    out = inflater.decompress(bytes(segment), max_length=_INFLATE_CHUNK)
    total += len(out)
    while total <= budget and not inflater.eof and not inflater.needs_input:
        out = inflater.decompress(b"", max_length=_INFLATE_CHUNK)
        if not out:
            break
        total += len(out)
    return total


def _tiff_main_page(tif, name: str, limits: DecodeLimits) -> tuple:
    """(index, page) of the first full-resolution page; refuses a second one unless 'first'."""
    found = None
    for index in range(_TIFF_PAGES_EXAMINED):
        try:
            page = tif.pages[index]
        except IndexError:
            if index == 0:
                raise _unreadable(name, "TIFF", "no valid image file directory") from None
            break
        if page.is_reduced or page.is_mask:  # thumbnails, pyramid levels, transparency masks
            continue
        if found is not None:
            raise _refuse_frames(name, "TIFF", "several full-resolution pages")
        found = (index, page)
        if limits.multi_frame == "first":
            break
    if found is None:
        raise _unreadable(name, "TIFF", "no full-resolution page")
    return found


def _tiff_layout(pixels: np.ndarray, page, name: str) -> tuple:
    """tifffile's array -> (H, W[, C]) with the photometric interpretation made explicit."""
    if page.axes == "SYX":
        pixels = np.moveaxis(pixels, 0, -1)
    extras = [int(sample) for sample in page.extrasamples]
    samples = 1 if pixels.ndim == 2 else pixels.shape[2]
    colours = samples - len(extras)
    photometric = int(page.photometric)
    inkset = page.tags.get(332)
    base = {
        (_TIFF_MINISBLACK, 1): "L",
        (_TIFF_RGB, 3): "RGB",
        (_TIFF_SEPARATED, 4): "CMYK" if inkset is None or inkset.value == 1 else None,
    }.get((photometric, colours))
    if base is None:
        raise _unreadable(
            name, "TIFF", f"{samples} samples per pixel ({colours} colour + {len(extras)} extra) in photometric "
            f"interpretation {page.photometric.name} are not supported"
        )
    if pixels.ndim == 2:
        return pixels, base
    colour = pixels[:, :, :colours]
    if extras and extras[0] == 2:  # unassociated alpha: composite over black
        return np.concatenate([colour, pixels[:, :, colours : colours + 1]], axis=2), base + "A"
    # associated (premultiplied) alpha is composited over black already; unspecified extra
    # samples are not alpha (TIFF 6.0): both dropped
    return (colour[:, :, 0] if colours == 1 else colour), base


def _decode_tiff(data: bytes, name: str, limits: DecodeLimits, mask: bool) -> tuple:
    import tifffile

    first_error = None
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        index, page = _tiff_main_page(tif, name, limits)
        if page.imagedepth > 1:
            raise _unreadable(name, "TIFF", f"volumetric image (depth {page.imagedepth}) is not supported")
        samples = int(page.samplesperpixel)
        nbytes = page.dtype.itemsize if page.dtype is not None else max(1, -(-int(page.bitspersample) // 8))
        header = _Header(int(page.imagewidth), int(page.imagelength), samples, nbytes)
        _check_limits(name, "TIFF", header, limits)
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0 or offsets.shape != counts.shape or not counts.any():
            raise _unreadable(name, "TIFF", "no pixel data")
        if (offsets < 0).any() or (counts < 0).any() or (offsets + counts > len(data)).any():
            raise _unreadable(name, "TIFF", "file truncated (strips or tiles point past its end)")
        compression = int(page.compression)
        if (
            (compression == 1 or compression in _TIFF_INFLATE)
            and int(page.photometric) in (_TIFF_MINISBLACK, _TIFF_RGB, _TIFF_SEPARATED)
            and int(page.bitspersample) >= 8
            and page.dtype is not None
            and page.axes in ("YX", "YXS", "SYX")
        ):
            if compression in _TIFF_INFLATE:
                own = header.width * header.height * samples * nbytes
                budget = min(limits.max_decoded_bytes, 2 * own + (1 << 20))
                view = memoryview(data)
                total = 0
                for offset, count in zip(offsets.tolist(), counts.tolist()):
                    if count:
                        total += _inflated_size(view[offset : offset + count], _TIFF_INFLATE[compression], budget - total)
                    if total > budget:
                        raise ImageTooLargeError(
                            name,
                            f"too large to decode: the TIFF's compressed data expands beyond {budget / 2**20:.0f} MiB "
                            f"for a {header.width}x{header.height} image (a decompression bomb)",
                            limit="max_decoded_bytes", value=total, maximum=budget,
                        )
            try:
                return _tiff_layout(page.asarray(), page, name) if not mask else (_tiff_mask_array(page), "L")
            except ImageReadError:
                raise
            except Exception as error:  # e.g. a predictor that needs imagecodecs: Pillow may do it
                first_error = error
        use_cv2 = (
            index == 0 and not mask and int(page.bitspersample) == 16 and int(page.photometric) == _TIFF_RGB
            and samples in (3, 4) and compression not in _TIFF_INFLATE and compression != 1
        )
        size = (header.width, header.height)
    if use_cv2:  # 16-bit colour with LZW, PackBits, ...: Pillow would keep only 8 bits
        pixels, layout = _decode_with_cv2(data, name, "TIFF")
        if pixels.shape[1::-1] != size:
            raise _unreadable(name, "TIFF", "decoded size differs from the header")
        return pixels, layout
    try:
        pixels, layout = _decode_with_pil(data, name, "TIFF", limits, mask, page=index)
    except ImageReadError:
        raise
    except Exception as error:
        detail = _describe(error) if first_error is None else f"{_describe(first_error)}; Pillow: {_describe(error)}"
        raise _unreadable(name, "TIFF", detail) from None
    if pixels.shape[1::-1] != size:
        raise _unreadable(name, "TIFF", "Pillow and the TIFF header disagree on the image size")
    return pixels, layout


def _tiff_mask_array(page) -> np.ndarray:
    pixels = page.asarray()
    if page.axes == "SYX":
        pixels = pixels[0]
    return pixels


_DECODERS = {
    "PNG": _decode_png,
    "JPEG": _pil_decoder("JPEG", _jpeg_header),
    "GIF": _pil_decoder("GIF", _gif_header),
    "BMP": _pil_decoder("BMP", _bmp_header),
    "WEBP": _pil_decoder("WEBP", _webp_header),
    "TIFF": _decode_tiff,
}


# --------------------------------------------------------------------------- pixels


def _scale(pixels: np.ndarray, name: str) -> np.ndarray:
    """Any supported dtype -> float32 in [0, 1] (one new array)."""
    dtype = pixels.dtype
    if dtype == np.bool_:
        return pixels.astype(np.float32)
    if dtype == np.uint8 or dtype == np.uint16:
        scaled = pixels.astype(np.float32)
        np.divide(scaled, 255.0 if dtype == np.uint8 else 65535.0, out=scaled)
        return scaled
    if dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ImageReadError(
                name,
                f"{dtype} pixels range over {low}..{high}: integer pixels other than uint8/uint16 must hold 8-bit "
                f"values 0..255; cast 16-bit data to uint16 (scaled by 65535) or pass floats in [0, 1]",
            )
        scaled = pixels.astype(np.float32)
        np.divide(scaled, 255.0, out=scaled)
        return scaled
    if dtype.kind == "f":
        finite = np.isfinite(pixels)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ImageReadError(
                name, f"{bad} of {finite.size} pixel values are NaN or infinite; only finite values in [0, 1] are accepted"
            )
        del finite
        low, high = float(pixels.min()), float(pixels.max())  # in the input's own precision
        if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
            raise ImageReadError(
                name,
                f"floating-point image with values outside [0, 1] (min {low:.6g}, max {high:.6g}); float pixels are "
                f"never rescaled: scale them to [0, 1] first",
            )
        scaled = pixels.astype(np.float32)
        np.clip(scaled, 0.0, 1.0, out=scaled)
        return scaled
    raise ImageReadError(name, f"unsupported pixel type {dtype}")


_LAYOUT_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "CMYKA": 5}


def _to_float_rgb(pixels: np.ndarray, name: str, layout: Optional[str] = None) -> np.ndarray:
    """(H, W) or (H, W, C) of a supported dtype -> C-contiguous float32 (H, W, 3) in [0, 1]."""
    if not isinstance(pixels, np.ndarray):
        try:
            pixels = np.asarray(pixels)
        except Exception as error:  # ragged lists and the like
            raise ImageReadError(name, f"not an image array ({_describe(error)})") from None
    if pixels.dtype.kind not in "biuf":
        raise ImageReadError(name, f"unsupported pixel type {pixels.dtype}")
    shape = pixels.shape
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    elif pixels.ndim != 3:
        hint = {0: "a scalar", 1: f"a 1-D array of {pixels.size} values"}.get(pixels.ndim, "a stack of images: pass one at a time")
        raise ImageReadError(name, f"expected an image of shape (H, W) or (H, W, C), got shape {shape} ({hint})")
    height, width, channels = pixels.shape
    if height == 0 or width == 0 or channels == 0:
        raise ImageReadError(name, f"image has zero width or height (shape {shape})")
    if layout is None:
        layout = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels)
        if layout is None:
            hint = " (it looks channels-first: transpose it to (H, W, C))" if shape[0] in (1, 2, 3, 4) else ""
            raise ImageReadError(
                name,
                f"unsupported channel count {channels} in shape {shape}: expected 1 (gray), 2 (gray + alpha), "
                f"3 (RGB) or 4 (RGBA){hint}",
            )
    if _LAYOUT_CHANNELS.get(layout) != channels:
        raise ImageReadError(name, f"unsupported channel count {channels} for {layout} pixels")
    scaled = _scale(pixels, name)
    if layout == "RGB":
        return np.ascontiguousarray(scaled)
    rgb = np.empty((height, width, 3), dtype=np.float32)
    if layout in ("L", "LA"):
        rgb[...] = scaled[:, :, :1]
    elif layout == "RGBA":
        np.multiply(scaled[:, :, :3], scaled[:, :, 3:4], out=rgb)
    else:  # CMYK(A): naive conversion, no ICC profile
        np.subtract(1.0, scaled[:, :, :3], out=rgb)
        rgb *= 1.0 - scaled[:, :, 3:4]
    if layout in ("LA", "CMYKA"):
        rgb *= scaled[:, :, -1:]
    return rgb


# --------------------------------------------------------------------------- public API


def _decode(data: bytes, name: object, limits: Optional[DecodeLimits], mask: bool) -> tuple:
    """The one boundary: (pixels, layout) or ImageReadError, nothing else."""
    label = _display_name(name)
    limits = limits or _limits
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageReadError(label, f"expected the encoded image as bytes, got {type(data).__name__}")
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) == 0:
        raise ImageReadError(label, "file is empty (0 bytes)")
    _check_file_size(label, len(data), limits)
    fmt = identify_format(data)
    if fmt is None:
        raise ImageFormatError(label, f"not a readable image (unknown or unsupported format; accepted: {limits.accepted})")
    if fmt not in limits.formats:
        raise ImageFormatError(label, f"format {_display(fmt)} is not accepted; accepted: {limits.accepted}")
    try:
        pixels, layout = _DECODERS[fmt](data, label, limits, mask)
        height, width = pixels.shape[:2] if pixels.ndim >= 2 else (0, 0)
        channels = pixels.shape[2] if pixels.ndim == 3 else 1
        _check_limits(label, fmt, _Header(width, height, channels, pixels.dtype.itemsize), limits)
        return pixels, layout
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(
            label,
            f"too large to decode: {_describe(error)} (Pillow's PIL.Image.MAX_IMAGE_PIXELS)",
            limit="PIL.Image.MAX_IMAGE_PIXELS", maximum=int(Image.MAX_IMAGE_PIXELS or 0),
        ) from None
    except MemoryError:
        raise ImageReadError(label, f"not enough memory to decode this {_display(fmt)} image") from None
    except Exception as error:  # decoders raise anything on hostile input; report them alike
        logger.debug("decoding %s failed", label, exc_info=True)
        raise _unreadable(label, fmt, _describe(error)) from None


def decode_image_bytes(data: bytes, name: str = "<bytes>", *, limits: Optional[DecodeLimits] = None) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, WebP) to float32 RGB (H, W, 3) in [0, 1].

    Args:
        data: the file's content.
        name: how messages name it.
        limits: this call's :class:`DecodeLimits` (default: the process-wide ones).

    Raises:
        ImageReadError: empty, corrupt, truncated, not an accepted format
            (:class:`~defectlens.errors.ImageFormatError`), over a limit
            (:class:`~defectlens.errors.ImageTooLargeError`), several frames, non-finite pixels.
    """
    label = _display_name(name)
    pixels, layout = _decode(data, name, limits, mask=False)
    try:
        return _to_float_rgb(pixels, label, layout)
    except MemoryError:
        raise ImageReadError(label, "not enough memory to convert the decoded image") from None


def _read_bytes(path: PathLike, limits: Optional[DecodeLimits]) -> bytes:
    file = Path(path)
    label = _display_name(file)
    try:
        if not file.exists():
            raise ImageReadError(label, "no such file")
        if file.is_dir():
            raise ImageReadError(label, "is a directory, not an image file")
        _check_file_size(label, file.stat().st_size, limits or _limits)
        return file.read_bytes()
    except ImageReadError:
        raise
    except (OSError, ValueError) as error:  # permissions, a NUL in the name, ...
        raise ImageReadError(label, _describe(error)) from None


def read_image(path: PathLike, *, limits: Optional[DecodeLimits] = None) -> np.ndarray:
    """Read an image file as float32 RGB (H, W, 3) in [0, 1] (see :func:`decode_image_bytes`).

    Raises:
        ImageReadError: the file is missing, empty, corrupt, over a limit or not an image.
    """
    return decode_image_bytes(_read_bytes(path, limits), str(path), limits=limits)


def read_mask(path: PathLike, *, limits: Optional[DecodeLimits] = None) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W): any non-zero pixel of the first channel (of the
    palette index, for palette images) is defective. Same formats and limits as images."""
    label = _display_name(path)
    pixels, _layout = _decode(_read_bytes(path, limits), str(path), limits, mask=True)
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0]
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageReadError(label, "mask holds NaN or infinite values")
    if pixels.dtype.kind not in "biuf":
        raise ImageReadError(label, f"unsupported mask pixel type {pixels.dtype}")
    return np.ascontiguousarray(pixels > 0)


def as_float_rgb(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Accept an array from the caller and make it float32 RGB (H, W, 3) in [0, 1].

    (H, W) is gray, (H, W, 1|2|3|4) gray / gray + alpha / RGB / RGBA; conversions and refusals
    as in the module docstring.

    Raises:
        ImageReadError: an array that is not an image (1-D, empty, 4-D, other channel counts,
            complex or object dtype, non-finite or out-of-range floats).
    """
    return _to_float_rgb(image, _display_name(name))


def save_png(path: PathLike, pixels: np.ndarray) -> None:
    """Write uint8 (H, W) or (H, W, 3) as PNG, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
