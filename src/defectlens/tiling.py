"""Tiling of images larger than the backbone's input, and stitching of per-tile anomaly maps.

An image (H, W, C) is cut into overlapping T x T tiles on a regular grid: along each axis the
tiles start every ``T - overlap`` pixels and the last tile is aligned to the border, so every
tile is full size and lies inside the image (the last overlap may be larger than asked).
Along an axis shorter than T there is one tile covering the whole axis: it is the image
itself (shorter than T) by default, or padded to T with ``pad_mode`` (padding after the
image, at the bottom/right; the tile's box still names the image pixels it covers only).

``iter_tiles`` is a generator: it yields one tile at a time, as a view into the image (no copy
unless padded), so the memory of tiling a 2048 x 2048 image stays one tile.

``MapStitcher`` accumulates the per-tile anomaly maps into a full-resolution map. In an
overlap the maps are blended with a weighted average; each tile's weight is a separable
window that is 1 inside the tile and ramps down (raised cosine by default, or linear) over
the overlap with each neighbour, exactly the overlap's length, so that the two ramps of a
pair of neighbours sum to 1 and the blend is smooth. The ramps sample the curve at pixel
centres, so no weight is zero and every pixel covered by a tile gets a value; image borders
get no ramp. The stitcher holds two float32 (H, W) buffers (weighted sum and weight sum).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np

from defectlens.errors import ConfigError

PadMode = Literal["reflect", "edge", "constant"]
Blend = Literal["cosine", "linear", "mean"]


class TileBox(NamedTuple):
    """Pixels ``image[y0:y1, x0:x1]`` that a tile covers (end-exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices to index an (H, W, ...) array with."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _resolve_overlap(tile: int, overlap: int | float) -> int:
    if tile < 1:
        raise ConfigError(f"tile size must be >= 1, got {tile}")
    if isinstance(overlap, float) and not overlap.is_integer():
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"a fractional overlap must be in [0, 1), got {overlap}")
        overlap = round(overlap * tile)
    overlap = int(overlap)
    if not 0 <= overlap < tile:
        raise ConfigError(f"overlap must be in [0, tile size {tile}), got {overlap}")
    return overlap


def tile_starts(length: int, tile: int = 256, overlap: int | float = 32) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    Tiles start every ``tile - overlap`` pixels; the last one starts at ``length - tile`` so it
    ends on the border. ``length <= tile`` gives ``[0]``.

    Args:
        length: axis length in pixels (>= 1).
        tile: tile length T in pixels.
        overlap: pixels shared by neighbouring tiles (int), or a fraction of T in [0, 1).
    """
    step = tile - _resolve_overlap(tile, overlap)
    if length < 1:
        raise ConfigError(f"image axis length must be >= 1, got {length}")
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / step) + 1
    return [min(k * step, length - tile) for k in range(count)]


def tile_boxes(height: int, width: int, tile: int = 256, overlap: int | float = 32) -> list[TileBox]:
    """The grid's boxes, row-major (top to bottom, then left to right)."""
    ys = tile_starts(height, tile, overlap)
    xs = tile_starts(width, tile, overlap)
    return [
        TileBox(y, x, min(y + tile, height), min(x + tile, width)) for y in ys for x in xs
    ]


def iter_tiles(
    image: np.ndarray,
    tile: int = 256,
    overlap: int | float = 32,
    pad_mode: PadMode | None = None,
) -> Iterator[tuple[np.ndarray, TileBox]]:
    """Yield ``(tile_image, box)`` over the grid, row-major, one tile at a time.

    Args:
        image: (H, W, C) or (H, W) array (float32 [0, 1] by convention; any dtype is passed on).
        tile: tile size T.
        overlap: overlap in pixels, or a fraction of T in [0, 1).
        pad_mode: ``None``: along an axis shorter than T the tile is shorter (the image's own
            length). Otherwise tiles are always (T, T, ...): the short axis is padded after
            the image with ``numpy.pad`` in this mode ("reflect", "edge", "constant" = 0).

    Yields:
        ``tile_image``: ``image[box.slices]`` (a view: copy before writing to it), or a padded
        copy (T, T, ...); ``box``: the image pixels the tile covers.
    """
    if image.ndim not in (2, 3):
        raise ConfigError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    if pad_mode not in (None, "reflect", "edge", "constant"):
        raise ConfigError(f"unknown pad_mode {pad_mode!r}")
    for box in tile_boxes(image.shape[0], image.shape[1], tile, overlap):
        view = image[box.slices]
        if pad_mode is not None and (box.height < tile or box.width < tile):
            widths = [(0, tile - box.height), (0, tile - box.width)] + [(0, 0)] * (image.ndim - 2)
            view = np.pad(view, widths, mode=pad_mode)
        yield view, box


