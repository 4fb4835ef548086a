"""Calibration: held-out scores of normal training images, and thresholds from them.

How held-out scores are made is the method's declared ``calibration``:

    leave_one_out   each of up to ``calibration_images`` training images is scored by the
                    fitted method without its own contribution (PatchCore: its bank rows)
    kfold           the training images are split into folds; an unfitted copy of the method
                    is fitted without each fold and scores it (cheap methods: PaDiM)
    split           a held-out split of the training images was never fitted on (trained
                    methods: one training run, never k retrainings); it is scored plainly

The default threshold needs normal images only: the (1 - target FPR) quantile of the held-out
scores. With a labelled validation set, the F1-optimal threshold is an option
(`Detector.calibrate(..., labels=...)`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

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


def calibration_indices(num_images: int, count: int, seed: int) -> torch.Tensor:
    """``min(count, num_images)`` image indices in [0, num_images), seeded, sorted."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_images, generator=generator)[: min(num_images, count)].sort().values


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
        calibration_images: most training images scored held-out (leave_one_out, kfold).
        calibration_folds: folds of "kfold".
        seed: chooses the calibration images.
    """

    def __init__(
        self, chain: MapChain, preparation: InputPreparation, calibration_images: int, calibration_folds: int, seed: int
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
