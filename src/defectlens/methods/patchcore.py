"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

fit:   all normal patch features -> greedy k-center coreset (ratio of the patches) = memory bank
score: patch score = distance to the nearest bank patch (mean over k nearest if k > 1);
       image score = max of the anomaly map, or with ``reweight=True`` the paper's Eq. 7
       (`ops.memory_bank`); calibration leaves each training image's own patches out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from defectlens.methods.base import AnomalyMethod
from defectlens.ops.coreset import coreset_size, greedy_coreset
from defectlens.ops.memory_bank import MemoryBankScorer, flatten_patches


class MemoryBankMethod(AnomalyMethod):
    """What PatchCore and Sequential PatchCore share: a `MemoryBankScorer` they hold and its
    scoring options; subclasses decide how the bank is chosen."""

    calibration = "leave_one_out"
    renamed_options = {"chunk_size": "search_chunk_distances"}

    def __init__(
        self, num_neighbors: int = 1, reweight: bool = False, reweight_neighbors: int = 9,
        search_chunk_distances: int = 2**22,
    ) -> None:
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.search_chunk_distances = search_chunk_distances
        self.bank = MemoryBankScorer(num_neighbors, reweight, reweight_neighbors, search_chunk_distances)

    @property
    def memory_bank(self) -> torch.Tensor:
        """(M, C) bank vectors."""
        return self.bank.memory_bank

    @property
    def bank_image_index(self) -> torch.Tensor:
        """(M,) int64: the training image each bank vector came from (-1: from an initial model)."""
        return self.bank.bank_image_index

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank.patch_scores(x)

    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        return self.bank.image_scores(x, patch_scores)

    def held_out_patch_scores(self, x: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        return self.bank.leave_one_out_patch_scores(x, image_index)

    def state(self) -> dict[str, torch.Tensor]:
        return self.bank.state()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bank.load_state(tensors)


class PatchCore(MemoryBankMethod):
    """Memory bank of a greedy coreset of normal patches, scored by nearest-neighbour distance.

    Args:
        coreset_ratio: fraction of training patches kept (the paper uses 0.01-0.1).
        projection_dim: random-projection dimension used while selecting the coreset.
        num_neighbors: k, patches' scores are the mean distance to their k nearest bank patches.
        reweight: use the paper's image-score reweighting instead of the max of the map.
        reweight_neighbors: b, the bank neighbourhood size of that reweighting.
        search_chunk_distances: most query x bank distances held at once during search.
        seed: seeds the projection and the first coreset element.
    """

    name = "patchcore"

    def __init__(
        self, coreset_ratio: float = 0.1, projection_dim: int = 128, seed: int = 0, **scoring: Any
    ) -> None:
        super().__init__(**scoring)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed

    def fit(self, features: torch.Tensor, image_index: torch.Tensor) -> None:
        """Greedy coreset of the patches of features (N, C, h, w)."""
        patches = flatten_patches(features)
        patches_per_sample = features.shape[2] * features.shape[3]
        selected = greedy_coreset(
            patches, coreset_size(patches.shape[0], self.coreset_ratio), self.projection_dim, self.seed
        )
        index = torch.from_numpy(np.sort(selected))
        self.bank.set_bank(patches[index].contiguous(), image_index.to(torch.int64)[index // patches_per_sample])
