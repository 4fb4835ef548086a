"""Synthetic anomalies: exact masks, seeding, instance limits, and the MVTec-layout test-set writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectlens.data.images import read_image, read_mask, save_png
from defectlens.data.synthetic import (
    CHANGE_TOLERANCE,
    SYNTHETIC_KINDS,
    blackened_confetti_noise,
    confetti_noise,
    finalize_anomaly,
    generate_anomaly,
    make_synthetic_testset,
    perlin_anomaly,
    perlin_noise,
    stain_noise,
    water_stain,
)
from defectlens.errors import ConfigError, DatasetError


def textured_image(seed: int = 0, size: int = 96) -> np.ndarray:
    """A smooth gradient with a little noise, values well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.3 + 0.4 * rows, 0.3 + 0.4 * cols, 0.5 - 0.2 * rows * cols], axis=-1)
    return np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32)


def assert_exact_mask(original: np.ndarray, anomalous: np.ndarray, mask: np.ndarray) -> None:
    assert anomalous.dtype == np.float32 and anomalous.shape == original.shape
    assert mask.dtype == bool and mask.shape == original.shape[:2]
    assert anomalous.min() >= 0.0 and anomalous.max() <= 1.0
    change = np.abs(anomalous - original).max(axis=2)
    # every pixel that changed by more than the tolerance is in the mask, and outside it nothing changed
    assert not (change[~mask] > 0).any()
    # every masked pixel really changed
    assert (change[mask] > CHANGE_TOLERANCE).all()
    assert mask.any()


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_every_generator_masks_exactly_the_changed_pixels(kind: str) -> None:
    image = textured_image()
    for seed in range(3):
        anomalous, mask = SYNTHETIC_KINDS[kind](image, seed)
        assert_exact_mask(image, anomalous, mask)
    assert np.array_equal(image, textured_image()), "the input must not be modified"


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_same_seed_same_output_different_seed_different(kind: str) -> None:
    image = textured_image()
    first, first_mask = SYNTHETIC_KINDS[kind](image, 7)
    again, again_mask = SYNTHETIC_KINDS[kind](image, np.random.default_rng(7))
    other, other_mask = SYNTHETIC_KINDS[kind](image, 8)
    assert np.array_equal(first, again) and np.array_equal(first_mask, again_mask)
    assert not np.array_equal(first_mask, other_mask)


@pytest.mark.parametrize("generator", [confetti_noise, stain_noise])
def test_instance_limit(generator) -> None:
    image = textured_image(size=128)
    for seed in range(12):
        # small shapes rarely touch; count connected components of the mask
        _, mask = generator(image, seed, max_instances=2, size_range=(0.05, 0.08))
        _, components = ndimage.label(mask)
        assert 1 <= components <= 2
    counts = set()
    for seed in range(12):
        _, mask = generator(image, seed, min_instances=3, max_instances=3, size_range=(0.03, 0.04))
        counts.add(ndimage.label(mask)[1])
    assert max(counts) <= 3 and 3 in counts


def test_confetti_colour_and_blackened_variant() -> None:
    image = textured_image()
    anomalous, mask = confetti_noise(image, 1, color=(1.0, 0.0, 0.0))
    assert np.allclose(anomalous[mask], [1.0, 0.0, 0.0])
    black, black_mask = blackened_confetti_noise(image, 1)
    assert np.all(black[black_mask] == 0.0)
    # on a black image nothing changes, so the mask is empty
    dark = np.zeros((64, 64, 3), np.float32)
    unchanged, empty = blackened_confetti_noise(dark, 1)
    assert not empty.any() and np.array_equal(unchanged, dark)


def test_perlin_noise_is_seeded_vectorised_and_bounded() -> None:
    noise = perlin_noise((64, 80), (4, 5), 3, octaves=3)
    assert noise.shape == (64, 80) and noise.dtype == np.float32
    assert -1.0 <= noise.min() < 0 < noise.max() <= 1.0
    assert np.array_equal(noise, perlin_noise((64, 80), (4, 5), 3, octaves=3))
    assert not np.array_equal(noise, perlin_noise((64, 80), (4, 5), 4, octaves=3))
    # smooth: neighbouring pixels differ far less than the value range
    assert np.abs(np.diff(perlin_noise((64, 64), 2, 0), axis=1)).max() < 0.2


def test_perlin_anomaly_blends_the_source_with_beta() -> None:
    image = textured_image()
    source = np.zeros_like(image)
    anomalous, mask = perlin_anomaly(image, 5, source=source, beta_range=(0.25, 0.25))
    assert_exact_mask(image, anomalous, mask)
    assert np.allclose(anomalous[mask], 0.25 * image[mask], atol=1e-6)
    # a tiny opacity change is below the tolerance everywhere: the mask is what actually changed
    faint, faint_mask = perlin_anomaly(image, 5, source=image + 0.002, beta_range=(0.0, 0.0))
    assert not faint_mask.any() and np.array_equal(faint, image)


