"""Defect-wise (instance) recall of binary predictions, per defect class.

As in the Sequential-PatchCore study: a ground-truth *instance* is an 8-connected region of
an image's defect mask. It counts as detected at coverage criterion ``c`` when the predicted
binary mask covers at least ``c`` of its pixels; ``c = 0`` means "any pixel" (at least one).
Recall at ``c`` = detected instances / instances, per defect class; the headline number is
the mean over defect classes (each class weighs the same), the pooled recall over all
instances is given too. Pixel coverage of a class = covered defect pixels / defect pixels.

Optionally, predicted connected regions (8-connected) smaller than ``min_region_size``
pixels are removed before counting, and the counts of what was removed are returned so the
effect can be reported. Hand-written on ``scipy.ndimage.label``; one pass over the data,
so any iterable of masks (or zero-argument loaders) works.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from scipy import ndimage

from defectlens.errors import ConfigError
from defectlens.metrics.pixel import EIGHT_CONNECTIVITY, iter_pairs, load_binary_mask

__all__ = [
    "DEFAULT_COVERAGES",
    "DefectClassRecall",
    "DefectWiseRecall",
    "coverage_label",
    "defect_wise_recall",
]

#: Coverage criteria: 0.0 = any pixel, then 1 %, 5 %, 10 %, 25 %, 50 % of the instance.
DEFAULT_COVERAGES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50)


def coverage_label(coverage: float) -> str:
    """Key of a criterion in the result dicts: ``"any"``, ``"1%"``, ``"5%"``, ..."""
    return "any" if coverage == 0 else f"{coverage * 100:g}%"


@dataclass(frozen=True)
class DefectClassRecall:
    """Instance recall of one defect class."""

    defect_class: str
    num_instances: int
    detected: dict[str, int]  # criterion label -> detected instances
    recall: dict[str, float | None]  # criterion label -> detected / instances
    defect_pixels: int
    covered_pixels: int

    @property
    def pixel_coverage(self) -> float | None:
        """Covered defect pixels / defect pixels (None without defect pixels)."""
        return self.covered_pixels / self.defect_pixels if self.defect_pixels else None

    def to_dict(self) -> dict[str, Any]:
        return {"defect_class": self.defect_class, "num_instances": self.num_instances,
                "detected": dict(self.detected), "recall": dict(self.recall),
                "defect_pixels": self.defect_pixels, "covered_pixels": self.covered_pixels,
                "pixel_coverage": self.pixel_coverage}


@dataclass(frozen=True)
class DefectWiseRecall:
    """Result of :func:`defect_wise_recall`."""

    criteria: tuple[str, ...]
    per_class: dict[str, DefectClassRecall]
    mean_recall: dict[str, float | None]  # mean over classes that have instances
    pooled_recall: dict[str, float | None]  # over all instances of all classes
    mean_pixel_coverage: float | None
    min_region_size: int
    predicted_regions: int  # predicted connected regions before removal
    removed_regions: int  # of those, smaller than min_region_size
    removed_pixels: int
    false_positive_regions: int  # kept predicted regions touching no defect pixel
    num_images: int = field(default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "criteria": list(self.criteria),
            "per_class": {name: stats.to_dict() for name, stats in self.per_class.items()},
            "mean_recall": dict(self.mean_recall),
            "pooled_recall": dict(self.pooled_recall),
            "mean_pixel_coverage": self.mean_pixel_coverage,
            "min_region_size": self.min_region_size,
            "predicted_regions": self.predicted_regions,
            "removed_regions": self.removed_regions,
            "removed_pixels": self.removed_pixels,
            "false_positive_regions": self.false_positive_regions,
            "num_images": self.num_images,
        }


def _load_prediction(item: Any, index: int) -> np.ndarray:
    if callable(item) and not isinstance(item, np.ndarray):
        item = item()
    array = np.asarray(item)
    if np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"predicted mask {index} has float dtype {array.dtype}: pass a binary mask "
            "(e.g. anomaly_map > threshold), not scores"
        )
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"predicted mask {index}: expected a 2-D array, got shape {array.shape}")
    return array != 0


def defect_wise_recall(predicted_masks: Iterable[Any], ground_truth_masks: Iterable[Any],
                       defect_classes: Iterable[str] | None = None, *,
                       coverages: Sequence[float] = DEFAULT_COVERAGES,
                       min_region_size: int = 0) -> DefectWiseRecall:
    """Instance recall per defect class at several coverage criteria.

    Args:
        predicted_masks: N binary (H_i, W_i) predictions (bool / integer, != 0 = flagged), or
            zero-argument loaders.
        ground_truth_masks: N masks of the same shapes (!= 0 = defect; None = defect-free).
        defect_classes: N class names (e.g. the test sub-folder); None: one class "all".
            The class of a defect-free image is ignored.
        coverages: fractions in [0, 1]; 0 = "any pixel". A criterion c is met when
            ``covered >= c * instance_size`` (c read as the decimal it prints as).
        min_region_size: predicted 8-connected regions with fewer pixels are removed first.

    Returns:
        :class:`DefectWiseRecall` (criterion keys from :func:`coverage_label`).
    """
    if min_region_size < 0:
        raise ConfigError(f"min_region_size must be >= 0, got {min_region_size}")
    fractions = []
    for coverage in coverages:
        if not 0.0 <= coverage <= 1.0:
            raise ConfigError(f"coverage criterion must lie in [0, 1], got {coverage}")
        fractions.append(Fraction(repr(float(coverage))))
    labels = tuple(coverage_label(coverage) for coverage in coverages)

    classes = None if defect_classes is None else list(defect_classes)

    instances: dict[str, int] = {}
    detected: dict[str, list[int]] = {}
    defect_pixels: dict[str, int] = {}
    covered_pixels: dict[str, int] = {}
    predicted_regions = removed_regions = removed_pixels = false_positive_regions = 0
    num_images = 0

    for index, predicted_item, truth_item in iter_pairs(predicted_masks, ground_truth_masks,
                                                        ("predicted_masks", "ground_truth_masks")):
        num_images += 1
        predicted = _load_prediction(predicted_item, index)
        truth = load_binary_mask(truth_item, predicted.shape, index, what="ground-truth mask")

        region_labels, num_predicted = ndimage.label(predicted, structure=EIGHT_CONNECTIVITY)
        predicted_regions += num_predicted
        if min_region_size > 0 and num_predicted:
            sizes = np.bincount(region_labels.ravel())
            small = sizes < min_region_size
            small[0] = False
            removed_regions += int(np.count_nonzero(small))
            removed_pixels += int(sizes[small].sum())
            predicted = predicted & ~small[region_labels]
            region_labels, num_predicted = ndimage.label(predicted, structure=EIGHT_CONNECTIVITY)

        if truth is not None and num_predicted:
            touching = np.unique(region_labels[truth & predicted])
            false_positive_regions += num_predicted - int(np.count_nonzero(touching))
        else:
            false_positive_regions += num_predicted
        if truth is None or not truth.any():
            continue

        if classes is None:
            defect_class = "all"
        elif index < len(classes):
            defect_class = str(classes[index])
        else:
            raise ValueError(f"defect_classes has {len(classes)} entries, but image {index} "
                             "has a defect")
        instance_labels, num_instances = ndimage.label(truth, structure=EIGHT_CONNECTIVITY)
        sizes = np.bincount(instance_labels.ravel(), minlength=num_instances + 1)[1:]
        covered = np.bincount(instance_labels[predicted], minlength=num_instances + 1)[1:]
        counts = detected.setdefault(defect_class, [0] * len(fractions))
        for position, fraction in enumerate(fractions):
            if fraction == 0:
                met = covered > 0
            else:  # covered / size >= p / q  <=>  covered * q >= p * size, in integers
                met = covered * fraction.denominator >= fraction.numerator * sizes
            counts[position] += int(np.count_nonzero(met))
        instances[defect_class] = instances.get(defect_class, 0) + num_instances
        defect_pixels[defect_class] = defect_pixels.get(defect_class, 0) + int(sizes.sum())
        covered_pixels[defect_class] = covered_pixels.get(defect_class, 0) + int(covered.sum())

    per_class = {
        name: DefectClassRecall(
            defect_class=name,
            num_instances=instances[name],
            detected=dict(zip(labels, detected[name])),
            recall={label: count / instances[name] for label, count in zip(labels, detected[name])},
            defect_pixels=defect_pixels[name],
            covered_pixels=covered_pixels[name],
        )
        for name in sorted(instances)
    }
    mean_recall: dict[str, float | None] = {}
    pooled_recall: dict[str, float | None] = {}
    total_instances = sum(instances.values())
    for position, label in enumerate(labels):
        recalls = [stats.recall[label] for stats in per_class.values()]
        mean_recall[label] = float(np.mean(recalls)) if recalls else None
        pooled_recall[label] = (sum(detected[name][position] for name in detected) / total_instances
                                if total_instances else None)
    coverages_per_class = [stats.pixel_coverage for stats in per_class.values()]
    return DefectWiseRecall(
        criteria=labels,
        per_class=per_class,
        mean_recall=mean_recall,
        pooled_recall=pooled_recall,
        mean_pixel_coverage=(float(np.mean(coverages_per_class)) if coverages_per_class
                             else None),
        min_region_size=int(min_region_size),
        predicted_regions=predicted_regions,
        removed_regions=removed_regions,
        removed_pixels=removed_pixels,
        false_positive_regions=false_positive_regions,
        num_images=num_images,
    )
