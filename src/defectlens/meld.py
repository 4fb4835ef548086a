"""Melding: merge fitted PatchCore-family detectors into one Sequential PatchCore, no images.

Their memory banks are streamed through a fresh coreset by the streaming rule
(`methods.sequential_patchcore.meld_banks`). All models must share backbone, layers, weights,
image size and preprocessing (ROI, tiling); post-processing and scoring options are the
first model's.

Threshold: melding sees no image, so it cannot calibrate; the melded detector takes the
largest of the models' thresholds (each was set on its own held-out normal images; the
largest is the conservative choice, fewer false alarms). Call ``calibrate(normal_images)``
with held-out normal images to set it from data instead. ``fit_info.calibration`` says which.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from defectlens.detector import Detector, check_same_features
from defectlens.errors import ConfigError
from defectlens.methods.sequential_patchcore import meld_banks
from defectlens.results import FitInfo

_PREPARATION = ("preprocess", "image_size", "circular_padding", "tile_size", "tile_overlap")


def meld_detectors(models: Sequence[Detector | str | Path], size: int, seed: int = 0, max_epochs: int = 10) -> Detector:
    """Merge fitted PatchCore-family detectors (or model files) into one Sequential PatchCore
    of ``size`` bank vectors."""
    detectors = [model if isinstance(model, Detector) else Detector.load(model) for model in models]
    if not detectors:
        raise ConfigError("meld needs at least one model")
    first = detectors[0]
    names = [str(model) if not isinstance(model, Detector) else f"model {k}" for k, model in enumerate(models)]
    first_params = first.get_params()
    for detector, name in zip(detectors, names):
        detector._require_fitted()
        check_same_features(first, detector, name)
        params = detector.get_params()
        if any(params[key] != first_params[key] for key in _PREPARATION):
            raise ConfigError(f"{name} has other preprocessing (ROI, tiling or image size) than {names[0]}")
    started = time.perf_counter()
    method = meld_banks([detector.method for detector in detectors], size, seed, max_epochs)
    melded = Detector(**{**first_params, "method": method.name, "seed": seed}, **method.config())
    melded.method = method
    melded._extractor = first._extractor  # same backbone, layers, weights and padding: share it
    thresholds = [float(detector._require_fitted()) for detector in detectors]
    melded.threshold = max(thresholds)
    melded.fit_info = FitInfo(
        num_images=sum(detector.fit_info.num_images for detector in detectors),
        method_seconds=time.perf_counter() - started,
        calibration={"source": "meld: the largest of the melded models' thresholds (no images)", "thresholds": thresholds},
        method={**method.fit_summary(), "melded_from": names},
    )
    return melded
