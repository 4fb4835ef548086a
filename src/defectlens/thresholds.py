"""Decision thresholds.

By default from normal images only: the threshold is the quantile of held-out normal image
scores at 1 - target false-positive rate (defect-free images need no labels). Optionally the
F1-optimal threshold on a labelled validation set.
"""

from __future__ import annotations

import numpy as np

from defectlens.errors import ConfigError
from defectlens.metrics import f1_max, normal_quantile_threshold


def threshold_from_normal_scores(normal_scores: np.ndarray, target_fpr: float = 0.01) -> float:
    """Threshold flagging at most `target_fpr` of these normal scores (score > threshold).

    The (1 - target_fpr) quantile with the inverted-CDF convention of
    `defectlens.metrics.normal_quantile_threshold` (the AutoVI protocol's rule).
    """
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ConfigError("cannot set a threshold from zero normal scores")
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    return float(normal_quantile_threshold(scores, 1.0 - target_fpr))


def threshold_f1_optimal(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximizing F1 on a labelled validation set (needs both classes)."""
    best_f1, threshold = f1_max(np.asarray(scores), np.asarray(labels))
    if best_f1 is None or threshold is None:
        raise ConfigError("F1-optimal threshold needs good and defective validation images")
    return float(threshold)
