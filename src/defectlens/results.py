"""What fit and predict return: `FitInfo` and `Prediction` (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """The verdict for one image.

    Attributes:
        score: image anomaly score (higher = more anomalous; with inspection rules: the max of
            the inspected part of the map).
        anomaly_map: float32 (H, W) at the resolution of the prepared image (after ROI steps).
        mask: bool (H, W), the defect pixels at the NOT OK threshold (after the rules).
        is_anomalous: the verdict is NOT OK.
        threshold: the NOT OK threshold used.
        source: the file path, or None for an array input.
        image: the prepared image (H, W, 3) float32 that was scored (maps and masks refer to it).
        verdict: "OK", "REVIEW" (between the review and the NOT OK threshold) or "NOT OK".
        review_threshold: the review threshold, or None (one threshold, no REVIEW).
        p_value: how often a good part scores at least this (calibrated on held-out normal
            images); None for models without calibration scores.
        z_score: the same in normal-quantile units, Phi^-1(1 - p_value): 3 is a 3-sigma event.
        reasons: why the verdict is what it is (which threshold or rule decided).
        defects: per defect region: area_px, bbox [x0, y0, x1, y1], peak, zone.
    """

    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray
    is_anomalous: bool
    threshold: float
    source: str | None = None
    image: np.ndarray | None = None
    verdict: str = "OK"
    review_threshold: float | None = None
    p_value: float | None = None
    z_score: float | None = None
    reasons: list[str] = field(default_factory=list)
    defects: list[dict[str, Any]] = field(default_factory=list)


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
    auto: dict[str, Any] = field(default_factory=dict)
    """``fit --auto``: the selection rule, the chosen candidate and every candidate's scores."""
