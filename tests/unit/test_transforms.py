"""Augmentation: seeded, shape/dtype/range preserving, JSON-serializable configs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens.data.transforms import (
    PRESETS,
    STEP_TYPES,
    AugmentationPipeline,
    BrightnessContrast,
    Compose,
    GaussianNoise,
    HorizontalFlip,
    RandomErasing,
    Rotate,
    VerticalFlip,
    as_generator,
)
from defectlens.errors import ConfigError


def sample_image(height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows / height, cols / width, 0.5 + 0 * rows], axis=-1)
    return np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", sorted(STEP_TYPES))
def test_each_step_is_seeded_and_keeps_shape_dtype_range(name: str) -> None:
    image = sample_image()
    step = STEP_TYPES[name](p=1.0)
    first = step(image, 11)
    assert first.shape == image.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert np.array_equal(first, step(image, np.random.default_rng(11)))
    assert not np.array_equal(first, image)
    if name not in ("hflip", "vflip"):  # flips have no random parameter once applied
        assert not np.array_equal(first, step(image, 12))


def test_probability_zero_is_identity_and_flips_are_exact() -> None:
    image = sample_image()
    assert np.array_equal(Rotate(p=0.0)(image, 1), image)
    assert np.array_equal(HorizontalFlip(p=1.0)(image, 0), image[:, ::-1])
    assert np.array_equal(VerticalFlip(p=1.0)(image, 0), image[::-1])


def test_gaussian_noise_variance_is_on_the_255_scale() -> None:
    image = np.full((200, 200, 3), 0.5, np.float32)
    noisy = GaussianNoise(p=1.0, variance_range=(100.0, 100.0))(image, 0)
    assert abs(np.std((noisy - image) * 255.0) - 10.0) < 0.3


def test_rotation_stays_within_the_configured_angle() -> None:
    image = np.zeros((65, 65, 3), np.float32)
    image[32, 32:] = 1.0  # a horizontal ray from the centre
    for seed in range(5):
        rotated = Rotate(p=1.0, max_degrees=15.0, border="constant")(image, seed)
        rows, cols = np.nonzero(rotated[..., 0] > 0.3)
        far = cols > 50
        angle = np.degrees(np.arctan2(rows[far] - 32, cols[far] - 32))
        assert np.all(np.abs(angle) <= 16.5)


def test_brightness_contrast_and_erasing() -> None:
    image = sample_image()
    brighter = BrightnessContrast(p=1.0, brightness=0.0, contrast_range=(1.0, 1.0))(image, 0)
    assert np.allclose(brighter, image, atol=1e-6)
    erased = RandomErasing(p=1.0, fill="zero", area_range=(0.1, 0.1))(image, 3)
    changed = (erased != image).any(-1)
    rows, cols = np.nonzero(changed)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert abs(box - 0.1 * image.shape[0] * image.shape[1]) < 0.05 * image.size / 3
    assert np.all(erased[changed] == 0.0)


def test_pipeline_from_config_round_trips_through_json() -> None:
    config = [
        {"name": "rotate", "max_degrees": 10, "p": 0.7},
        {"name": "brightness_contrast", "brightness": 0.1, "contrast_range": [0.8, 1.2], "p": 0.5},
        {"name": "hflip", "p": 0.5},
        {"name": "vflip", "p": 0.5},
        {"name": "gaussian_blur", "sigma_range": [0.2, 1.0], "p": 0.5},
        {"name": "gaussian_noise", "variance_range": [10, 120], "p": 0.5},
        {"name": "random_erasing", "area_range": [0.02, 0.1], "fill": "mean", "p": 0.5},
    ]
    pipeline = AugmentationPipeline.from_config(config)
    restored = Compose.from_config(json.loads(json.dumps(pipeline.to_config())))
    assert restored == pipeline and len(restored) == 7
    image = sample_image()
    outputs = [pipeline(image, seed) for seed in range(4)]
    assert all(out.shape == image.shape and out.dtype == np.float32 for out in outputs)
    assert all(0.0 <= out.min() and out.max() <= 1.0 for out in outputs)
    assert np.array_equal(outputs[0], restored(image, 0))
    assert not np.array_equal(outputs[0], outputs[1])
    # epochs of a streaming coreset: one generator drawn from repeatedly gives a new augmentation each call
    epoch_rng = as_generator(5)
    assert not np.array_equal(pipeline(image, epoch_rng), pipeline(image, epoch_rng))


def test_presets_and_identity() -> None:
    for name in PRESETS:
        assert len(AugmentationPipeline.from_config(name)) > 0
    image = sample_image()
    assert np.array_equal(AugmentationPipeline.from_config(None)(image, 0), image)


@pytest.mark.parametrize(
    "config",
    [
        [{"name": "shear"}],
        [{"name": "rotate", "degrees": 5}],
        [{"name": "rotate", "p": 2.0}],
        [{"name": "gaussian_noise", "variance_range": [50, 10]}],
        [{"max_degrees": 5}],
        "unknown_preset",
    ],
)
def test_bad_configs_raise_config_error(config) -> None:
    with pytest.raises(ConfigError):
        AugmentationPipeline.from_config(config)


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        Rotate()(np.zeros((8, 8), np.float32), 0)
    with pytest.raises(ConfigError):
        Rotate()(sample_image(), None)  # type: ignore[arg-type]
