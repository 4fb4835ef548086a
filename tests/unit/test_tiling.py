"""Tiling of large images and blending of per-tile anomaly maps."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.errors import ConfigError
from defectlens.tiling import MapStitcher, TileBox, iter_tiles, tile_boxes, tile_starts


def test_tile_starts():
    assert tile_starts(1000, 256, 32) == [0, 224, 448, 672, 744]
    assert tile_starts(256, 256, 32) == [0]
    assert tile_starts(100, 256, 32) == [0]
    assert tile_starts(480, 256, 32) == [0, 224]  # exact fit: no extra tile
    assert tile_starts(1000, 256, 0.125) == tile_starts(1000, 256, 32)
    assert tile_starts(600, 256, 0) == [0, 256, 344]
    for bad in (256, -1, 1.5):
        with pytest.raises(ConfigError):
            tile_starts(1000, 256, bad)


@pytest.mark.parametrize("shape", [(1000, 700), (256, 256), (300, 257), (100, 900), (57, 80)])
def test_tiles_cover_the_image_exactly(shape):
    h, w = shape
    image = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    hits = np.zeros((h, w), np.int32)
    boxes = []
    for tile, box in iter_tiles(image, tile=256, overlap=32):
        assert tile.shape == (box.height, box.width, 3)
        assert box.height == min(256, h) and box.width == min(256, w)  # full size when possible
        assert 0 <= box.y0 < box.y1 <= h and 0 <= box.x0 < box.x1 <= w
        np.testing.assert_array_equal(tile, image[box.slices])
        hits[box.slices] += 1
        boxes.append(box)
    assert hits.min() >= 1
    assert boxes == tile_boxes(h, w, 256, 32)
    assert len(set(boxes)) == len(boxes)


def test_tiles_are_views_and_a_generator():
    image = np.zeros((2048, 2048, 3), np.float32)
    tiles = iter_tiles(image, 256, 32)
    first, box = next(tiles)
    assert np.shares_memory(first, image) and box == TileBox(0, 0, 256, 256)
    assert sum(1 for _ in tiles) == 9 * 9 - 1  # starts 0, 224, ..., 1568, 1792


def test_padding_of_small_images():
    image = np.random.default_rng(1).random((100, 300, 3), dtype=np.float32)
    tiles = list(iter_tiles(image, tile=256, overlap=32, pad_mode="reflect"))
    assert [b for _, b in tiles] == [TileBox(0, 0, 100, 256), TileBox(0, 44, 100, 300)]
    for tile, box in tiles:
        assert tile.shape == (256, 256, 3)
        np.testing.assert_array_equal(tile[:100], image[box.slices])
    edge, _ = next(iter_tiles(image[:, :, 0], 256, 32, pad_mode="edge"))
    assert edge.shape == (256, 256)
    np.testing.assert_array_equal(edge[150], image[99, :256, 0])


@pytest.mark.parametrize("blend", ["cosine", "linear", "mean"])
@pytest.mark.parametrize("shape", [(1000, 700), (300, 257), (100, 900), (57, 80)])
def test_stitching_gives_back_the_map(shape, blend):
    h, w = shape
    truth = np.random.default_rng(2).random((h, w), dtype=np.float32)
    stitcher = MapStitcher(h, w, tile=256, overlap=48, blend=blend)
    constant = MapStitcher(h, w, tile=256, overlap=48, blend=blend)
    for _, box in iter_tiles(np.empty((h, w, 3), np.float32), 256, 48):
        stitcher.add(truth[box.slices], box)
        constant.add(np.full((box.height, box.width), 0.7, np.float32), box)
    assert stitcher.covered.all()
    out = stitcher.result()
    assert out.dtype == np.float32 and out.shape == (h, w)
    np.testing.assert_allclose(out, truth, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(constant.result(), 0.7, rtol=1e-6)


def test_padded_tile_maps_are_cropped():
    image = np.zeros((100, 300, 3), np.float32)
    stitcher = MapStitcher(100, 300, 256, 32)
    for tile, box in iter_tiles(image, 256, 32, pad_mode="constant"):
        tile_map = np.full(tile.shape[:2], 2.0, np.float32)
        tile_map[box.height :] = 1e6  # padding rows must be ignored
        stitcher.add(tile_map, box)
    np.testing.assert_allclose(stitcher.result(), 2.0, rtol=1e-6)


def test_defect_lands_in_the_right_place():
    h, w = 700, 900
    stitcher = MapStitcher(h, w, tile=256, overlap=32)
    boxes = tile_boxes(h, w, 256, 32)
    target = boxes[5]
    for box in boxes:
        tile_map = np.full((box.height, box.width), 0.1, np.float32)
        if box == target:
            tile_map[100:110, 120:125] = 5.0  # inside the tile, away from its overlaps
        stitcher.add(tile_map, box)
    out = stitcher.result()
    ys, xs = np.nonzero(out > 1.0)
    assert (ys.min(), ys.max()) == (target.y0 + 100, target.y0 + 109)
    assert (xs.min(), xs.max()) == (target.x0 + 120, target.x0 + 124)
    np.testing.assert_allclose(out[target.y0 + 105, target.x0 + 122], 5.0, rtol=1e-6)
    # a defect in an overlap is attenuated but kept, and stays where it was
    stitcher = MapStitcher(h, w, tile=256, overlap=32)
    for box in boxes:
        tile_map = np.zeros((box.height, box.width), np.float32)
        if box == boxes[0]:
            tile_map[50, 240] = 1.0  # column 240 is shared with the next tile (starts at 224)
        stitcher.add(tile_map, box)
    out = stitcher.result()
    assert np.unravel_index(out.argmax(), out.shape) == (50, 240)
    assert 0.0 < out[50, 240] < 1.0


def test_blend_is_smooth_across_tiles():
    """Two tiles with different constant maps: the seam becomes a monotone ramp."""
    stitcher = MapStitcher(64, 480, tile=256, overlap=32)
    for i, box in enumerate(tile_boxes(64, 480, 256, 32)):
        stitcher.add(np.full((box.height, box.width), float(i), np.float32), box)
    row = stitcher.result()[0]
    np.testing.assert_allclose(row[:224], 0.0)
    np.testing.assert_allclose(row[256:], 1.0)
    seam = row[224:256]
    assert np.all(np.diff(seam) > 0) and 0 < seam[0] < 0.05 and 0.95 < seam[-1] < 1


def test_window_and_errors():
    stitcher = MapStitcher(600, 600, 256, 32)
    window = stitcher.window(TileBox(0, 0, 256, 256))
    assert window.min() > 0 and window.max() == 1.0 and window[0, 0] == 1.0  # no ramp at borders
    with pytest.raises(ConfigError):
        stitcher.window(TileBox(10, 0, 266, 256))
    with pytest.raises(ConfigError):
        stitcher.add(np.zeros((10, 10), np.float32), TileBox(0, 0, 256, 256))
    with pytest.raises(ConfigError):
        next(iter_tiles(np.zeros((4, 4, 3, 1)), 256, 32))
    with pytest.raises(ConfigError):
        MapStitcher(10, 10, blend="gauss")
