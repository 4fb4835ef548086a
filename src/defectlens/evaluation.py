"""Run a detector (or anomaly maps written by any program) over a test set -> a report dict.

The report's JSON shape (stable; later additions only add keys):
    {"image": {"auroc", "ap", "f1_max", "f1_threshold", "tpr_at_tnr": {"0.9", "0.95", "0.99"},
               "at_threshold": {...}},
     "pixel": {"auroc", "aupro": {"0.3", "0.1", "0.05", "0.01", "1.0"}, "f1_max", "at_threshold"},
     "defect_recall": {...}, "per_defect_type": {...}, "timing": {"fit_s", "ms_per_image"},
     "spro": {"all" | "logical" | "structural" | <defect>: {"auspro": {"0.01", "0.05", "0.1",
              "0.3", "1.0"}, "num_images", "num_defective"}},   # LOCO-style ground truth only
     "data": {...}, "model": {...}}
A metric that is undefined for the data (e.g. image AUROC with no good image) is null.

Two entry points: :func:`evaluate` runs a fitted detector; :func:`evaluate_maps` scores
anomaly maps written by any program (one float TIFF or .npy per test image, in the test
images' relative layout, as the official MVTec AD evaluation expects).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from defectlens import metrics
from defectlens.data.datasets import Sample, dataset_warnings, open_dataset
from defectlens.data.images import read_mask
from defectlens.errors import DatasetError
from defectlens.metrics.instances import defect_wise_recall
from defectlens.metrics.pixel import resolve, squeeze_to_2d
from defectlens.metrics.spro import DEFAULT_SPRO_LIMITS, read_channel_dir

logger = logging.getLogger(__name__)
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
    verdicts: list[str] | None = None  # "OK" / "REVIEW" / "NOT OK" per sample (a model's own)
    defects_config: Any = None  # LOCO defects_config.json (path or parsed) for sPRO


def _mask_loader(sample: Sample) -> Callable[[], np.ndarray] | None:
    """Zero-argument loader of a sample's bool mask; None for a sample without ground truth.

    LOCO-style samples (``channel_dir``) give the union of their channels.
    """
    if sample.channel_dir is not None:
        channel_dir = sample.channel_dir

        def load_union() -> np.ndarray:
            channels = read_channel_dir(channel_dir)
            union = channels[0] != 0
            for channel in channels[1:]:
                union |= channel != 0
            return union

        return load_union
    if sample.mask_path is None:
        return None
    mask_path = sample.mask_path
    return lambda: read_mask(mask_path)


def _channels_loader(sample: Sample) -> Callable[[], list[np.ndarray]]:
    channel_dir = sample.channel_dir
    if channel_dir is None:
        return lambda: []
    return lambda: read_channel_dir(channel_dir)


def run_detector(detector: Any, samples: Sequence[Sample], progress: Callable[[str, int, int], None] | None = None) -> EvaluationRun:
    """Score every sample with `detector` (batched); maps kept in memory or spilled to disk."""
    scores: list[float] = []
    maps: list[Any] = []
    spill_dir: Path | None = None
    pixels_held = 0
    started = time.perf_counter()
    verdicts: list[str] = []
    for start in range(0, len(samples), detector.batch_size):
        chunk = samples[start : start + detector.batch_size]
        predictions = detector.predict_batch([sample.path for sample in chunk])
        for offset, prediction in enumerate(predictions):
            scores.append(prediction.score)
            verdicts.append(prediction.verdict)
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
    return EvaluationRun(
        list(samples), np.asarray(scores), maps, detector.threshold, elapsed / max(1, len(samples)), verdicts=verdicts
    )


def _labels(samples: Sequence[Sample]) -> np.ndarray:
    return np.asarray([sample.label for sample in samples], dtype=np.int64)


def verdict_report(verdicts: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
    """Verdict counts per class, the false-alarm rate (NOT OK among good parts) and the miss
    rate (OK among defective parts) with 95 % Clopper-Pearson intervals, and REVIEW rates;
    rates are None where a class is absent."""
    from defectlens.calibration import clopper_pearson

    verdict_array = np.asarray(list(verdicts))
    report: dict[str, Any] = {}
    for name, label, wrong in (("good", 0, "NOT OK"), ("defective", 1, "OK")):
        of_class = verdict_array[labels == label]
        count = {state: int((of_class == state).sum()) for state in ("OK", "REVIEW", "NOT OK")}
        total = int(of_class.size)
        rate_name = "false_alarm" if label == 0 else "miss"
        report[name] = {
            "count": total, **count,
            f"{rate_name}_rate": count[wrong] / total if total else None,
            f"{rate_name}_interval": list(clopper_pearson(count[wrong], total)) if total else None,
            "review_rate": count["REVIEW"] / total if total else None,
        }
    return report


def image_report(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None, verdicts: Sequence[str] | None = None
) -> dict[str, Any]:
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
    if verdicts is not None:
        report["verdicts"] = verdict_report(verdicts, labels)
        flagged = np.asarray([verdict == "NOT OK" for verdict in verdicts])  # the model's own verdicts (rules applied)
        positive = labels == 1
        report["at_threshold"] = metrics.counts_summary(
            tp=int((flagged & positive).sum()), fp=int((flagged & ~positive).sum()),
            tn=int((~flagged & ~positive).sum()), fn=int((~flagged & positive).sum()),
        )
    return report


def metrics_report(run: EvaluationRun, fit_seconds: float | None = None) -> dict[str, Any]:
    """The full metric report of a run (image, pixel, defect-wise recall, per defect type)."""
    samples = run.samples
    labels = _labels(samples)
    masks = [_mask_loader(sample) for sample in samples]
    has_masks = any(mask is not None for mask in masks)
    report: dict[str, Any] = {"image": image_report(run.scores, labels, run.threshold, run.verdicts)}
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
            defective = [i for i, sample in enumerate(samples) if sample.label == 1 and masks[i] is not None]
            recall = defect_wise_recall(
                (resolve(run.anomaly_maps[i]) > run.threshold for i in defective),
                (masks[i] for i in defective),
                [samples[i].defect_type for i in defective],
            )
            report["defect_recall"] = recall.to_dict()
    else:
        report["pixel"] = {"auroc": None, "aupro": {str(limit): None for limit in AUPRO_LIMITS}, "f1_max": None}
    report["per_defect_type"] = per_defect_type(run, labels)
    report["timing"] = {"fit_s": fit_seconds, "ms_per_image": None if run.seconds_per_image is None else run.seconds_per_image * 1e3}
    if run.defects_config is not None and any(sample.channel_dir is not None for sample in samples):
        report["spro"] = spro_report(run)
    return report


def spro_subset_name(defect_type: str) -> str:
    """LOCO's ``logical_anomalies`` -> ``logical`` (AutoVI's defect names stay as they are)."""
    return defect_type[: -len("_anomalies")] if defect_type.endswith("_anomalies") else defect_type


def spro_report(run: EvaluationRun, limits: Sequence[float] = DEFAULT_SPRO_LIMITS) -> dict[str, Any]:
    """AUsPRO per subset: ``all`` images, and each defect type (LOCO: ``logical`` and
    ``structural``) together with all good images, as the LOCO evaluation reports them."""
    samples = run.samples
    defect_types = sorted({sample.defect_type for sample in samples if sample.label == 1})
    subsets: dict[str, list[int]] = {"all": list(range(len(samples)))}
    for defect_type in defect_types:
        subsets[spro_subset_name(defect_type)] = [
            i for i, sample in enumerate(samples) if sample.label == 0 or sample.defect_type == defect_type
        ]
    curves: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for name, chosen in subsets.items():
        maps = [run.anomaly_maps[i] for i in chosen]
        truth = [_channels_loader(samples[i]) for i in chosen]
        if name == "all":
            curve = metrics.spro_curve(maps, truth, run.defects_config)
            curves[name] = curve
            values = {float(limit): (None if curve is None else curve.area(float(limit))) for limit in limits}
        else:
            values = metrics.auspro(maps, truth, run.defects_config, limits)
        result[name] = {
            "auspro": {str(limit): values[float(limit)] for limit in limits},
            "num_images": len(chosen),
            "num_defective": sum(samples[i].label for i in chosen),
        }
    run.extra["spro_curves"] = curves
    return result


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
        flagged = (
            np.asarray([verdict == "NOT OK" for verdict in run.verdicts]) if run.verdicts is not None
            else run.scores > run.threshold if run.threshold is not None else None
        )
        if defect_type != "good":
            versus_good = chosen | good
            entry["image_auroc"] = metrics.image_auroc(run.scores[versus_good], labels[versus_good])
            if flagged is not None:
                entry["detected"] = int(flagged[chosen].sum())
        elif flagged is not None:
            entry["false_alarms"] = int(flagged[chosen].sum())
        table[defect_type] = entry
    return table


_LAYOUTS = {"MVTecAD": "mvtec_ad", "ImageFolder": "folder"}


def _data_info(dataset: Any) -> dict[str, Any]:
    return {
        "root": str(getattr(dataset, "root", "")),
        "name": getattr(dataset, "name", ""),
        "layout": getattr(dataset, "kind", None) or _LAYOUTS.get(type(dataset).__name__, type(dataset).__name__),
    }


def _as_dataset(dataset: Any) -> Any:
    return open_dataset(dataset) if isinstance(dataset, (str, Path)) else dataset


def evaluate_run(detector: Any, dataset: Any, progress: Callable[[str, int, int], None] | None = None
                 ) -> tuple[dict[str, Any], EvaluationRun]:
    """Like :func:`evaluate`, also returning the run (scores, maps) for plots and galleries."""
    dataset = _as_dataset(dataset)
    samples = dataset.test_samples()
    warnings = dataset_warnings(dataset, samples)
    # a supervised method (supervised_fpn) never is evaluated on the defective images it trained on
    trained_on = {Path(p).resolve() for p in detector.method.labelled_training_images()}
    if trained_on:
        kept = [sample for sample in samples if Path(sample.path).resolve() not in trained_on]
        if len(kept) < len(samples):
            warnings.append(f"{len(samples) - len(kept)} defective images the model was trained on (their labels) "
                            f"are left out of the evaluation; {len(kept)} images evaluated")
        samples = kept
    for warning in warnings:
        logger.warning(warning)
    run = run_detector(detector, samples, progress)
    run.defects_config = getattr(dataset, "defects_config", None)
    fit = detector.fit_info
    fit_seconds = fit.feature_seconds + fit.method_seconds + fit.calibration_seconds
    report = metrics_report(run, fit_seconds or None)
    report["data"] = {**_data_info(dataset), "warnings": warnings}
    report["model"] = {
        "method": detector.method_name, "backbone": detector.backbone, "threshold": detector.threshold,
        "review_threshold": detector.review_threshold,
    }
    return report, run


def evaluate(detector: Any, dataset: Any, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate a fitted detector on a data set's test samples -> report dict.

    ``dataset``: a data set object (``MVTecAD``, ``MVTecLOCO``, ...) or its root folder.
    """
    return evaluate_run(detector, dataset, progress)[0]


