"""PaDiM (Defard et al., ICPR 2021) with the covariance models of the PET-preform study.

fit:   patch features -> channel reduction to d (random subset or negated PCA)
       -> Gaussian(s) with Ledoit-Wolf shrinkage covariance:
          "full"   one mean and one covariance per feature-grid location (original PaDiM)
          "tied"   one mean per location, one covariance shared by all locations
          "global" one mean and one covariance for every patch of every location
score: Mahalanobis distance of each patch to its location's Gaussian.

The fit goes through additive statistics (`ops.moments.GaussianMoments`: counts, means,
centred scatter matrices and the fourth-power sums Ledoit-Wolf needs), so that statistics
of disjoint shards of the training images, merged, give the same model to float64 round-off
(`defectlens.distributed`):

    reduction_moments(features)   moments of the C-channel patches (negated PCA only)
    fit_projection(C, moments)    the (C, d) reduction
    gaussian_moments(features)    moments of the reduced patches, per location (or one group)
    fit_moments(moments)          means and shrunk precisions
"""

from __future__ import annotations

import torch

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod
from defectlens.ops.gaussian import mahalanobis, precision_from_covariance
from defectlens.ops.moments import GaussianMoments
from defectlens.ops.reduction import REDUCTIONS, fit_reduction

COVARIANCE_MODELS = ("full", "tied", "global")


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
        self.fit_projection(features.shape[1], self.reduction_moments(features))
        self.fit_moments(self.gaussian_moments(features))

    # ------------------------------------------------------------------ additive statistics
    @property
    def reduction_needs_data(self) -> bool:
        """Whether the channel reduction is learnt from the patches (negated PCA)."""
        return self.reduction == "negated_pca"

    def reduction_moments(self, features: torch.Tensor) -> GaussianMoments | None:
        """Moments (one group, C channels) of every patch of features (N, C, h, w), which the
        negated PCA is learnt from; None for reductions that need no data."""
        if not self.reduction_needs_data:
            return None
        patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        return GaussianMoments.of(patches.double().numpy()[:, None, :])

    def fit_projection(self, channels: int, moments: GaussianMoments | None) -> None:
        """Set the (C, d) reduction: the d eigenvectors of lowest variance of the patch
        covariance in ``moments`` (negated PCA, as `ops.reduction.fit_reduction` on those
        patches), or the data-free random subset / identity."""
        if moments is None:
            self.projection = fit_reduction(torch.empty(0, channels), self.reduction, self.reduced_dim, self.seed)
            return
        _, eigenvectors = torch.linalg.eigh(torch.from_numpy(moments.covariance()[0]))  # ascending eigenvalues
        self.projection = eigenvectors[:, : min(self.reduced_dim, channels)].float().contiguous()

    def gaussian_moments(self, features: torch.Tensor) -> GaussianMoments:
        """Moments of the reduced patches of features (N, C, h, w): one group per feature-grid
        location ("full", "tied"), or one group of every patch ("global")."""
        reduced = self._reduce(features).double().numpy()  # (N, L, d)
        if self.covariance == "global":
            reduced = reduced.reshape(-1, 1, reduced.shape[-1])
        return GaussianMoments.of(reduced)

    def fit_moments(self, moments: GaussianMoments) -> None:
        """Means and Ledoit-Wolf precisions from the moments of `gaussian_moments`."""
        if self.covariance == "full" and moments.count < 2:
            raise ConfigError("PaDiM with full covariance needs at least 2 training images")
        covariance = moments.pooled().ledoit_wolf() if self.covariance == "tied" else moments.ledoit_wolf()
        self.mean = torch.from_numpy(moments.mean).float()
        self.precision = torch.from_numpy(precision_from_covariance(covariance)).float()

    # ------------------------------------------------------------------ scoring and state
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