def test_water_stain_follows_the_reflectance_law() -> None:
    flat = np.full((128, 128, 3), 0.5, np.float32)
    anomalous, mask = water_stain(flat, 2, polarity="dark", gamma_range=(2.0, 2.0), alpha_range=(0.2, 0.2))
    assert_exact_mask(flat, anomalous, mask)
    change = 0.5 - anomalous[..., 0]
    assert np.all(change[mask] > 0) and change.max() <= 0.2 + 1e-6
    # one stain (one cell): the change grows with the distance to the stain centre, strongest at the rim
    single, single_mask = water_stain(flat, 4, cell_size=128, stain_probability=1.0, polarity="dark",
                                      gamma_range=(2.0, 2.0), alpha_range=(0.2, 0.2))
    rows, cols = np.nonzero(single_mask)
    filled = ndimage.binary_fill_holes(single_mask)
    center_row, center_col = ndimage.center_of_mass(filled)
    distance = np.hypot(rows - center_row, cols - center_col)
    single_change = 0.5 - single[rows, cols, 0]
    assert np.corrcoef(distance, single_change)[0, 1] > 0.7
    assert filled.sum() > single_mask.sum()  # the faint centre (change below one grey level) is not masked
    # cell-size grid and caps
    _, capped = water_stain(flat, 2, cell_size=32, stain_probability=1.0, max_stains=2)
    assert 1 <= ndimage.label(capped)[1] <= 2
    with pytest.raises(ConfigError):
        water_stain(flat, 0, radius_range=(0.5, 0.9), perlin_amplitude=0.2)


def test_finalize_restores_unchanged_pixels() -> None:
    original = np.full((4, 4, 3), 0.5, np.float32)
    altered = original.copy()
    altered[0, 0] += 0.5 / 255  # below tolerance: restored
    altered[1, 1] += 3 / 255
    region = np.ones((4, 4), bool)
    image, mask = finalize_anomaly(original, altered, region)
    assert mask.sum() == 1 and mask[1, 1]
    assert image[0, 0, 0] == np.float32(0.5)


def test_bad_arguments_raise_config_error() -> None:
    image = textured_image(size=32)
    with pytest.raises(ConfigError, match="confetti"):
        generate_anomaly(image, "scratch", 0)
    with pytest.raises(ConfigError):
        confetti_noise(image, 0, max_instances=0)
    with pytest.raises(ConfigError):
        confetti_noise(image, None)  # type: ignore[arg-type]


@pytest.fixture()
def good_folder(tmp_path: Path) -> list[Path]:
    paths = []
    for index in range(4):
        path = tmp_path / "good" / f"{index:03d}.png"
        save_png(path, np.round(textured_image(seed=index, size=64 + 8 * index) * 255).astype(np.uint8))
        paths.append(path)
    return paths


def test_make_synthetic_testset_writes_the_mvtec_layout(good_folder: list[Path], tmp_path: Path) -> None:
    out = make_synthetic_testset(good_folder, "stain", 5, tmp_path / "synth", seed=3, good_count=2)
    anomalous = sorted((out / "test" / "stain").glob("*.png"))
    masks = sorted((out / "ground_truth" / "stain").glob("*_mask.png"))
    good = sorted((out / "test" / "good").glob("*.png"))
    assert len(anomalous) == len(masks) == 5 and len(good) == 2
    assert not (out / "train").exists() or not any((out / "train").rglob("*.png"))
    manifest = json.loads((out / "synthetic_stain.json").read_text())
    sources = {Path(item["source"]) for item in manifest["good"]}
    for image_path in anomalous:
        mask_path = out / "ground_truth" / "stain" / f"{image_path.stem}_mask.png"
        image, mask = read_image(image_path), read_mask(mask_path)
        raw = np.asarray(Image.open(mask_path))
        assert raw.dtype == np.uint8 and set(np.unique(raw)) <= {0, 255}
        assert image.shape[:2] == mask.shape and mask.any()
        entry = next(item for item in manifest["anomalous"] if item["image"].endswith(image_path.name))
        source = read_image(entry["source"])
        assert np.array_equal((np.abs(image - source).max(axis=2) > 0), mask)
        assert Path(entry["source"]) not in sources  # good test images are not reused while others remain
    # same seed, same set
    again = make_synthetic_testset(good_folder, "stain", 5, tmp_path / "synth2", seed=3, good_count=2)
    for name in ("000.png", "004.png"):
        assert np.array_equal(read_image(out / "test/stain" / name), read_image(again / "test/stain" / name))
    # a second kind may share the folder, the same kind may not be written twice
    make_synthetic_testset(good_folder, "confetti", 2, out, seed=3)
    assert len(list((out / "test" / "confetti").glob("*.png"))) == 2
    with pytest.raises(ConfigError, match="already"):
        make_synthetic_testset(good_folder, "stain", 1, out)


def test_make_synthetic_testset_errors(good_folder: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        make_synthetic_testset(good_folder, "scratch", 2, tmp_path / "x")
    for kind in ("confetti", "stain", "perlin", "water_stain"):
        assert kind in str(error.value)
    with pytest.raises(DatasetError):
        make_synthetic_testset([], "confetti", 2, tmp_path / "x")
    with pytest.raises(ConfigError):
        make_synthetic_testset(good_folder, "confetti", 0, tmp_path / "x")
    with pytest.raises(ConfigError):
        make_synthetic_testset(good_folder, "confetti", 1, tmp_path / "x", good_count=10)


def test_make_synthetic_testset_skips_unreadable_images(good_folder: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "good" / "broken.png"
    broken.write_bytes(b"not a png")
    out = make_synthetic_testset([broken, *good_folder], "perlin", 3, tmp_path / "s", seed=0, good_count=1)
    assert len(list((out / "test" / "perlin").glob("*.png"))) == 3
    assert str(broken) in json.loads((out / "synthetic_perlin.json").read_text())["unreadable"]
