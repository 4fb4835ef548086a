"""Feature-channel reduction for Gaussian methods (PaDiM): random subset or negated PCA."""

from __future__ import annotations

import numpy as np
import torch

from defectlens.errors import ConfigError

REDUCTIONS = ("random", "negated_pca", "none")


def fit_reduction(features: torch.Tensor, method: str, dim: int, seed: int) -> torch.Tensor:
    """A (C, d) projection matrix that maps C-channel patch features to d channels.

    Args:
        features: (n, C) training patch features (a sample is enough for PCA).
        method: "random" (a seeded random subset of channels, the original PaDiM),
            "negated_pca" (the d principal components of *lowest* variance: anomalies show
            up where normal data does not vary, Rippel et al. / the PET-preform study),
            or "none".
        dim: output channels d (clipped to C).
    """
    channels = features.shape[1]
    dim = min(dim, channels)
    if method == "none" or dim == channels and method == "random":
        return torch.eye(channels)
    if method == "random":
        chosen = np.sort(np.random.default_rng(seed).choice(channels, size=dim, replace=False))
        projection = torch.zeros(channels, dim)
        projection[torch.as_tensor(chosen), torch.arange(dim)] = 1.0
        return projection
    if method == "negated_pca":
        samples = features.double()
        centered = samples - samples.mean(dim=0, keepdim=True)
        covariance = centered.T @ centered / max(1, samples.shape[0] - 1)
        _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        return eigenvectors[:, :dim].float().contiguous()
    raise ConfigError(f"unknown feature reduction {method!r}; choose one of {', '.join(REDUCTIONS)}")
