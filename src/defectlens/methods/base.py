"""The protocol every method implements: fit on normal patch features, score patches.

A method sees only patch features (N, C, h, w) from the shared FeatureExtractor and returns
patch scores (N, h, w); upsampling, blurring, image scores and thresholds are shared steps
(`postprocess`, `thresholds`). Its learned state is a dict of tensors plus a JSON config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class AnomalyMethod(ABC):
    """Base class of PatchCore, PaDiM, ...; constructor arguments are its hyper-parameters."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, features: torch.Tensor) -> None:
        """Learn normality from features (N, C, h, w) of normal images."""

    @abstractmethod
    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly score per patch, (N, C, h, w) -> (N, h, w) float32; higher = more anomalous."""

    def image_scores(
        self, features: torch.Tensor, patch_scores: torch.Tensor, anomaly_maps: torch.Tensor
    ) -> torch.Tensor:
        """Image scores (N,) from features (N, C, h, w), patch scores (N, h, w) and blurred
        maps (N, H, W); by default the max of the map."""
        return anomaly_maps.flatten(1).amax(dim=1)

    def held_out_patch_scores(self, features: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor | None:
        """Patch scores (n, h, w) of the chosen training images as if each were unseen, or None.

        Methods that can compute this cheaply (PatchCore: leave the image's own patches out
        of the bank) override it; otherwise the detector calibrates by k-fold refitting.
        """
        return None

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-safe hyper-parameters; `type(self)(**config())` rebuilds an unfitted copy."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Learned state as named tensors."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned state saved by `state()`."""

    def unfitted_copy(self) -> "AnomalyMethod":
        """A fresh instance with the same hyper-parameters."""
        return type(self)(**self.config())
