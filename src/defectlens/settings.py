"""Checks of a Detector's settings, their JSON form, and what makes two detectors' features
comparable (melding, fine-tuning from another model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from defectlens.data.roi import Preprocess
from defectlens.errors import ConfigError
from defectlens.hashing import file_sha256
from defectlens.rules import InspectionRules


class HasFeatures(Protocol):
    backbone: str
    layers: list[str]
    image_size: tuple[int, int]
    weights: str | None
    feature_aggregation: int


def check_settings(
    device: str, batch_size: int, pool_size: int, tile_size: int | None, tile_overlap: int, circular_padding: bool,
    calibration_split: float, target_fpr: float, review_fpr: float | None,
) -> None:
    """ConfigError naming the first setting that cannot work."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA device is available")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(pool_size) < 1:
        raise ConfigError(f"pool_size must be >= 1, got {pool_size}")
    if not 0.0 < float(calibration_split) < 1.0:
        raise ConfigError(f"calibration_split must be in (0, 1), got {calibration_split}")
    if not 0.0 <= float(target_fpr) < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if review_fpr is not None and not float(target_fpr) < float(review_fpr) < 1.0:
        raise ConfigError(f"review_fpr must be in (target_fpr {target_fpr}, 1), got {review_fpr}")
    if tile_size is not None:
        if int(tile_size) < 16:
            raise ConfigError(f"tile_size must be at least 16 px, got {tile_size}")
        if not 0 <= int(tile_overlap) < int(tile_size):
            raise ConfigError(f"tile_overlap must be in [0, tile_size {tile_size}), got {tile_overlap}")
        if circular_padding:
            raise ConfigError("tiling and circular_padding cannot be combined (tiles break the x period)")


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (height, width) of at least 16 px -> (height, width)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) < 16:
        raise ConfigError(f"image_size must be an int or (height, width) of at least 16 px, got {image_size!r}")
    return size  # type: ignore[return-value]


def as_aggregation(cells: int) -> int:
    """A feature-aggregation neighbourhood: an odd number of cells >= 1."""
    if int(cells) != cells or int(cells) < 1 or int(cells) % 2 == 0:
        raise ConfigError(f"feature_aggregation must be an odd number of cells >= 1 (3, or 1 for none), got {cells!r}")
    return int(cells)


def json_safe(value: Any) -> Any:
    """A setting as JSON: ROI steps and rules as their dicts, tuples as lists."""
    if isinstance(value, (Preprocess, InspectionRules)):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return value


def feature_signature(detector: HasFeatures) -> dict[str, Any]:
    """What makes two detectors' patch features comparable."""
    weights = detector.weights
    if weights and Path(weights).is_file():
        weights = file_sha256(weights)
    return {
        "backbone": detector.backbone, "layers": detector.layers, "image_size": list(detector.image_size), "weights": weights,
        "feature_aggregation": detector.feature_aggregation,
    }


def check_same_features(detector: HasFeatures, other: HasFeatures, what: str) -> None:
    """ConfigError naming what differs when ``other``'s features are not ``detector``'s."""
    mine, theirs = feature_signature(detector), feature_signature(other)
    different = [f"{key} {theirs[key]!r} (not {mine[key]!r})" for key in mine if mine[key] != theirs[key]]
    if different:
        raise ConfigError(f"{what} has other features: {', '.join(different)}")