# ------------------------------------------------------------------------------------------
# anomaly maps written by any program
# ------------------------------------------------------------------------------------------
MAP_SUFFIXES = (".tiff", ".tif", ".npy")


def _relative_key(sample: Sample, root: Path) -> PurePosixPath:
    """The test image's path relative to the data set root, without suffix."""
    try:
        relative = sample.path.relative_to(root)
    except ValueError:
        relative = Path(sample.path.parent.name) / sample.path.name
    return PurePosixPath(relative.as_posix()).with_suffix("")


def _maps_base(maps_dir: Path, dataset: Any) -> Path:
    """``MAPS_DIR`` itself, or ``MAPS_DIR/<category>`` when the maps of several categories
    share one folder (the official evaluation's ``anomaly_maps/<object>/test/...``)."""
    name = getattr(dataset, "name", "")
    if not (maps_dir / "test").is_dir() and name and (maps_dir / name / "test").is_dir():
        return maps_dir / name
    return maps_dir


def read_anomaly_map(file: Path) -> np.ndarray:
    """One anomaly map file (.tiff/.tif via tifffile, .npy) -> 2-D array (DatasetError if not)."""
    try:
        if file.suffix.lower() == ".npy":
            array = np.load(file, allow_pickle=False)
        else:
            import tifffile

            array = tifffile.imread(file)
    except Exception as error:  # tifffile / numpy raise many types; report them the same way
        raise DatasetError(f"cannot read anomaly map {file}: {error}") from None
    try:
        array = squeeze_to_2d(np.asarray(array), f"anomaly map {file}")
    except ValueError as error:
        raise DatasetError(f"{error} (not a single-channel map)") from None
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DatasetError(f"anomaly map {file} has unsupported type {array.dtype}")
    return array


