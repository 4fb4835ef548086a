"""What fit and predict return: `FitInfo` and `Prediction` (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """The verdict for one image.

    Attributes:
        score: image anomaly score (higher = more anomalous).
        anomaly_map: float32 (H, W) at the resolution of the prepared image (after ROI steps).
        mask: bool (H, W), anomaly_map > threshold.
        is_anomalous: score > threshold.
        threshold: the decision threshold used.
        source: the file path, or None for an array input.
        image: the prepared image (H, W, 3) float32 that was scored (maps and masks refer to it).
    """

    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    is_anomalous: bool
    threshold: float
    source: str | None = None
    image: np.ndarray | None = None


@dataclass
class FitInfo:
    """What fitting did: image count, timings (seconds: decoding + features / method /
    calibration), the calibration scores' summary and the method's own summary."""

    num_images: int = 0
    feature_seconds: float = 0.0
    method_seconds: float = 0.0
    calibration_seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
