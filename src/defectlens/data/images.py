"""Decode image files into float32 RGB arrays in [0, 1], converting every format explicitly.

Handled: 8-bit and 16-bit, grayscale (L, I;16), grayscale+alpha, RGB, RGBA, palette, and any
size or aspect ratio. Alpha is composited over black (the background of a part on a light
table is unknown, black keeps masked-out regions at zero). Anything else raises
:class:`~defectlens.errors.ImageReadError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectlens.errors import ImageReadError

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: PathLike) -> bool:
    """True when the file name has an image suffix we read."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_float_rgb(pixels: np.ndarray, path: str) -> np.ndarray:
    """Convert a decoded array (H, W), (H, W, 1|2|3|4) of any integer/float dtype to RGB float32."""
    if pixels.dtype == np.uint8:
        scaled = pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        scaled = pixels.astype(np.float32) / 65535.0
    elif pixels.dtype in (np.int32, np.uint32):
        # PIL decodes 16-bit grayscale PNGs as mode "I" (int32) holding 0..65535.
        scaled = pixels.astype(np.float32) / (65535.0 if pixels.max(initial=0) > 255 else 255.0)
    elif np.issubdtype(pixels.dtype, np.floating):
        scaled = pixels.astype(np.float32)
        if scaled.size and (np.nanmin(scaled) < 0.0 or np.nanmax(scaled) > 1.0):
            raise ImageReadError(path, "floating-point image with values outside [0, 1]")
    elif pixels.dtype == np.bool_:
        scaled = pixels.astype(np.float32)
    else:
        raise ImageReadError(path, f"unsupported pixel type {pixels.dtype}")
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    channels = scaled.shape[2]
    if channels == 1:
        rgb = np.repeat(scaled, 3, axis=2)
    elif channels == 2:  # gray + alpha
        rgb = np.repeat(scaled[:, :, :1] * scaled[:, :, 1:2], 3, axis=2)
    elif channels == 3:
        rgb = scaled
    elif channels == 4:  # RGBA, composited over black
        rgb = scaled[:, :, :3] * scaled[:, :, 3:4]
    else:
        raise ImageReadError(path, f"unsupported channel count {channels}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(path, "image has zero width or height")
    return np.ascontiguousarray(rgb, dtype=np.float32)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image).astype(np.uint16)
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "LA":
        return np.asarray(image)
    elif mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF, WebP) to float32 RGB (H, W, 3) in [0, 1]."""
    if len(data) == 0:
        raise ImageReadError(name, "file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = _pil_to_array(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if name.lower().endswith((".tif", ".tiff")):
            return _decode_tiff(data, name, error)
        detail = "unknown or unsupported format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise ImageReadError(name, f"not a readable image ({detail})") from None
    return _to_float_rgb(pixels, name)


def _decode_tiff(data: bytes, name: str, first_error: Exception) -> np.ndarray:
    """Fallback for TIFF flavours PIL cannot open (e.g. 16-bit RGB)."""
    import tifffile

    try:
        pixels = tifffile.imread(io.BytesIO(data))
    except Exception as error:  # tifffile raises many types; report them all the same way
        raise ImageReadError(name, f"not a readable image ({first_error}; {error})") from None
    return _to_float_rgb(np.asarray(pixels), name)


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as float32 RGB (H, W, 3) in [0, 1].

    Raises:
        ImageReadError: the file is missing, empty, corrupt or not an image.
    """
    file = Path(path)
    if not file.exists():
        raise ImageReadError(file, "no such file")
    if file.is_dir():
        raise ImageReadError(file, "is a directory, not an image file")
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ImageReadError(file, str(error)) from None
    return decode_image_bytes(data, str(file))


def read_mask(path: PathLike) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W): any non-zero pixel is defective."""
    file = Path(path)
    if not file.exists():
        raise ImageReadError(file, "no such file")
    try:
        with Image.open(file) as image:
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageReadError(file, f"not a readable mask ({error})") from None
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0]
    return pixels > 0


def as_float_rgb(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Accept an array from the caller (uint8/uint16/float, gray/RGB/RGBA) and make it float32 RGB."""
    return _to_float_rgb(np.asarray(image), name)


def save_png(path: PathLike, pixels: np.ndarray) -> None:
    """Write uint8 (H, W) or (H, W, 3) as PNG, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
