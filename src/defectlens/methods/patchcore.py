"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

fit:   all normal patch features -> greedy k-center coreset (ratio of the patches) = memory bank
score: patch score = distance to the nearest bank patch (mean over k nearest if k > 1);
       image score = max of the anomaly map, or with ``reweight=True`` the paper's Eq. 7:
       s = (1 - exp(d*) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from defectlens.methods.base import AnomalyMethod
from defectlens.ops.coreset import coreset_size, greedy_coreset
from defectlens.ops.knn import NearestNeighbours


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N * h * w, C), patches of image 0 first."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class PatchCore(AnomalyMethod):
    """Memory bank of a greedy coreset of normal patches, scored by nearest-neighbour distance.

    Args:
        coreset_ratio: fraction of training patches kept (paper: 0.01-0.1; default 0.1).
        projection_dim: random-projection dimension used while selecting the coreset.
        num_neighbors: k, patches' scores are the mean distance to their k nearest bank patches.
        reweight: use the paper's image-score reweighting instead of the max of the map.
        reweight_neighbors: b, the bank neighbourhood size of that reweighting.
        chunk_size: most query x bank distances held at once during search.
        seed: seeds the projection and the first coreset element.
    """

    name = "patchcore"

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        chunk_size: int = 2**22,
        seed: int = 0,
    ) -> None:
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.chunk_size = chunk_size
        self.seed = seed
        self.memory_bank = torch.empty(0)
        self.bank_image_index = torch.empty(0, dtype=torch.int64)
        self._search: NearestNeighbours | None = None

    def config(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "projection_dim": self.projection_dim,
            "num_neighbors": self.num_neighbors,
            "reweight": self.reweight,
            "reweight_neighbors": self.reweight_neighbors,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
        }

    def fit(self, features: torch.Tensor, image_index: torch.Tensor | None = None) -> None:
        """Greedy coreset of features (N, C, h, w); ``image_index`` (N,): the training image each
        sample came from (tiles of one image share it; default: sample i is image i)."""
        patches = flatten_patches(features)
        patches_per_image = features.shape[2] * features.shape[3]
        selected = greedy_coreset(
            patches, coreset_size(patches.shape[0], self.coreset_ratio), self.projection_dim, self.seed
        )
        index = torch.from_numpy(np.sort(selected))
        sample = index // patches_per_image
        self.set_bank(patches[index].contiguous(), sample if image_index is None else image_index.to(torch.int64)[sample])

    def set_bank(self, memory_bank: torch.Tensor, bank_image_index: torch.Tensor) -> None:
        """Install a memory bank (M, C) and the training image each row came from (M,)."""
        self.memory_bank = memory_bank.float().contiguous()
        self.bank_image_index = bank_image_index.to(torch.int64)
        self._search = NearestNeighbours(self.memory_bank, self.chunk_size)

    @property
    def search(self) -> NearestNeighbours:
        if self._search is None:
            self._search = NearestNeighbours(self.memory_bank, self.chunk_size)
        return self._search

    def _patch_distances(self, features: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-bank distances (N, h, w) (mean over the k nearest)."""
        num_images, _, height, width = features.shape
        distances, _ = self.search.query(flatten_patches(features), self.num_neighbors, excluded)
        scores = distances.mean(dim=1) if self.num_neighbors > 1 else distances[:, 0]
        return scores.view(num_images, height, width)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self._patch_distances(features)

    def image_scores(
        self, features: torch.Tensor, patch_scores: torch.Tensor, anomaly_maps: torch.Tensor
    ) -> torch.Tensor:
        if not self.reweight:
            return super().image_scores(features, patch_scores, anomaly_maps)
        return self.reweighted_scores(features, patch_scores)

    def reweighted_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7 for each image: max patch score scaled by the softmin-style weight."""
        flat_scores = patch_scores.flatten(1)
        worst = flat_scores.argmax(dim=1)  # (N,)
        patches = features.flatten(2).transpose(1, 2)  # (N, h*w, C)
        worst_patch = patches[torch.arange(patches.shape[0]), worst]  # (N, C)
        _, nearest = self.search.query(worst_patch, 1)
        worst_nearest = nearest[:, 0]  # (N,)
        bank_neighbours = min(self.reweight_neighbors, self.memory_bank.shape[0])
        _, support = self.search.query(self.memory_bank[worst_nearest], bank_neighbours)  # (N, b)
        support_distances = torch.linalg.vector_norm(
            self.memory_bank[support] - worst_patch.unsqueeze(1), dim=2
        )  # (N, b)
        max_scores = flat_scores.max(dim=1).values
        # 1 - softmax weight of the nearest bank patch; computed stably with logsumexp.
        weight = 1.0 - torch.exp(max_scores - torch.logsumexp(support_distances, dim=1))
        return weight * max_scores

    def held_out_patch_scores(self, features: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
        """Leave-one-image-out: score each chosen training image without its own bank patches."""
        return self.leave_one_out_patch_scores(features[image_indices], image_indices)

    def leave_one_out_patch_scores(self, features: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
        """Patch scores (n, h, w) of training samples (n, C, h, w) - images or tiles - each
        scored without the bank patches of the training image it came from, image_indices (n,)."""
        indices = image_indices.tolist()
        scores = []
        start = 0
        while start < len(indices):
            stop = start + 1
            while stop < len(indices) and indices[stop] == indices[start]:
                stop += 1  # consecutive samples of one image share the exclusion
            excluded = self.bank_image_index == indices[start]
            scores.append(self._patch_distances(features[start:stop], excluded))
            start = stop
        return torch.cat(scores) if scores else features.new_empty((0, *features.shape[2:]))

    def state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank, "bank_image_index": self.bank_image_index}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_bank(tensors["memory_bank"], tensors["bank_image_index"])
