"""Image-level metrics: one score per image (e.g. the maximum of its anomaly map), one label.

Conventions used throughout :mod:`defectlens.metrics`:

* labels: 1 / True = defective (anomalous), 0 / False = defect-free (normal);
* a binary decision at a threshold flags an image as anomalous when ``score > threshold``
  (strict), so a threshold equal to a normal image's score keeps that image normal;
* a metric that is undefined on the data (e.g. AUROC with one class only) is ``None``.

scikit-learn does the curve work (``roc_auc_score``, ``average_precision_score``,
``precision_recall_curve``); the normal-only thresholds of :func:`tpr_at_tnr` and the
counting in :func:`classification_at_threshold` are hand-written (a few lines each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectlens.errors import ConfigError

__all__ = [
    "DEFAULT_TNRS",
    "TprAtTnr",
    "average_precision",
    "classification_at_threshold",
    "counts_summary",
    "f1_max",
    "image_auroc",
    "image_scores_from_maps",
    "tpr_at_tnr",
]

DEFAULT_TNRS: tuple[float, ...] = (0.90, 0.95, 0.99)


def _scores_and_labels(scores: Iterable[float], labels: Iterable[Any]
                       ) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores,
                             dtype=np.float64).ravel()
    label_array = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels
                             ).ravel()
    if score_array.shape != label_array.shape:
        raise ValueError(
            f"{score_array.size} scores but {label_array.size} labels: one label per score"
        )
    if np.isnan(score_array).any():
        first = int(np.flatnonzero(np.isnan(score_array))[0])
        raise ValueError(f"scores contain NaN at index {first}")
    if label_array.dtype != np.bool_:
        unexpected = set(np.unique(label_array).tolist()) - {0, 1}
        if unexpected:
            raise ValueError(f"labels must be 0/1 or bool, found {sorted(unexpected)[:5]}")
    return score_array, label_array.astype(bool)


def image_scores_from_maps(anomaly_maps: Iterable[Any]) -> np.ndarray:
    """(N,) float64 image scores = the maximum of each anomaly map (arrays or loaders)."""
    scores = []
    for item in anomaly_maps:
        array = item() if callable(item) and not isinstance(item, np.ndarray) else item
        scores.append(float(np.max(array)))
    return np.asarray(scores, dtype=np.float64)


def image_auroc(scores: Iterable[float], labels: Iterable[Any]) -> float | None:
    """Area under the ROC curve of image scores, tied scores counted one half.

    Args:
        scores: (N,) image scores, higher = more anomalous.
        labels: (N,) 1 / True = defective.

    Returns:
        AUROC in [0, 1] (scikit-learn ``roc_auc_score``, identical to MVTec AD's
        ``roc_curve_util``), or None when only one class is present.
    """
    score_array, label_array = _scores_and_labels(scores, labels)
    if label_array.all() or not label_array.any():
        return None
    return float(roc_auc_score(label_array, score_array))


def average_precision(scores: Iterable[float], labels: Iterable[Any]) -> float | None:
    """Average precision (scikit-learn, step-wise, no interpolation); None unless both good and
    defective images are present (with no good image every ranking has AP 1: meaningless)."""
    score_array, label_array = _scores_and_labels(scores, labels)
    if label_array.all() or not label_array.any():
        return None
    return float(average_precision_score(label_array, score_array))


def f1_max(scores: Iterable[float], labels: Iterable[Any]) -> tuple[float | None, float | None]:
    """Best F1 over every threshold, and that threshold.

    Returns:
        ``(f1, threshold)`` where anomalous = ``score > threshold``. The threshold is an
        observed score: the highest one below the lowest score flagged (or -inf when
        flagging every image is best). Among equal F1 values the highest threshold wins.
        ``(None, None)`` unless both good and defective images are present.
    """
    score_array, label_array = _scores_and_labels(scores, labels)
    if label_array.all() or not label_array.any():
        return None, None
    precision, recall, thresholds_at_least = precision_recall_curve(label_array, score_array)
    precision, recall = precision[:-1], recall[:-1]  # last point: nothing flagged
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # thresholds ascend: last = highest
    lowest_flagged = thresholds_at_least[best]
    below = score_array[score_array < lowest_flagged]
    threshold = float(below.max()) if below.size else -math.inf
    return float(f1[best]), threshold


@dataclass(frozen=True)
class TprAtTnr:
    """Operating point set from normal images only (see :func:`tpr_at_tnr`)."""

    target_tnr: float
    threshold: float  # anomalous = score > threshold
    tnr: float  # achieved on the normal images (>= target_tnr; larger with ties)
    tpr: float | None  # fraction of defective images with score > threshold

    def to_dict(self) -> dict[str, float | None]:
        return {"target_tnr": self.target_tnr, "threshold": self.threshold,
                "tnr": self.tnr, "tpr": self.tpr}


def normal_quantile_threshold(normal_scores: Sequence[float] | np.ndarray, tnr: float) -> float:
    """Smallest observed normal score ``t`` with ``#(normal <= t) >= tnr * #normal``.

    With ``n`` normal scores sorted ascending ``s_1 <= ... <= s_n`` this is ``s_k`` with
    ``k = ceil(tnr * n)`` (``tnr`` read as the decimal it prints as, so 0.95 * 20 is 19
    exactly). Classifying ``score > t`` as anomalous gives a TNR of at least ``tnr`` on
    these normal scores (the lower empirical quantile, numpy ``method="inverted_cdf"``).
    """
    if not 0.0 < tnr <= 1.0:
        raise ConfigError(f"target TNR must lie in (0, 1], got {tnr}")
    ordered = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if ordered.size == 0:
        raise ValueError("no normal score to set a threshold from")
    rank = math.ceil(Fraction(repr(float(tnr))) * ordered.size)
    return float(ordered[max(rank, 1) - 1])


def tpr_at_tnr(scores: Iterable[float], labels: Iterable[Any],
               tnrs: Iterable[float] = DEFAULT_TNRS) -> dict[float, TprAtTnr | None]:
    """TPR at thresholds set from the defect-free images only (AutoVI protocol).

    For each target TNR the threshold is :func:`normal_quantile_threshold` of the normal
    images' scores (never tuned on defective ones); an image is anomalous when
    ``score > threshold``.

    Returns:
        ``{target_tnr: TprAtTnr}``; a value is None when there is no normal image, and its
        ``tpr`` is None when there is no defective image.
    """
    score_array, label_array = _scores_and_labels(scores, labels)
    normal = score_array[~label_array]
    defective = score_array[label_array]
    result: dict[float, TprAtTnr | None] = {}
    for target in tnrs:
        target = float(target)
        if normal.size == 0:
            result[target] = None
            continue
        threshold = normal_quantile_threshold(normal, target)
        result[target] = TprAtTnr(
            target_tnr=target,
            threshold=threshold,
            tnr=float(np.count_nonzero(normal <= threshold)) / normal.size,
            tpr=(float(np.count_nonzero(defective > threshold)) / defective.size
                 if defective.size else None),
        )
    return result


def counts_summary(*, tp: int, fp: int, tn: int, fn: int) -> dict[str, float | int | None]:
    """precision, recall, accuracy, F1 from confusion counts (undefined ratio -> None)."""
    total = tp + fp + tn + fn
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "accuracy": (tp + tn) / total if total else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def classification_at_threshold(scores: Iterable[float], labels: Iterable[Any],
                                threshold: float) -> dict[str, float | int | None]:
    """Confusion counts and ratios with anomalous = ``score > threshold``.

    Returns:
        dict with ``precision, recall, accuracy, f1`` (None when undefined: no image flagged,
        no defective image, ...) and the counts ``tp, fp, tn, fn``.
    """
    score_array, label_array = _scores_and_labels(scores, labels)
    predicted = score_array > threshold
    tp = int(np.count_nonzero(predicted & label_array))
    fp = int(np.count_nonzero(predicted & ~label_array))
    fn = int(np.count_nonzero(~predicted & label_array))
    tn = int(np.count_nonzero(~predicted & ~label_array))
    return counts_summary(tp=tp, fp=fp, tn=tn, fn=fn)
