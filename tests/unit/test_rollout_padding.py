"""Roll-out bands are periodic in x: with circular padding the score map wraps continuously."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectlens.data.roi import Preprocess, RollOut, polar_unwrap
from defectlens.detector import Detector


def ring_image(seed: int, size: int = 160) -> np.ndarray:
    """A textured ring (a bottle neck seen from above) with small random texture."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 0.2, np.float32)
    angles = np.arange(0, 360, 15) + rng.uniform(-1, 1)
    cv2.circle(image, (size // 2, size // 2), 60, (0.8, 0.8, 0.8), thickness=30)
    for angle in angles:  # thread lugs
        x = size // 2 + int(60 * np.cos(np.deg2rad(angle)))
        y = size // 2 + int(60 * np.sin(np.deg2rad(angle)))
        cv2.circle(image, (x, y), 4, (0.5, 0.5, 0.5), -1)
    return np.clip(image + rng.normal(0, 0.01, image.shape).astype(np.float32), 0, 1)


def band(seed: int) -> np.ndarray:
    return polar_unwrap(ring_image(seed), (80.0, 80.0), 40, 80, out_height=32, out_width=256)


def wrap_jump(anomaly_map: np.ndarray) -> float:
    """Jump across the x border relative to the typical jump between neighbouring columns."""
    border = np.abs(anomaly_map[:, 0] - anomaly_map[:, -1]).mean()
    inner = np.abs(np.diff(anomaly_map, axis=1)).mean()
    return float(border / inner)


@pytest.mark.parametrize("circular", [True, False])
def test_score_map_of_a_roll_out_is_continuous_across_the_border(circular):
    bands = [band(seed) for seed in range(8)]
    detector = Detector(image_size=(32, 256), circular_padding=circular, coreset_ratio=0.5).fit(bands)
    test_band = band(100)
    shifted = np.roll(test_band, 96, axis=1)
    anomaly_map = detector.predict(test_band).anomaly_map
    shifted_map = detector.predict(shifted).anomaly_map
    rolled_back = np.roll(shifted_map, -96, axis=1)
    if circular:
        assert wrap_jump(anomaly_map) < 3.0
        # rolling the band by a multiple of the stride rolls the map: no seam anywhere
        np.testing.assert_allclose(rolled_back, anomaly_map, rtol=1e-3, atol=1e-3 * anomaly_map.max())
    else:
        assert np.abs(rolled_back - anomaly_map).max() > 1e-2 * anomaly_map.max()


def test_roll_out_preprocess_is_stored_in_the_model(tmp_path):
    preprocess = Preprocess((RollOut(r_inner=40, r_outer=80, out_height=32, out_width=256),))
    rings = [ring_image(seed) for seed in range(6)]
    detector = Detector(image_size=(32, 256), circular_padding=True, coreset_ratio=0.5, preprocess=preprocess).fit(rings)
    loaded = Detector.load(detector.save(tmp_path / "ring.dlens"))
    assert loaded.preprocess == preprocess and loaded.circular_padding
    prediction = loaded.predict(ring_image(50))
    assert prediction.anomaly_map.shape == (32, 256)
    assert prediction.score == detector.predict(ring_image(50)).score
