"""Calibration: held-out scores of normal training images, and thresholds from them.

How held-out scores are made is the method's declared ``calibration``:

    leave_one_out   each of up to ``calibration_images`` training images is scored by the
                    fitted method without its own contribution (PatchCore: its bank rows)
    kfold           the training images are split into folds; an unfitted copy of the method
                    is fitted without each fold and scores it (cheap methods: PaDiM)
    split           a held-out split of the training images was never fitted on (trained
                    methods: one training run, never k retrainings); it is scored plainly

Thresholds need normal images only and come with their uncertainty (`NormalScoreModel`):

    conformal   the ceil((n + 1)(1 - a))-th smallest of n held-out scores: a new normal image
                scores above it with probability <= a (exchangeability), for a >= 1 / (n + 1)
    tail        below what n images support (a < 1 / (n + 1)) a generalized Pareto tail fitted
                to the top scores (peaks over threshold, scipy) extrapolates; the threshold is
                then uncertain and the fit says so (a warning, not a silent maximum)
    quantile    the (1 - a) inverted-CDF quantile of the held-out scores (defectlens 0.1's rule)

Every threshold states the estimated FPR at it, a 95 % Clopper-Pearson interval from the
held-out count above it, and the smallest FPR the calibration set supports. Scores are also
given as calibrated p-values (conformal, tail-smoothed) and normal-quantile units
z = Phi^-1(1 - p): z = 3 is as rare among good parts as 3 sigma. With a labelled validation
set, the F1-optimal threshold is an option (`Detector.calibrate(..., labels=...)`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from scipy import stats

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod
from defectlens.metrics import f1_max, normal_quantile_threshold
from defectlens.postprocess import MapChain
from defectlens.preprocess import InputPreparation
from defectlens.samples import Batch, FitData, rows_where

logger = logging.getLogger(__name__)
ProgressCallback = Callable[[str, int, int], None]


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


THRESHOLD_MODELS = ("tail", "conformal", "quantile")
TAIL_MIN_POINTS = 8
"""Fewest top scores a generalized Pareto tail is fitted to."""
TAIL_FRACTION = 0.2
"""Fraction of the held-out scores (at least TAIL_MIN_POINTS) that form the tail."""


def clopper_pearson(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval of a proportion ``count / total``."""
    if total <= 0:
        return 0.0, 1.0
    interval = stats.binomtest(int(count), int(total)).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class ThresholdEstimate:
    """A threshold for a target false-positive rate and what is known about it.

    Attributes:
        target_fpr: the FPR asked for.
        threshold: images scoring above it are flagged.
        model: "conformal", "tail" or "quantile" (which rule set it).
        estimated_fpr: the estimated P(a normal image scores above the threshold): the tail
            model's where it applies, else the held-out fraction above it.
        fpr_interval: 95 % Clopper-Pearson interval of that FPR from the held-out count.
        held_out_above: held-out normal scores above the threshold.
        num_scores: held-out normal scores it was set from.
        supported_min_fpr: 1 / (n + 1), the smallest FPR n scores support without extrapolation.
        extrapolated: the target was below supported_min_fpr (the tail model extrapolated).
        warning: what the user must know, or None.
    """

    target_fpr: float
    threshold: float
    model: str
    estimated_fpr: float
    fpr_interval: tuple[float, float]
    held_out_above: int
    num_scores: int
    supported_min_fpr: float
    extrapolated: bool
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["fpr_interval"] = list(self.fpr_interval)
        return document


