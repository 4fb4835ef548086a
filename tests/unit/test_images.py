"""Image decoding: every format converted explicitly; bad files name themselves."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from defectlens.data.images import decode_image_bytes, read_image, read_mask
from defectlens.errors import ImageReadError


def test_rgb_png_scaled_to_unit_range(tmp_path):
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    pixels[0, 0] = [255, 128, 0]
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (5, 7, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 0], [1.0, 128 / 255, 0.0])


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((4, 6), 51, dtype=np.uint8)).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (4, 6, 3)
    np.testing.assert_allclose(image, 0.2)


def test_rgba_is_composited_over_black(tmp_path):
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = [[255, 0], [51, 255]]
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(image[0, 0, 0], 200 / 255, atol=1e-6)
    assert image[0, 1, 0] == 0.0
    np.testing.assert_allclose(image[1, 0, 0], 200 / 255 * 0.2, atol=1e-6)


def test_sixteen_bit_grayscale_png_uses_full_range(tmp_path):
    pixels = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(image[:, :, 0], pixels / 65535.0, atol=1e-6)


def test_sixteen_bit_rgb_tiff(tmp_path):
    pixels = np.zeros((3, 4, 3), dtype=np.uint16)
    pixels[1, 2] = [65535, 0, 13107]
    tifffile.imwrite(tmp_path / "rgb16.tiff", pixels)
    image = read_image(tmp_path / "rgb16.tiff")
    assert image.shape == (3, 4, 3)
    np.testing.assert_allclose(image[1, 2], [1.0, 0.0, 0.2], atol=1e-6)


def test_palette_and_non_square(tmp_path):
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6)).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (5, 6, 3)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is not an image", "not a readable image"), (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "not a readable image")],
)
def test_bad_files_raise_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert str(path) in str(error.value) and reason in str(error.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_truncated_png_is_an_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    with pytest.raises(ImageReadError):
        decode_image_bytes(data[: len(data) // 2], "half.png")


def test_mask_reading(tmp_path):
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[False, True], [True, False]])
