"""PaDiM (Defard et al., ICPR 2021) with the covariance models of the PET-preform study.

fit:   patch features -> channel reduction to d (random subset or negated PCA)
       -> Gaussian(s) with Ledoit-Wolf shrinkage covariance:
          "full"   one mean and one covariance per feature-grid location (original PaDiM)
          "tied"   one mean per location, one covariance shared by all locations
          "global" one mean and one covariance for every patch of every location
score: Mahalanobis distance of each patch to its location's Gaussian.
"""

from __future__ import annotations

import numpy as np
import torch

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod
from defectlens.ops.gaussian import mahalanobis, precision_from_covariance, shrunk_covariance
from defectlens.ops.reduction import REDUCTIONS, fit_reduction

COVARIANCE_MODELS = ("full", "tied", "global")
_MAX_PCA_SAMPLES = 200_000


class Padim(AnomalyMethod):
    """Patch distribution modelling with full, tied or global Gaussian covariance.

    Args:
        covariance: "full", "tied" or "global".
        reduction: "random" (original) or "negated_pca" (lowest-variance components) or "none".
        reduced_dim: channels kept, d.
        seed: seeds the random channel subset.
    """

    name = "padim"
    option_choices = {"covariance": COVARIANCE_MODELS, "reduction": tuple(REDUCTIONS)}

    def __init__(
        self, covariance: str = "full", reduction: str = "random", reduced_dim: int = 100, seed: int = 0
    ) -> None:
        if covariance not in COVARIANCE_MODELS:
            raise ConfigError(f"unknown covariance model {covariance!r}; choose one of {', '.join(COVARIANCE_MODELS)}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"unknown feature reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        self.covariance = covariance
        self.reduction = reduction
        self.reduced_dim = reduced_dim
        self.seed = seed
        self.projection = torch.empty(0)
        self.mean = torch.empty(0)
        self.precision = torch.empty(0)

    def _reduce(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h*w, d) reduced patch features."""
        patches = features.flatten(2).transpose(1, 2)
        return patches @ self.projection

    def fit(self, features: torch.Tensor, image_index: torch.Tensor) -> None:
        """Gaussians of patch features (N, C, h, w) (tiles count as images)."""
        num_images, channels = features.shape[:2]
        patches = features.permute(0, 2, 3, 1).reshape(-1, channels)
        sample_generator = torch.Generator().manual_seed(self.seed)
        if patches.shape[0] > _MAX_PCA_SAMPLES:
            patches = patches[torch.randperm(patches.shape[0], generator=sample_generator)[:_MAX_PCA_SAMPLES]]
        self.projection = fit_reduction(patches, self.reduction, self.reduced_dim, self.seed)
        reduced = self._reduce(features).double().numpy()  # (N, L, d)
        if self.covariance == "global":
            mean = reduced.reshape(-1, reduced.shape[-1]).mean(axis=0, keepdims=True)  # (1, d)
            covariance = shrunk_covariance((reduced - mean).reshape(-1, reduced.shape[-1]))[None]
        else:
            mean = reduced.mean(axis=0)  # (L, d)
            centered = reduced - mean[None]
            if self.covariance == "tied":
                covariance = shrunk_covariance(centered.reshape(-1, reduced.shape[-1]))[None]
            else:
                if num_images < 2:
                    raise ConfigError("PaDiM with full covariance needs at least 2 training images")
                covariance = np.stack([shrunk_covariance(centered[:, location]) for location in range(mean.shape[0])])
        self.mean = torch.from_numpy(mean).float()
        self.precision = torch.from_numpy(precision_from_covariance(covariance)).float()

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        num_images, _, height, width = features.shape
        expected_locations = self.mean.shape[0]
        if self.covariance != "global" and expected_locations != height * width:
            raise ConfigError(
                f"PaDiM was fitted on a {expected_locations}-location feature grid but got {height}x{width}; "
                "use the image size it was fitted with"
            )
        distances = mahalanobis(self._reduce(features), self.mean, self.precision)
        return distances.view(num_images, height, width)

    def state(self) -> dict[str, torch.Tensor]:
        return {"projection": self.projection, "mean": self.mean, "precision": self.precision}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.projection = tensors["projection"].float()
        self.mean = tensors["mean"].float()
        self.precision = tensors["precision"].float()
