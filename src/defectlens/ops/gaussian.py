"""Gaussian models of patch features: shrinkage covariance and Mahalanobis distances."""

from __future__ import annotations

import numpy as np
import torch


def shrunk_covariance(centered: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage covariance (D, D) of already centred samples (n, D), float64."""
    from sklearn.covariance import ledoit_wolf  # imported here: sklearn costs ~1 s at start-up

    covariance, _ = ledoit_wolf(np.asarray(centered, dtype=np.float64), assume_centered=True)
    return covariance


def precision_from_covariance(covariance: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite covariance (..., D, D) via Cholesky, float64.

    Done in numpy/LAPACK (not a batched torch inverse, which some MKL builds break when the
    thread count is changed); symmetrized to remove rounding asymmetry.
    """
    covariance = np.asarray(covariance, dtype=np.float64)
    identity = np.broadcast_to(np.eye(covariance.shape[-1]), covariance.shape)
    cholesky = np.linalg.cholesky(covariance)
    inverse_cholesky = np.linalg.solve(cholesky, identity)
    precision = np.swapaxes(inverse_cholesky, -1, -2) @ inverse_cholesky
    return 0.5 * (precision + np.swapaxes(precision, -1, -2))


def mahalanobis(samples: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances sqrt((x - mu)^T P (x - mu)).

    Args:
        samples: (N, L, D) features at L locations.
        mean: (L, D) per-location mean or (1, D) shared mean.
        precision: (L, D, D) per-location or (1, D, D) shared precision matrix.

    Returns:
        (N, L) float32 distances.
    """
    centered = samples - mean.unsqueeze(0)  # (N, L, D)
    if precision.shape[0] == 1:
        projected = centered @ precision[0]
    else:
        projected = torch.einsum("nld,lde->nle", centered, precision)
    squared = (projected * centered).sum(dim=-1)
    return squared.clamp_min_(0.0).sqrt_()
