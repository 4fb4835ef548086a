"""The exported computation as one traceable torch module: model input -> anomaly map and score.

    images (N, 3, H, W) float32 RGB in [0, 1] at the model's image size
      -> (x - mean) / std -> backbone layers -> 3x3 local average -> bilinear to the finest grid
      -> method scores (N, h, w)      (PatchCore: exact nearest bank row; PaDiM: Mahalanobis)
      -> pooling -> bilinear upsampling -> Gaussian blur      (``postprocess``, the same code)
      -> anomaly_map (N, H, W) and score (N,)   (max of the map, or PatchCore's reweighting)

It calls the library's own pieces (the BatchNorm-folded backbone of ``FeatureExtractor``,
``postprocess``, ``ops.gaussian.mahalanobis``) so the graph cannot drift from ``Detector``;
only the nearest-neighbour search is written out differently, as ONNX has no pruned index:
the nearest row by ``|b|^2 - 2 q.b`` (one matrix product), then its distance recomputed
directly as ``sqrt(sum (q - b)^2)`` - the formula the torch search reports - so scores agree
to float32 round-off (rows can differ only where two rows tie to ~1e-7 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from defectlens.errors import ConfigError
from defectlens.ops.gaussian import mahalanobis
from defectlens.postprocess import anomaly_maps, pool_patch_scores

EXPORTABLE_METHODS = ("patchcore", "sequential_patchcore", "padim")


class FeatureGraph(nn.Module):
    """``FeatureExtractor.forward`` without its chunking and in-place writes (traceable)."""

    def __init__(self, extractor, image_size: tuple[int, int]) -> None:
        super().__init__()
        # the extractor's own aggregation and resize steps are traced (kept off the module tree,
        # so its unfolded backbone copy is not exported)
        object.__setattr__(self, "extractor", extractor)
        self.network = extractor._feature_network
        self.layer_names = [layer.name for layer in extractor.layers]
        self.grid = extractor.feature_grid(*image_size)
        self.register_buffer("mean", extractor._mean.detach().clone())
        self.register_buffer("std", extractor._std.detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.network.forward_features((images - self.mean) / self.std, self.layer_names)
        parts = []
        for name in self.layer_names:
            parts.append(self.extractor._resize(self.extractor._aggregate(maps[name]), tuple(self.grid)))
        return torch.cat(parts, dim=1)


class MemoryBankGraph(nn.Module):
    """PatchCore / Sequential PatchCore scoring: mean distance to the k nearest bank rows, and
    optionally the paper's reweighted image score (Eq. 7) with each bank row's b nearest bank
    rows precomputed at export time (exactly what the torch scorer finds for it)."""

    def __init__(self, scorer) -> None:
        super().__init__()
        bank = scorer.memory_bank.float().contiguous()
        self.k = min(int(scorer.num_neighbors), bank.shape[0])
        self.reweight = bool(scorer.reweight)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_t", bank.T.contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        if self.reweight:
            neighbours = min(int(scorer.reweight_neighbors), bank.shape[0])
            _, support = scorer.search.query(bank, neighbours)
            self.register_buffer("support", support)

    def nearest(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries (N, L, C), distances (N, L, k) to the nearest rows, their indices (N, L, k))."""
        queries = features.flatten(2).transpose(1, 2)
        ranking = self.bank_sq - 2.0 * torch.matmul(queries, self.bank_t)  # (N, L, M)
        if self.k == 1:
            index = ranking.argmin(dim=2, keepdim=True)
        else:
            index = torch.topk(ranking, self.k, dim=2, largest=False).indices
        rows = self.bank[index]  # (N, L, k, C)
        distances = (queries.unsqueeze(2) - rows).pow(2).sum(-1).sqrt()
        return queries, distances, index

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Patch scores (N, h, w) of features (N, C, h, w), with what the image score needs."""
        queries, distances, index = self.nearest(features)
        scores = distances.mean(dim=2) if self.k > 1 else distances[..., 0]
        return scores.view(features.shape[0], features.shape[2], features.shape[3]), queries, index

    def image_scores(self, queries: torch.Tensor, index: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor | None:
        """Reweighted image scores (N,) from pooled patch scores (N, h, w); None: max of the map."""
        if not self.reweight:
            return None
        flat = pooled.flatten(1)
        max_scores, worst = flat.max(dim=1)
        batch = torch.arange(flat.shape[0])
        worst_patch = queries[batch, worst]  # (N, C)
        nearest = index[batch, worst, 0]  # (N,): the nearest bank row of the worst patch
        support_rows = self.bank[self.support[nearest]]  # (N, b, C)
        support_distances = (support_rows - worst_patch.unsqueeze(1)).pow(2).sum(-1).sqrt()
        # logsumexp written out (shifted by its max): OpenVINO's ReduceLogSumExp is less exact
        shift = support_distances.amax(dim=1)
        log_sum = shift + torch.log(torch.exp(support_distances - shift.unsqueeze(1)).sum(dim=1))
        weight = 1.0 - torch.exp(max_scores - log_sum)
        return weight * max_scores


class PadimGraph(nn.Module):
    """PaDiM scoring: Mahalanobis distance of the reduced patch to its location's Gaussian."""

    def __init__(self, method) -> None:
        super().__init__()
        self.register_buffer("projection", method.projection.float().contiguous())
        self.register_buffer("mean", method.mean.float().contiguous())
        self.register_buffer("precision", method.precision.float().contiguous())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        reduced = features.flatten(2).transpose(1, 2) @ self.projection
        distances = mahalanobis(reduced, self.mean, self.precision)
        return distances.view(features.shape[0], features.shape[2], features.shape[3]), None, None

    def image_scores(self, queries: None, index: None, pooled: torch.Tensor) -> None:
        return None


class DetectorGraph(nn.Module):
    """images (N, 3, H, W) in [0, 1] -> (anomaly_map (N, H, W), score (N,)) of a fitted detector."""

    def __init__(self, detector) -> None:
        super().__init__()
        check_exportable(detector)
        self.features = FeatureGraph(detector.extractor, detector.image_size)
        method = detector.method
        self.scores = PadimGraph(method) if detector.method_name == "padim" else MemoryBankGraph(method.bank)
        self.model_size = tuple(detector.image_size)
        self.pool_size = int(detector.pool_size)
        self.blur_sigma = float(detector.blur_sigma)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        patch_scores, queries, index = self.scores(features)
        pooled = pool_patch_scores(patch_scores, self.pool_size)
        maps = anomaly_maps(pooled, self.model_size, self.blur_sigma)
        scores = self.scores.image_scores(queries, index, pooled)
        if scores is None:
            scores = maps.flatten(1).amax(dim=1)
        return maps, scores


def check_exportable(detector) -> None:
    """ConfigError naming what the export does not cover (method, tiling, periodic images)."""
    if detector.method_name not in EXPORTABLE_METHODS:
        raise ConfigError(
            f"export covers {', '.join(EXPORTABLE_METHODS)}; {detector.method_name!r} is not exportable yet"
        )
    if detector.threshold is None:
        raise ConfigError("export needs a fitted model (it carries the threshold)")
    if detector.tile_size is not None:
        raise ConfigError("export does not cover tiled models (tile_size) yet")
    if detector.circular_padding:
        raise ConfigError("export does not cover circular_padding models yet")
    if detector.device != "cpu":
        raise ConfigError("export runs from a model loaded on the CPU")
