"""Drift monitoring: a model's recent image scores against its calibration distribution.

Per served model file (by sha256), the newest `window` inspection scores are compared with the
held-out normal scores stored in the model (`NormalScoreModel`):

- share above the NOT OK threshold (and above the review threshold) vs what calibration
  expects - the upper end of the 95 % interval of the calibration's own share, since that
  share is itself an estimate - with a one-sided binomial test;
- the two-sample Kolmogorov-Smirnov statistic and p-value (scipy), recent vs calibration;
- a control chart on the scores in normal units (``z = Phi^-1(mid-rank of the score among the
  calibration scores)``, about N(0, 1) for good parts):
  an EWMA (lambda 0.2) of the newest scores above its 3-sigma limit, or the newest 8 scores all
  above the calibration median (the Western Electric run rule; 1/256 by chance).

`status`: "insufficient data" under `min_window` scores, "drift" when any test fires at
`alpha`, else "ok". A monitor that flags is a warning to look at the line (lighting, position,
a new batch), not a verdict on any part: defective parts raise the scores too.
Pure functions over numbers; the service, the UI and ``defectlens monitor --db URL`` use them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from defectlens.calibration import NormalScoreModel, clopper_pearson

DEFAULT_WINDOW = 200
MIN_WINDOW = 20
ALPHA = 0.01
EWMA_LAMBDA = 0.2
EWMA_SIGMAS = 3.0
RUN_LENGTH = 8


@dataclass
class DriftReport:
    """The monitor's statement for one model file (JSON-safe through `to_dict`)."""

    model: str
    model_sha256: str
    status: str  # "ok" | "drift" | "insufficient data" | "no calibration"
    window: int  # scores compared
    calibration_size: int
    threshold: float
    review_threshold: float | None
    share_above_threshold: float | None = None
    expected_share_above_threshold: float | None = None
    share_above_review: float | None = None
    expected_share_above_review: float | None = None
    binomial_p_value: float | None = None
    ks_statistic: float | None = None
    ks_p_value: float | None = None
    ewma_z: float | None = None
    ewma_limit: float | None = None
    run_above_median: int | None = None  # the newest scores in a row above the calibration median
    alarms: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _share(values: np.ndarray, threshold: float | None) -> float | None:
    return None if threshold is None else float(np.mean(values > threshold))


def _ewma(z_values: np.ndarray, weight: float) -> float:
    level = 0.0
    for value in z_values:
        level = weight * float(value) + (1.0 - weight) * level
    return level


def _trailing_run(flags: np.ndarray) -> int:
    """How many of the newest values in a row are True."""
    run = 0
    for flag in flags[::-1]:
        if not flag:
            break
        run += 1
    return run


def normal_units(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Each score's mid-rank among the sorted calibration scores, in standard-normal units
    (bounded: the lowest and highest stay finite)."""
    below = np.searchsorted(calibration, scores, side="left")
    at_or_below = np.searchsorted(calibration, scores, side="right")
    position = (below + at_or_below) / 2.0 + 0.5
    return stats.norm.ppf(position / (calibration.size + 1))


def drift_report(
    model: str, model_sha256: str, recent: list[float] | np.ndarray, normal: NormalScoreModel | None,
    threshold: float, review_threshold: float | None = None, min_window: int = MIN_WINDOW, alpha: float = ALPHA,
) -> DriftReport:
    """Compare `recent` scores (oldest first) with the calibration scores `normal`."""
    scores = np.asarray(recent, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    report = DriftReport(model, model_sha256, "ok", int(scores.size), 0 if normal is None else normal.size,
                         float(threshold), review_threshold)
    if normal is None:
        report.status = "no calibration"
        report.alarms.append("the model file has no held-out normal scores (refit or recalibrate it)")
        return report
    if scores.size < min_window:
        report.status = "insufficient data"
        return report
    expected = _expected_share(normal, threshold)
    above = int(np.sum(scores > threshold))
    report.share_above_threshold, report.expected_share_above_threshold = above / scores.size, expected
    if review_threshold is not None:
        report.share_above_review = _share(scores, review_threshold)
        report.expected_share_above_review = _expected_share(normal, review_threshold)
    report.binomial_p_value = float(stats.binomtest(above, int(scores.size), min(expected, 1.0), alternative="greater").pvalue)
    ks = stats.ks_2samp(scores, normal.scores)
    report.ks_statistic, report.ks_p_value = float(ks.statistic), float(ks.pvalue)
    report.ewma_z = _ewma(normal_units(scores, normal.scores), EWMA_LAMBDA)
    report.ewma_limit = EWMA_SIGMAS * math.sqrt(EWMA_LAMBDA / (2.0 - EWMA_LAMBDA))
    report.run_above_median = _trailing_run(scores > float(np.median(normal.scores)))
    report.alarms = _alarms(report, alpha)
    report.status = "drift" if report.alarms else "ok"
    return report


def _expected_share(normal: NormalScoreModel, threshold: float) -> float:
    """The share of good parts above `threshold` calibration still supports: the upper end of the
    95 % interval of its held-out share (at least 1 / (n + 1))."""
    above = int(np.sum(normal.scores > threshold))
    return float(max(clopper_pearson(above, normal.size)[1], 1.0 / (normal.size + 1)))


def _alarms(report: DriftReport, alpha: float) -> list[str]:
    alarms = []
    if report.binomial_p_value is not None and report.binomial_p_value < alpha:
        alarms.append(f"{report.share_above_threshold:.1%} of the last {report.window} scores above the NOT OK "
                      f"threshold, calibration supports up to {report.expected_share_above_threshold:.2%} "
                      f"(binomial p = {report.binomial_p_value:.2g})")
    if report.ks_p_value is not None and report.ks_p_value < alpha:
        alarms.append(f"score distribution differs from calibration (KS D = {report.ks_statistic:.3f}, "
                      f"p = {report.ks_p_value:.2g})")
    if report.ewma_z is not None and report.ewma_limit is not None and report.ewma_z > report.ewma_limit:
        alarms.append(f"control chart: EWMA of z-scores {report.ewma_z:.2f} above its limit {report.ewma_limit:.2f}")
    if report.run_above_median is not None and report.run_above_median >= RUN_LENGTH:
        alarms.append(f"control chart: the last {report.run_above_median} scores all above the calibration median")
    return alarms


def normal_scores_json(normal: NormalScoreModel | None) -> str | None:
    """What the log's model_versions table keeps of a model's calibration (sorted scores)."""
    return None if normal is None else json.dumps([float(value) for value in normal.scores])


def normal_from_json(text: str | None) -> NormalScoreModel | None:
    return None if not text else NormalScoreModel(np.asarray(json.loads(text), dtype=np.float64))


def reports_from_store(store: Any, window: int = DEFAULT_WINDOW, model: str | None = None) -> list[DriftReport]:
    """A report per model version the log knows (offline: ``defectlens monitor --db URL``)."""
    reports = []
    for version in store.model_versions():
        if model is not None and version.name != model:
            continue
        recent = store.recent_scores(version.sha256, window)
        reports.append(drift_report(version.name, version.sha256, recent, normal_from_json(version.normal_scores),
                                    version.threshold, version.review_threshold))
    return reports
