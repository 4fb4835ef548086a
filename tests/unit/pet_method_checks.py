"""Checks shared by the tests of the PET-study trained methods (fpn_autoencoder, ssim_autoencoder,
fcdd, fcdd_fpn, supervised_fpn): fit on small textured images, find a pasted defect, save and load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defectlens.detector import Detector
from tests.conftest import textured_images, with_square_defect


def pasted_defect(size: int, color: tuple[float, float, float] = (1.0, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray]:
    """A normal textured image (size x size) with a square of ``color`` (a fifth of the side) and its mask."""
    image = textured_images(1, size=(size, size), seed=9)[0]
    side = size // 5
    defective, mask = with_square_defect(image, int(0.3 * size), int(0.45 * size), side)
    defective[mask] = color
    return defective, mask


def check_fit_find_save_load(
    method: str, tmp_path: Path, size: int = 64, color: tuple[float, float, float] = (1.0, 0.1, 0.1),
    images: int = 8, loss_falls: bool = True, **options: Any,
) -> Detector:
    """Fit ``method`` on normal textured images; a pasted defect must score higher than a normal
    image, its map peak inside the defect; the saved and loaded detector gives identical results.
    ``loss_falls``: the running loss at the end is below the first step's (not for losses whose
    batches differ a lot, e.g. outlier exposure drawing a random share of outliers)."""
    detector = Detector(method=method, image_size=size, batch_size=4, blur_sigma=1.0, **options)
    detector.fit(textured_images(images, size=(size, size), seed=0))
    summary = detector.fit_info.method
    assert summary["steps"] == options.get("max_steps", summary["steps"]) and summary["stop_reason"] == "max_steps"
    losses = summary["loss_history"]["loss"]
    assert not loss_falls or losses[-1] < losses[0]  # it learned something
    assert detector.fit_info.calibration["num_scores"] >= 1  # the held-out split, never fitted on
    good = textured_images(1, size=(size, size), seed=5)[0]
    defective, mask = pasted_defect(size, color)
    normal, bad = detector.predict_batch([good, defective])
    assert bad.score > normal.score
    assert mask[np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)]
    assert bad.anomaly_map[mask].mean() > bad.anomaly_map[~mask].mean()

    loaded = Detector.load(detector.save(tmp_path / f"{method}.dlens"))
    assert loaded.method.config() == detector.method.config()
    again = loaded.predict_batch([good, defective])
    assert [p.score for p in again] == [normal.score, bad.score]
    np.testing.assert_array_equal(again[1].anomaly_map, bad.anomaly_map)
    return detector


def check_one_image(method: str, size: int = 64, **options: Any) -> None:
    """One training image: it trains on it, and the threshold comes from its own score (no held-out image)."""
    detector = Detector(method=method, image_size=size, batch_size=4, **options)
    detector.fit(textured_images(1, size=(size, size), seed=3))
    assert detector.fit_info.calibration["num_scores"] == 1
    prediction = detector.predict(textured_images(1, size=(size, size), seed=4)[0])
    assert np.isfinite(prediction.score) and np.isfinite(prediction.anomaly_map).all()
