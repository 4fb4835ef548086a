"""A memory bank of normal patch features and its nearest-neighbour scoring.

Shared by PatchCore (greedy coreset) and Sequential PatchCore (streaming coreset): they differ
in how the bank is chosen, not in how it scores.

patch score   = distance to the nearest bank vector (mean over the k nearest)
image score   = the max of the map, or the PatchCore paper's Eq. 7 (``reweight``):
                s = (1 - exp(d*) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*
leave one out = a training sample scored without the bank vectors of its own image
"""

from __future__ import annotations

import torch

from defectlens.ops.knn import NearestNeighbours


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N * h * w, C), patches of image 0 first."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class MemoryBankScorer:
    """Nearest-neighbour scoring against a bank (M, C) that remembers each row's image.

    Args:
        num_neighbors: k, a patch's score is its mean distance to the k nearest bank rows.
        reweight: image score by the paper's reweighting instead of the max of the map.
        reweight_neighbors: b, the bank neighbourhood size of that reweighting.
        search_chunk_distances: most query x bank distances held at once while searching.
    """

    def __init__(
        self, num_neighbors: int = 1, reweight: bool = False, reweight_neighbors: int = 9,
        search_chunk_distances: int = 2**22,
    ) -> None:
        self.num_neighbors = int(num_neighbors)
        self.reweight = bool(reweight)
        self.reweight_neighbors = int(reweight_neighbors)
        self.search_chunk_distances = int(search_chunk_distances)
        self.memory_bank = torch.empty(0)
        self.bank_image_index = torch.empty(0, dtype=torch.int64)
        self._search: NearestNeighbours | None = None

    def set_bank(self, memory_bank: torch.Tensor, bank_image_index: torch.Tensor) -> None:
        """Install a bank (M, C) and the training image each row came from (M,) int64."""
        self.memory_bank = memory_bank.float().contiguous()
        self.bank_image_index = bank_image_index.to(torch.int64)
        self._search = NearestNeighbours(self.memory_bank, self.search_chunk_distances)

    @property
    def search(self) -> NearestNeighbours:
        if self._search is None:
            self._search = NearestNeighbours(self.memory_bank, self.search_chunk_distances)
        return self._search

    def patch_scores(self, features: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-bank distances (N, h, w) of features (N, C, h, w), skipping ``excluded`` rows."""
        num_images, _, height, width = features.shape
        distances, _ = self.search.query(flatten_patches(features), self.num_neighbors, excluded)
        scores = distances.mean(dim=1) if self.num_neighbors > 1 else distances[:, 0]
        return scores.view(num_images, height, width)

    def leave_one_out_patch_scores(self, features: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Patch scores (n, h, w) of training samples (n, C, h, w) - images or tiles - each
        scored without the bank rows of the training image it came from (image_index (n,))."""
        indices = image_index.tolist()
        scores = []
        start = 0
        while start < len(indices):
            stop = start + 1
            while stop < len(indices) and indices[stop] == indices[start]:
                stop += 1  # consecutive samples of one image share the exclusion
            excluded = self.bank_image_index == indices[start]
            scores.append(self.patch_scores(features[start:stop], excluded))
            start = stop
        return torch.cat(scores) if scores else features.new_empty((0, *features.shape[2:]))

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """The reweighted image scores (N,) when ``reweight``, else None (max of the map)."""
        return self.reweighted_scores(features, patch_scores) if self.reweight else None

    def reweighted_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7 for each image: max patch score scaled by the softmin-style weight."""
        flat_scores = patch_scores.flatten(1)
        worst = flat_scores.argmax(dim=1)  # (N,)
        patches = features.flatten(2).transpose(1, 2)  # (N, h*w, C)
        worst_patch = patches[torch.arange(patches.shape[0]), worst]  # (N, C)
        _, nearest = self.search.query(worst_patch, 1)
        bank_neighbours = min(self.reweight_neighbors, self.memory_bank.shape[0])
        _, support = self.search.query(self.memory_bank[nearest[:, 0]], bank_neighbours)  # (N, b)
        support_distances = torch.linalg.vector_norm(self.memory_bank[support] - worst_patch.unsqueeze(1), dim=2)
        max_scores = flat_scores.max(dim=1).values
        # 1 - softmax weight of the nearest bank patch; computed stably with logsumexp.
        weight = 1.0 - torch.exp(max_scores - torch.logsumexp(support_distances, dim=1))
        return weight * max_scores

    def state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank, "bank_image_index": self.bank_image_index}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_bank(tensors["memory_bank"], tensors["bank_image_index"])