def _image_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return height, width


def _map_loader(file: Path, image_path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        array = read_anomaly_map(file)
        expected = _image_shape(image_path)
        if array.shape != expected:
            raise DatasetError(
                f"anomaly map {file} is {array.shape[0]}x{array.shape[1]} (HxW) but its test image "
                f"{image_path} is {expected[0]}x{expected[1]}: maps must have the image's size"
            )
        return array

    return load


def _normalized_key(text: str) -> str:
    key = PurePosixPath(text.strip().replace("\\", "/"))
    return (key.with_suffix("") if key.suffix else key).as_posix()


def read_scores_file(path: str | Path) -> dict[str, float]:
    """Image scores from JSON (``{relative_path: score}`` or ``[{"path", "score"}]``) or CSV
    (``path,score`` rows, optional header) -> ``{normalized relative path: score}``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read scores file {file}: {error}") from None
    pairs: list[tuple[str, Any]] = []
    if file.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetError(f"scores file {file} is not valid JSON: {error}") from None
        if isinstance(document, dict):
            pairs = list(document.items())
        elif isinstance(document, list):
            try:
                pairs = [(str(entry["path"]), entry["score"]) for entry in document]
            except (TypeError, KeyError):
                raise DatasetError(f"scores file {file}: a JSON list must hold {{'path', 'score'}} objects") from None
        else:
            raise DatasetError(f"scores file {file}: expected a JSON object {{path: score}}")
    else:
        for number, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DatasetError(f"scores file {file}, line {number}: expected 'path,score'")
            try:
                float(row[1])
            except ValueError:
                if number == 1:
                    continue  # header
                raise DatasetError(f"scores file {file}, line {number}: score {row[1]!r} is not a number") from None
            pairs.append((row[0], row[1]))
    scores: dict[str, float] = {}
    for key, value in pairs:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DatasetError(f"scores file {file}: score of {key!r} is not a number ({value!r})") from None
        if np.isnan(score):
            raise DatasetError(f"scores file {file}: score of {key!r} is NaN")
        scores[_normalized_key(str(key))] = score
    return scores


def _lookup_score(scores: dict[str, float], key: PurePosixPath, sample: Sample) -> float | None:
    candidates = [key.as_posix()]
    if key.parts and key.parts[0] == "test":
        candidates.append(PurePosixPath(*key.parts[1:]).as_posix())
    else:
        candidates.append(("test" / key).as_posix())
    candidates.append(_normalized_key(str(sample.path)))
    for candidate in candidates:
        if candidate in scores:
            return scores[candidate]
    return None


def evaluate_maps_run(maps_dir: str | Path, dataset: Any, scores_file: str | Path | None = None,
                      threshold: float | None = None) -> tuple[dict[str, Any], EvaluationRun]:
    """Like :func:`evaluate_maps`, also returning the run (for plots and galleries)."""
    dataset = _as_dataset(dataset)
    directory = Path(maps_dir)
    if not directory.is_dir():
        raise DatasetError(f"anomaly maps folder not found: {directory}")
    base = _maps_base(directory, dataset)
    root = Path(getattr(dataset, "root", directory))
    samples = dataset.test_samples()
    loaders: list[Callable[[], np.ndarray]] = []
    keys: list[PurePosixPath] = []
    missing: list[str] = []
    for sample in samples:
        key = _relative_key(sample, root)
        keys.append(key)
        stem = base / Path(*key.parts)
        found = next((stem.with_name(stem.name + suffix) for suffix in MAP_SUFFIXES
                      if stem.with_name(stem.name + suffix).is_file()), None)
        if found is None:
            missing.append(f"{stem}.tiff")
            continue
        loaders.append(_map_loader(found, sample.path))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            f"anomaly map missing for {len(missing)} of {len(samples)} test images: {missing[0]}{more}; "
            f"expected one map per test image at MAPS_DIR/<relative image path>.tiff (or .tif, .npy)"
        )
    if scores_file is not None:
        table = read_scores_file(scores_file)
        values = []
        for sample, key in zip(samples, keys):
            score = _lookup_score(table, key, sample)
            if score is None:
                raise DatasetError(f"scores file {scores_file} has no score for test image {key.as_posix()}")
            values.append(score)
        scores = np.asarray(values, dtype=np.float64)
        score_source = "scores_file"
    else:
        scores = metrics.image_scores_from_maps(loaders)
        score_source = "map_max"
    run = EvaluationRun(samples, scores, list(loaders), threshold)
    run.defects_config = getattr(dataset, "defects_config", None)
    report = metrics_report(run)
    report["data"] = _data_info(dataset)
    report["model"] = {
        "maps_dir": str(directory),
        "scores_file": None if scores_file is None else str(scores_file),
        "image_score": score_source,
        "threshold": threshold,
    }
    return report, run


def evaluate_maps(maps_dir: str | Path, dataset: Any, scores_file: str | Path | None = None,
                  threshold: float | None = None) -> dict[str, Any]:
    """Evaluate anomaly maps written by any program -> report dict (same shape as evaluate).

    Args:
        maps_dir: one map per test image at ``maps_dir/<image path relative to the data set
            root, without suffix>.tiff`` (``.tif`` or ``.npy`` too), e.g.
            ``maps_dir/test/broken/003.tiff`` for ``root/test/broken/003.png``;
            ``maps_dir/<category>/test/...`` is found as well. A 2-D float map of exactly its
            image's size (as the official MVTec AD evaluation requires; no resizing here).
            Maps are read lazily, one at a time.
        dataset: a data set object or its root folder (layout detected by ``open_dataset``).
        scores_file: optional image scores, JSON ``{relative_path: score}`` or CSV
            ``path,score``; without it an image's score is its map's maximum.
        threshold: optional decision threshold (adds ``at_threshold`` and defect recall).

    Raises:
        DatasetError: a map is missing (named), unreadable, or of another size than its image;
            or the scores file lacks an image.
    """
    return evaluate_maps_run(maps_dir, dataset, scores_file, threshold)[0]
