"""The pictures an inspection stores, at a bounded size, and re-drawing them at another threshold.

Stored per inspection (all PNG but the map), each at most ``max_side`` px (2048 by default) on
its longest side:

- ``preview``: the input image as decoded, re-encoded as PNG. The upload itself is stored
  verbatim for the record but never served: whatever else its bytes hold (a PNG+HTML
  polyglot, trailing data, metadata) stays out of every response.
- ``base``: the prepared image the model scored (after its ROI steps) at the stored map's size:
  what the heat map is drawn on, and drawn on again for another threshold.
- ``heatmap`` and ``mask``: overlay and defect mask at the inspection's threshold.
- ``map``: the float16 anomaly map (.npy).

A map larger than ``max_side`` is reduced by an integer factor with a block *maximum* (and the
mask likewise), so a region over a threshold in the full map is still over it in the stored
one - a re-thresholded mask can only grow by up to one block, never lose a defect. The
factor is kept in the database row (``map_scale``). Without this a 13000 x 13000 input left a
150-370 MB map per inspection and every GET decoded the full upload again; now a re-draw
decodes one small PNG and the result is cached (`ByteCache`).
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import cv2
import numpy as np

from defectlens.outputs import encode_map, encode_png
from defectlens.visualize import mask_image, overlay_heatmap

MAX_PICTURE_SIDE = 2048


def reduction_factor(shape: tuple[int, ...], max_side: int = MAX_PICTURE_SIDE) -> int:
    """Smallest integer factor that brings the longest side of `shape` (H, W, ...) to <= max_side."""
    return max(1, math.ceil(max(shape[0], shape[1]) / max_side))


def block_max(values: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) -> (ceil(H / f), ceil(W / f)): the maximum of each f x f block (edge blocks padded
    with their own edge values)."""
    if factor <= 1:
        return values
    height, width = values.shape
    padding = ((0, -height % factor), (0, -width % factor))
    padded = np.pad(values, padding, mode="edge") if padding[0][1] or padding[1][1] else values
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return blocks.max(axis=(1, 3))


def shrink(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float RGB (H, W, 3) resized to (h, w) with area averaging (no-op at the same size)."""
    if image.shape[:2] == tuple(shape):
        return image
    return cv2.resize(image, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_AREA)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def preview_png(pixels: np.ndarray, max_side: int = MAX_PICTURE_SIDE) -> bytes:
    """Float RGB (H, W, 3) in [0, 1] -> PNG, reduced to at most `max_side` px."""
    factor = reduction_factor(pixels.shape, max_side)
    height, width = pixels.shape[:2]
    small = shrink(pixels, (math.ceil(height / factor), math.ceil(width / factor))) if factor > 1 else pixels
    return encode_png(to_uint8(small))


@dataclass(frozen=True)
class InspectionPictures:
    """Encoded files of one inspection and the map's reduction factor (1 = full resolution)."""

    preview_png: bytes
    base_png: bytes
    heatmap_png: bytes
    mask_png: bytes
    map_npy: bytes
    map_scale: int


def draw(pixels: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, prepared: np.ndarray | None,
         threshold: float, max_side: int = MAX_PICTURE_SIDE, preview: bytes | None = None) -> InspectionPictures:
    """The stored pictures of a prediction.

    Args:
        pixels: the decoded input, float32 (H, W, 3).
        anomaly_map: float32 (h, w) at the prepared image's resolution.
        mask: bool (h, w), the defect pixels of the verdict.
        prepared: the prepared image (h, w, 3) the model scored (None: `pixels`).
        threshold: the inspection's threshold (the heat map's colour scale and outline).
        preview: the input's preview PNG when already made (`preview_png(pixels)`); then
            `pixels` is only used when `prepared` is None.
    """
    factor = reduction_factor(anomaly_map.shape, max_side)
    small_map = block_max(anomaly_map.astype(np.float32, copy=False), factor)
    small_mask = block_max(mask.astype(bool, copy=False), factor)
    base = shrink(pixels if prepared is None else prepared, small_map.shape)
    base_u8 = to_uint8(base)
    return InspectionPictures(
        preview_png=preview if preview is not None else preview_png(pixels, max_side),
        base_png=encode_png(base_u8),
        heatmap_png=encode_png(overlay_heatmap(base_u8 / np.float32(255), small_map, threshold, small_map > threshold)),
        mask_png=encode_png(mask_image(small_mask)),
        map_npy=encode_map(small_map),
        map_scale=factor,
    )


def decode_own_png(data: bytes) -> np.ndarray:
    """A PNG this service wrote -> float32 RGB (H, W, 3) in [0, 1] (trusted input, small)."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("stored picture is not a PNG")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def load_map(data: bytes) -> np.ndarray:
    """A stored .npy anomaly map -> float32 (h, w)."""
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def redraw(kind: str, anomaly_map: np.ndarray, threshold: float, base: np.ndarray | None) -> bytes:
    """Heat map (on `base`, resized to the map if needed) or mask of a stored map at `threshold`."""
    if kind == "mask":
        return encode_png(mask_image(anomaly_map > threshold))
    assert base is not None
    base = shrink(base, anomaly_map.shape)
    return encode_png(overlay_heatmap(base, anomaly_map, threshold, anomaly_map > threshold))


class ByteCache:
    """A thread-safe LRU of values with a size, bounded by their total size."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: object, size: int) -> None:
        if size > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            self._items[key] = (value, size)
            self._size += size
            while self._size > self.max_bytes and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._size -= dropped