class NormalScoreModel:
    """The distribution of held-out normal image scores: thresholds, p-values, z units.

    Args:
        scores: held-out normal image scores (any order; NaN refused).
    """

    def __init__(self, scores: np.ndarray) -> None:
        ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if ordered.size == 0:
            raise ConfigError("cannot calibrate from zero normal scores")
        if not np.isfinite(ordered).all():
            raise ConfigError("held-out normal scores contain NaN or infinity")
        self.scores = ordered
        self.tail = self._fit_tail(ordered)

    @property
    def size(self) -> int:
        return int(self.scores.size)

    @staticmethod
    def _fit_tail(ordered: np.ndarray) -> dict[str, float] | None:
        """Generalized Pareto fit to the excesses over the (k + 1)-th largest score, or None
        when there are too few scores or no spread. The shape is kept in [0, 0.5]: a negative
        shape (a finite end point, which small samples often suggest) would put extrapolated
        thresholds just above the largest score seen - too few false alarms promised."""
        count = max(TAIL_MIN_POINTS, math.ceil(TAIL_FRACTION * ordered.size))
        if ordered.size <= count:
            return None
        start = float(ordered[-count - 1])
        excesses = ordered[-count:] - start
        if float(excesses.max()) <= 0.0:
            return None
        shape, _, scale = stats.genpareto.fit(excesses, floc=0.0)
        if not 0.0 <= shape <= 0.5:
            shape = float(np.clip(shape, 0.0, 0.5))
            scale = stats.genpareto.fit(excesses, floc=0.0, f0=shape)[2]
        return {"start": start, "count": float(count), "shape": float(shape), "scale": float(scale)}

    def _tail_survival(self, score: float) -> float | None:
        """P(normal score > score) by the tail model, for scores above its start; else None."""
        if self.tail is None or score < self.tail["start"]:
            return None
        fraction = self.tail["count"] / self.size
        return float(fraction * stats.genpareto.sf(score - self.tail["start"], self.tail["shape"], scale=self.tail["scale"]))

    def _tail_quantile(self, fpr: float) -> float:
        assert self.tail is not None
        fraction = self.tail["count"] / self.size
        return float(self.tail["start"] + stats.genpareto.isf(fpr / fraction, self.tail["shape"], scale=self.tail["scale"]))

    def p_value(self, score: float) -> float:
        """Calibrated p-value: conformal (1 + #held-out >= score) / (n + 1), smoothed by the
        tail model beyond the held-out maximum (never above the conformal value)."""
        above = int(self.size - np.searchsorted(self.scores, score, side="left"))
        conformal = (1 + above) / (self.size + 1)
        tail = self._tail_survival(score) if above == 0 else None
        return float(min(conformal, tail)) if tail is not None else float(conformal)

    def z_score(self, score: float) -> float:
        """Normal-quantile units: Phi^-1(1 - p); capped at 40 (p below float precision)."""
        return float(min(40.0, stats.norm.isf(max(self.p_value(score), 1e-300))))

    def threshold(self, target_fpr: float, model: str = "tail") -> ThresholdEstimate:
        """The threshold for ``target_fpr`` by ``model`` ("tail", "conformal", "quantile")."""
        if not 0.0 <= target_fpr < 1.0:
            raise ConfigError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
        if model not in THRESHOLD_MODELS:
            raise ConfigError(f"unknown threshold model {model!r}; choose one of {', '.join(THRESHOLD_MODELS)}")
        n = self.size
        supported = 1.0 / (n + 1)
        extrapolated = target_fpr < supported
        rule = model
        if model == "quantile":
            value = float(normal_quantile_threshold(self.scores, 1.0 - target_fpr))
        elif not extrapolated:
            value, rule = float(self.scores[math.ceil((n + 1) * (1.0 - target_fpr)) - 1]), "conformal"
        elif model == "tail" and self.tail is not None and target_fpr > 0:
            value = max(self._tail_quantile(target_fpr), float(self.scores[-1]))
        else:
            value, rule = float(self.scores[-1]), "conformal"
        above = int(self.size - np.searchsorted(self.scores, value, side="right"))
        tail = self._tail_survival(value)
        estimate = tail if tail is not None and rule == "tail" else above / n
        warning = None
        if extrapolated:
            how = "extrapolated by the tail model" if rule == "tail" else "the largest held-out score"
            warning = (
                f"target FPR {target_fpr:g} is below what {n} held-out normal images support (1/{n + 1} = "
                f"{supported:.3g}): the threshold is {how} and its FPR is uncertain (95 % interval "
                f"{clopper_pearson(above, n)[0]:.3g}-{clopper_pearson(above, n)[1]:.3g}); add normal images "
                "(fit --validation DIR) for a reliable threshold"
            )
        return ThresholdEstimate(
            target_fpr, value, rule, float(estimate), clopper_pearson(above, n), above, n, supported, extrapolated, warning
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the sorted scores and the tail fit (the model file keeps them)."""
        return {"scores": self.scores.tolist(), "tail": self.tail}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> "NormalScoreModel":
        return cls(np.asarray(document["scores"], dtype=np.float64))


@dataclass
class CalibratedThresholds:
    """The NOT OK threshold, the optional review threshold, and the score model they came from."""

    not_ok: ThresholdEstimate
    review: ThresholdEstimate | None
    normal: NormalScoreModel

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, target_fpr: float, review_fpr: float | None = None, model: str = "tail"
    ) -> "CalibratedThresholds":
        """Thresholds at ``target_fpr`` (NOT OK) and ``review_fpr`` (REVIEW, > target_fpr);
        warnings (too few images for the target) are logged and kept in the summary."""
        if review_fpr is not None and review_fpr <= target_fpr:
            raise ConfigError(f"review_fpr ({review_fpr}) must be larger than target_fpr ({target_fpr})")
        normal = NormalScoreModel(scores)
        not_ok = normal.threshold(target_fpr, model)
        review = normal.threshold(review_fpr, model) if review_fpr is not None else None
        for estimate in (not_ok, review):
            if estimate is not None and estimate.warning:
                logger.warning(estimate.warning)
        return cls(not_ok, review, normal)

    def summary(self) -> dict[str, Any]:
        """JSON-safe: the scores' summary, each threshold's estimate and the warnings."""
        return {
            **score_summary(self.normal.scores),
            "threshold": self.not_ok.to_dict(),
            "review_threshold": None if self.review is None else self.review.to_dict(),
            "tail": self.normal.tail,
            "warnings": [estimate.warning for estimate in (self.not_ok, self.review) if estimate and estimate.warning],
        }


def threshold_f1_optimal(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximizing F1 on a labelled validation set (needs both classes)."""
    label_values = set(np.asarray(labels).astype(int).tolist())
    best_f1, threshold = f1_max(np.asarray(scores), np.asarray(labels)) if label_values == {0, 1} else (None, None)
    if best_f1 is None or threshold is None or not np.isfinite(threshold):
        raise ConfigError("the F1-optimal threshold needs good and defective validation images")
    return float(threshold)


def score_summary(scores: np.ndarray) -> dict[str, float | int]:
    """Count, mean, std, min and max of calibration scores (JSON-safe)."""
    return {
        "num_scores": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
    }


def calibration_indices(num_images: int, count: int | None, seed: int) -> torch.Tensor:
    """``min(count, num_images)`` image indices in [0, num_images) (all when count is None),
    seeded, sorted."""
    generator = torch.Generator().manual_seed(seed)
    chosen = num_images if count is None else min(num_images, count)
    return torch.randperm(num_images, generator=generator)[:chosen].sort().values


def image_scores(
    method: AnomalyMethod, chain: MapChain, preparation: InputPreparation, scored: Iterable[tuple[Batch, torch.Tensor]]
) -> np.ndarray:
    """Image scores (n,) float64 of batches and their patch scores, through the one chain."""
    results = preparation.untile(chain.apply(method, scored), with_maps=False)
    return np.asarray([result.score for result in results], dtype=np.float64)


class Calibrator:
    """Held-out normal scores of a fitted method, by its declared calibration kind.

    Args:
        chain, preparation: the detector's post-processing and tiling wrap.
        calibration_images: most training images scored held-out (leave_one_out, kfold); None: all.
        calibration_folds: folds of "kfold".
        seed: chooses the calibration images.
    """

    def __init__(
        self, chain: MapChain, preparation: InputPreparation, calibration_images: int | None, calibration_folds: int,
        seed: int,
    ) -> None:
        self.chain = chain
        self.preparation = preparation
        self.calibration_images = calibration_images
        self.calibration_folds = calibration_folds
        self.seed = seed

    def held_out_scores(self, method: AnomalyMethod, data: FitData, progress: ProgressCallback | None = None) -> np.ndarray:
        """Image scores of normal training images as if unseen (float64)."""
        own = data.num_images < 2 if method.calibration != "split" else not data.held_out_indices
        if own:
            logger.warning("too few training images to hold any out: the threshold comes from their own scores")
            everything = torch.tensor(data.fit_indices)
            return self._scores(method, ((batch, method.patch_scores(batch.x)) for batch in data.images(everything)))
        if method.calibration == "split":
            stage = "calibrating threshold" if progress else None
            return self._scores(method, ((batch, method.patch_scores(batch.x)) for batch in data.held_out(stage)))
        chosen = torch.tensor(data.fit_indices)[calibration_indices(data.num_images, self.calibration_images, self.seed)]
        if method.calibration == "leave_one_out":
            batches = data.images(chosen)
            return self._scores(method, ((batch, method.held_out_patch_scores(batch.x, batch.image_index)) for batch in batches))
        return np.concatenate(list(self._kfold(method, data.joined(), chosen, data.num_images, progress)))

    def _kfold(
        self, method: AnomalyMethod, joined: Batch, chosen: torch.Tensor, num_images: int,
        progress: ProgressCallback | None,
    ) -> Iterator[np.ndarray]:
        folds = min(self.calibration_folds, num_images)
        fold_of_sample = joined.image_index % folds
        is_chosen = torch.isin(joined.image_index, chosen)
        for fold in range(folds):
            held_rows = rows_where((fold_of_sample == fold) & is_chosen)
            if held_rows.numel() == 0:
                continue
            fold_method = method.unfitted_copy()
            training = joined.select(rows_where(fold_of_sample != fold))
            fold_method.fit(training.x, training.image_index)
            held = joined.select(held_rows)
            yield self._scores(fold_method, [(held, fold_method.patch_scores(held.x))])
            if progress:
                progress("calibrating threshold", fold + 1, folds)

    def _scores(self, method: AnomalyMethod, scored: Iterable[tuple[Batch, torch.Tensor]]) -> np.ndarray:
        return image_scores(method, self.chain, self.preparation, scored)