def _ramps(starts: list[int], tile: int, length: int, blend: Blend) -> list[np.ndarray]:
    """Per tile along one axis: its weights (tile length,), float64."""
    size = min(tile, length)
    out = []
    for k, start in enumerate(starts):
        weight = np.ones(size)
        if blend != "mean":
            if k > 0:
                shared = starts[k - 1] + size - start
                weight[:shared] *= _ramp_up(shared, blend)
            if k + 1 < len(starts):
                shared = start + size - starts[k + 1]
                weight[size - shared :] *= 1.0 - _ramp_up(shared, blend)
        out.append(weight)
    return out


def _ramp_up(n: int, blend: Blend) -> np.ndarray:
    """n weights rising from ~0 to ~1, sampled at pixel centres (never 0 nor 1)."""
    t = (np.arange(n) + 0.5) / n
    return np.sin(0.5 * np.pi * t) ** 2 if blend == "cosine" else t


class MapStitcher:
    """Blend per-tile anomaly maps into one (H, W) map.

    Args:
        height, width: size of the full image.
        tile, overlap: the grid, as given to ``iter_tiles``.
        blend: "cosine" (raised-cosine ramps over each overlap, default), "linear" ramps, or
            "mean" (plain average of the overlapping tiles).

    Use: ``add(tile_map, box)`` for each tile (any order), then ``result()``.
    """

    def __init__(
        self,
        height: int,
        width: int,
        tile: int = 256,
        overlap: int | float = 32,
        blend: Blend = "cosine",
    ) -> None:
        if blend not in ("cosine", "linear", "mean"):
            raise ConfigError(f"unknown blend {blend!r}")
        self.height, self.width, self.tile = int(height), int(width), int(tile)
        self.overlap = _resolve_overlap(self.tile, overlap)
        self.blend = blend
        ys = tile_starts(self.height, self.tile, self.overlap)
        xs = tile_starts(self.width, self.tile, self.overlap)
        self._wy = dict(zip(ys, _ramps(ys, self.tile, self.height, blend)))
        self._wx = dict(zip(xs, _ramps(xs, self.tile, self.width, blend)))
        self._sum = np.zeros((self.height, self.width), np.float32)
        self._weight = np.zeros((self.height, self.width), np.float32)

    def window(self, box: TileBox) -> np.ndarray:
        """Blending weights (box.height, box.width) float32 of a grid tile."""
        wy, wx = self._wy.get(box.y0), self._wx.get(box.x0)
        expected = (
            min(box.y0 + self.tile, self.height) if wy is not None else None,
            min(box.x0 + self.tile, self.width) if wx is not None else None,
        )
        if expected != (box.y1, box.x1):
            raise ConfigError(
                f"{box} is not a tile of the {self.height}x{self.width} grid "
                f"(tile {self.tile}, overlap {self.overlap})"
            )
        return np.outer(wy, wx).astype(np.float32)

    def add(self, tile_map: np.ndarray, box: TileBox) -> None:
        """Accumulate one tile's map.

        Args:
            tile_map: (box.height, box.width) scores, or a padded (h, w) map with h >= height
                and w >= width, whose top-left part is used (as ``iter_tiles`` pads).
            box: the tile's box from ``iter_tiles`` / ``tile_boxes``.
        """
        tile_map = np.asarray(tile_map)
        if tile_map.ndim != 2 or tile_map.shape[0] < box.height or tile_map.shape[1] < box.width:
            raise ConfigError(f"tile map of shape {tile_map.shape} does not cover {box}")
        weight = self.window(box)
        values = tile_map[: box.height, : box.width].astype(np.float32, copy=False)
        self._sum[box.slices] += weight * values
        self._weight[box.slices] += weight

    @property
    def covered(self) -> np.ndarray:
        """Bool (H, W): pixels that received at least one tile."""
        return self._weight > 0

    def result(self) -> np.ndarray:
        """The stitched map (H, W) float32; pixels no tile reached are 0."""
        out = np.zeros_like(self._sum)
        np.divide(self._sum, self._weight, out=out, where=self._weight > 0)
        return out
