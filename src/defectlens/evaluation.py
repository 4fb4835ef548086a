"""Run a detector (or anomaly maps written by any program) over a test set -> a report dict.

The report's JSON shape (stable; later additions only add keys):
    {"image": {"auroc", "ap", "f1_max", "f1_threshold", "tpr_at_tnr": {"0.9", "0.95", "0.99"},
               "at_threshold": {...}},
     "pixel": {"auroc", "aupro": {"0.3", "0.1", "0.05", "0.01", "1.0"}, "f1_max", "at_threshold"},
     "defect_recall": {...}, "per_defect_type": {...}, "timing": {"fit_s", "ms_per_image"}, ...}
A metric that is undefined for the data (e.g. image AUROC with no good image) is null.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from defectlens import metrics
from defectlens.data.datasets import Sample
from defectlens.data.images import read_mask
from defectlens.metrics.instances import defect_wise_recall

AUPRO_LIMITS = (0.3, 0.1, 0.05, 0.01, 1.0)
TNRS = (0.9, 0.95, 0.99)
_IN_MEMORY_PIXELS = 64 * 1024 * 1024  # beyond this, maps are spilled to .npy files


@dataclass
class EvaluationRun:
    """Per-image results of a run, kept for reports (scores, maps or their loaders)."""

    samples: list[Sample]
    scores: np.ndarray
    anomaly_maps: list[Any]  # arrays, or zero-argument loaders of arrays
    threshold: float | None
    seconds_per_image: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _mask_loader(sample: Sample, shape: tuple[int, int]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if sample.mask_path is None:
            return np.zeros(shape, dtype=bool)
        return read_mask(sample.mask_path)

    return load


def _resolve(item: Any) -> np.ndarray:
    return item() if callable(item) else item


def run_detector(detector: Any, samples: Sequence[Sample], progress: Callable[[str, int, int], None] | None = None) -> EvaluationRun:
    """Score every sample with `detector` (batched); maps kept in memory or spilled to disk."""
    scores: list[float] = []
    maps: list[Any] = []
    spill_dir: Path | None = None
    pixels_held = 0
    started = time.perf_counter()
    for start in range(0, len(samples), detector.batch_size):
        chunk = samples[start : start + detector.batch_size]
        predictions = detector.predict_batch([sample.path for sample in chunk])
        for offset, prediction in enumerate(predictions):
            scores.append(prediction.score)
            pixels_held += prediction.anomaly_map.size
            if pixels_held > _IN_MEMORY_PIXELS:
                if spill_dir is None:
                    spill_dir = Path(tempfile.mkdtemp(prefix="defectlens-maps-"))
                file = spill_dir / f"{start + offset:06d}.npy"
                np.save(file, prediction.anomaly_map)
                maps.append(lambda file=file: np.load(file))
            else:
                maps.append(prediction.anomaly_map)
        if progress:
            progress("evaluating", min(start + detector.batch_size, len(samples)), len(samples))
    elapsed = time.perf_counter() - started
    return EvaluationRun(list(samples), np.asarray(scores), maps, detector.threshold, elapsed / max(1, len(samples)))


def _labels(samples: Sequence[Sample]) -> np.ndarray:
    return np.asarray([sample.label for sample in samples], dtype=np.int64)


def image_report(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    f1, f1_threshold = metrics.f1_max(scores, labels)
    tpr = metrics.tpr_at_tnr(scores, labels, TNRS)
    report: dict[str, Any] = {
        "auroc": metrics.image_auroc(scores, labels),
        "ap": metrics.average_precision(scores, labels),
        "f1_max": f1,
        "f1_threshold": f1_threshold,
        "tpr_at_tnr": {
            str(tnr): (None if value is None else value.tpr) for tnr, value in tpr.items()
        },
        "tpr_at_tnr_thresholds": {
            str(tnr): (None if value is None else value.threshold) for tnr, value in tpr.items()
        },
        "num_good": int((labels == 0).sum()),
        "num_defective": int((labels == 1).sum()),
    }
    if threshold is not None:
        report["threshold"] = threshold
        report["at_threshold"] = metrics.classification_at_threshold(scores, labels, threshold)
    return report


def metrics_report(run: EvaluationRun, fit_seconds: float | None = None) -> dict[str, Any]:
    """The full metric report of a run (image, pixel, defect-wise recall, per defect type)."""
    samples = run.samples
    labels = _labels(samples)
    masks = [_mask_loader(sample, _resolve(anomaly_map).shape) if sample.mask_path is None else _mask_loader(sample, (0, 0))
             for sample, anomaly_map in zip(samples, run.anomaly_maps)]
    has_masks = any(sample.mask_path is not None for sample in samples)
    report: dict[str, Any] = {"image": image_report(run.scores, labels, run.threshold)}
    if has_masks:
        pixel = metrics.pixel_metrics(run.anomaly_maps, masks, AUPRO_LIMITS, with_curve=True)
        report["pixel"] = {
            "auroc": pixel.auroc,
            "aupro": {str(limit): value for limit, value in pixel.aupro.items()},
            "f1_max": pixel.f1_max,
            "f1_threshold": pixel.f1_threshold,
            "num_regions": pixel.num_regions,
        }
        run.extra["pro_curve"] = pixel.pro_curve
        if run.threshold is not None:
            report["pixel"]["at_threshold"] = metrics.pixel_classification_at_threshold(run.anomaly_maps, masks, run.threshold)
            defective = [i for i, sample in enumerate(samples) if sample.label == 1 and sample.mask_path is not None]
            recall = defect_wise_recall(
                (_resolve(run.anomaly_maps[i]) > run.threshold for i in defective),
                (masks[i] for i in defective),
                [samples[i].defect_type for i in defective],
            )
            report["defect_recall"] = recall.to_dict()
    else:
        report["pixel"] = {"auroc": None, "aupro": {str(limit): None for limit in AUPRO_LIMITS}, "f1_max": None}
    report["per_defect_type"] = per_defect_type(run, labels)
    report["timing"] = {"fit_s": fit_seconds, "ms_per_image": None if run.seconds_per_image is None else run.seconds_per_image * 1e3}
    return report


def per_defect_type(run: EvaluationRun, labels: np.ndarray) -> dict[str, Any]:
    """Per defect type: count, mean score, and image AUROC of that type against the good images."""
    types = sorted({sample.defect_type for sample in run.samples})
    good = labels == 0
    table: dict[str, Any] = {}
    for defect_type in types:
        chosen = np.asarray([sample.defect_type == defect_type for sample in run.samples])
        entry: dict[str, Any] = {
            "count": int(chosen.sum()),
            "mean_score": float(run.scores[chosen].mean()),
        }
        if defect_type != "good":
            versus_good = chosen | good
            entry["image_auroc"] = metrics.image_auroc(run.scores[versus_good], labels[versus_good])
            if run.threshold is not None:
                entry["detected"] = int((run.scores[chosen] > run.threshold).sum())
        elif run.threshold is not None:
            entry["false_alarms"] = int((run.scores[chosen] > run.threshold).sum())
        table[defect_type] = entry
    return table


def evaluate(detector: Any, dataset: Any, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate a fitted detector on a data set's test samples -> report dict."""
    run = run_detector(detector, dataset.test_samples(), progress)
    fit = detector.fit_info
    fit_seconds = fit.feature_seconds + fit.method_seconds + fit.calibration_seconds
    report = metrics_report(run, fit_seconds or None)
    report["data"] = {"root": str(getattr(dataset, "root", "")), "name": getattr(dataset, "name", "")}
    report["model"] = {"method": detector.method_name, "backbone": detector.backbone, "threshold": detector.threshold}
    return report
