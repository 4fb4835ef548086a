"""SPADE, semantic pyramid anomaly detection (Cohen & Hoshen 2020), without any training.

    fit     each training image -> a globally pooled feature vector (the deepest layer of the
            detector's backbone, average-pooled: SPADE's pre-classifier feature) and a
            multi-level feature map (the last layers at strides 4, 8 and 16, each upsampled
            bilinearly to the finest of them and concatenated: SPADE's pyramid); the gallery
            is both, for every training image (tiles count as images)
    image   score = mean distance to the k = ``image_neighbors`` (2, the study) nearest training
            images in pooled features
    pixel   for each test image the M = ``gallery_images`` (1, the study) most similar training
            images (the same kNN) form the pixel gallery: every pixel feature of those images;
            a pixel's score is the mean distance to its ``pixel_neighbors`` nearest gallery
            features. (N, h, w) at stride 4; the shared map chain upsamples and blurs
            (sigma 4, as SPADE)
    maps    for every image (``pixel_maps="all"``, the study's protocol) or only for images whose
            image score exceeds the training images' held-out (1 - ``image_threshold_fpr``)
            quantile (``"above_threshold"``; the others get a zero map, as SPADE does)

Memory and time grow with the training set: the gallery holds N x C x h x w floats (176
channels x 64 x 64 at 256 px: 2.9 MB per image); the image kNN is N distances per query.
Every nearest-neighbour search goes through `ops.knn.NearestNeighbours` in chunks of at most
``search_chunk_distances`` distances; a query image's pixel gallery (M images) is gathered on
its own, so the working memory does not grow with N (benchmarks/pet_table.py --spade-growth
measures it).

Calibration is leave-one-out (cheap: no refit): a training image is scored against the
gallery without its own entries (its tiles), for the image and the pixel kNN alike.
The image kNN of a batch is computed once, in ``patch_scores`` / ``held_out_patch_scores``
(it chooses the pixel galleries), and returned by ``image_scores`` for that same batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from defectlens.backbones.features import resize_bilinear_circular_x
from defectlens.backbones.registry import get_backbone_spec
from defectlens.errors import ConfigError, NotFittedError
from defectlens.methods.base import AnomalyMethod, ProgressCallback
from defectlens.metrics import normal_quantile_threshold
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.ops.knn import NearestNeighbours

if TYPE_CHECKING:
    from defectlens.samples import FitData

PIXEL_MAPS = ("all", "above_threshold")


class Spade(AnomalyMethod):
    """Image kNN on pooled features, then pixel kNN against the most similar training images.

    Args:
        image_neighbors: k, training images whose mean distance is the image score.
        gallery_images: M, most similar training images whose pixel features form the gallery.
        pixel_neighbors: nearest gallery features averaged into a pixel's score.
        pixel_layers: backbone layers of the pixel pyramid (None: the last layers at strides 4, 8, 16).
        global_layer: backbone layer pooled into the image feature (None: the deepest layer).
        pixel_maps: "all" images get maps, or only those "above_threshold" (the others: zeros).
        image_threshold_fpr: with "above_threshold", the share of held-out training images above it.
        search_chunk_distances: most query x gallery distances held at once.
    """

    name = "spade"
    input = "images"
    calibration = "leave_one_out"
    option_choices = {"pixel_maps": PIXEL_MAPS}

    def __init__(
        self, image_neighbors: int = 2, gallery_images: int = 1, pixel_neighbors: int = 1,
        pixel_layers: Sequence[str] | None = None, global_layer: str | None = None, pixel_maps: str = "all",
        image_threshold_fpr: float = 0.01, search_chunk_distances: int = 2**22,
    ) -> None:
        if min(image_neighbors, gallery_images, pixel_neighbors) < 1:
            raise ConfigError("image_neighbors, gallery_images and pixel_neighbors must be >= 1, got "
                              f"{image_neighbors}, {gallery_images}, {pixel_neighbors}")
        if pixel_maps not in PIXEL_MAPS:
            raise ConfigError(f"pixel_maps must be one of {', '.join(PIXEL_MAPS)}, got {pixel_maps!r}")
        if not 0.0 <= image_threshold_fpr < 1.0:
            raise ConfigError(f"image_threshold_fpr must be in [0, 1), got {image_threshold_fpr}")
        self.image_neighbors = int(image_neighbors)
        self.gallery_images = int(gallery_images)
        self.pixel_neighbors = int(pixel_neighbors)
        self.pixel_layers = None if pixel_layers is None else list(pixel_layers)
        self.global_layer = global_layer
        self.pixel_maps = pixel_maps
        self.image_threshold_fpr = float(image_threshold_fpr)
        self.search_chunk_distances = int(search_chunk_distances)
        self.global_features = torch.empty(0)   # (N, D) pooled features of the gallery
        self.pixel_features = torch.empty(0)    # (N, C, h, w) pyramid features of the gallery
        self.gallery_image_index = torch.empty(0, dtype=torch.int64)  # (N,) training image of each entry
        self.image_threshold = torch.tensor([float("inf")])
        self._encoder: PretrainedEncoder | None = None
        self._image_knn: NearestNeighbours | None = None
        self._global_mean = torch.empty(0)
        self._last_image_scores: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ features
    def _layers(self) -> tuple[list[str], str]:
        spec = get_backbone_spec(self.context.backbone)
        last_at_stride = {layer.stride: layer.name for layer in spec.layers}
        pixel = self.pixel_layers or [last_at_stride[stride] for stride in (4, 8, 16) if stride in last_at_stride]
        return list(pixel), self.global_layer or spec.layers[-1].name

    @property
    def encoder(self) -> PretrainedEncoder:
        """The frozen backbone, run once up to the deepest of the pixel and global layers."""
        if self._encoder is None:
            pixel, global_layer = self._layers()
            names = list(dict.fromkeys([*pixel, global_layer]))
            context = self.context
            self._encoder = PretrainedEncoder(context.backbone, names, weights=context.weights,
                                              circular_padding=context.circular_padding, device=context.device)
        return self._encoder

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (n, 3, H, W) -> pooled features (n, D) and pyramid features (n, C, h, w)."""
        pixel, global_layer = self._layers()
        names = list(dict.fromkeys([*pixel, global_layer]))
        maps = dict(zip(names, self.encoder(x)))
        pooled = maps[global_layer].mean(dim=(2, 3))
        levels = [maps[name] for name in pixel]
        grid = max((level.shape[-2:] for level in levels), key=lambda shape: shape[0] * shape[1])
        pyramid = torch.cat([self._resize(level, tuple(grid)) for level in levels], dim=1)
        return pooled, pyramid

    def _resize(self, level: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(level.shape[-2:]) == grid:
            return level
        if self.context.circular_padding:
            return resize_bilinear_circular_x(level, grid)
        return F.interpolate(level, size=grid, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ fit
    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        """Store the gallery: every training input's pooled and pyramid features (one pass)."""
        pooled, pyramids, indices = [], [], []
        for batch in data.images(torch.tensor(data.fit_indices), stage="features" if progress else None):
            global_features, pixel_features = self.features(batch.x)
            pooled.append(global_features)
            pyramids.append(pixel_features)
            indices.append(batch.image_index)
        self.set_gallery(torch.cat(pooled), torch.cat(pyramids), torch.cat(indices))

    def fit(self, x: torch.Tensor, image_index: torch.Tensor) -> None:
        """The gallery of images x (N, 3, H, W) whose training images are ``image_index`` (N,)."""
        pooled, pyramid = self.features(x)
        self.set_gallery(pooled, pyramid, image_index)

    def set_gallery(self, pooled: torch.Tensor, pyramid: torch.Tensor, image_index: torch.Tensor) -> None:
        """Gallery of pooled (N, D) and pyramid (N, C, h, w) features; ``image_index`` (N,)."""
        self.global_features, self.pixel_features = pooled.contiguous(), pyramid.contiguous()
        self.gallery_image_index = image_index.to(torch.int64).to(pooled.device)
        self._image_knn = None
        self._last_image_scores = None
        self.image_threshold = torch.tensor([float("inf")])
        if self.pixel_maps == "above_threshold":
            held_out = torch.cat([self._image_knn_of(self.global_features[row : row + 1], self._own(row))[0]
                                  for row in range(self.global_features.shape[0])])
            self.image_threshold = torch.tensor(
                [normal_quantile_threshold(held_out.cpu().double().numpy(), 1.0 - self.image_threshold_fpr)])

    # ------------------------------------------------------------------ scoring
    def _own(self, row: int) -> torch.Tensor:
        """(N,) bool: the gallery entries of the training image of gallery row ``row``."""
        return self.gallery_image_index == self.gallery_image_index[row]

    def _image_knn_of(self, pooled: torch.Tensor, excluded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (q,) and the gallery rows (q, M) of the M most similar entries."""
        if self.global_features.numel() == 0:
            raise NotFittedError("spade is not fitted")
        if self._image_knn is None:  # centred: ||q||^2 - 2 q.b + ||b||^2 loses less to rounding
            self._global_mean = self.global_features.mean(dim=0, keepdim=True)
            self._image_knn = NearestNeighbours(self.global_features - self._global_mean, self.search_chunk_distances)
        allowed = self.global_features.shape[0] - (int(excluded.sum()) if excluded is not None else 0)
        if allowed < 1:
            raise ConfigError("spade: no training image left to compare with (leave-one-out on one image)")
        neighbours = max(self.image_neighbors, self.gallery_images)
        distances, rows = self._image_knn.query(pooled - self._global_mean, min(neighbours, allowed), excluded)
        scores = distances[:, : self.image_neighbors].mean(dim=1)
        return scores, rows[:, : self.gallery_images]

    def _pixel_scores(self, pyramid: torch.Tensor, gallery_rows: torch.Tensor) -> torch.Tensor:
        """Pixel kNN of one image's pyramid (C, h, w) against gallery entries ``gallery_rows`` (M,)."""
        channels, height, width = pyramid.shape
        gallery = self.pixel_features[gallery_rows].permute(0, 2, 3, 1).reshape(-1, channels)
        centre = gallery.mean(dim=0, keepdim=True)
        # one small gallery per query image: brute force (a pruned index would be rebuilt per image)
        search = NearestNeighbours(gallery - centre, self.search_chunk_distances, algorithm="brute_force")
        queries = pyramid.permute(1, 2, 0).reshape(-1, channels) - centre
        distances, _ = search.query(queries, self.pixel_neighbors)
        return distances.mean(dim=1).view(height, width)

    def _score(self, x: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        pooled, pyramid = self.features(x)
        image_scores, maps = [], []
        for row in range(x.shape[0]):
            excluded = None if image_index is None else self.gallery_image_index == image_index[row].to(
                self.gallery_image_index.device)
            score, gallery_rows = self._image_knn_of(pooled[row : row + 1], excluded)
            image_scores.append(score)
            if self.pixel_maps == "all" or bool(score[0] > self.image_threshold[0]):
                maps.append(self._pixel_scores(pyramid[row], gallery_rows[0]))
            else:
                maps.append(torch.zeros(pyramid.shape[-2:], device=pyramid.device))
        self._last_image_scores = (x, torch.cat(image_scores))
        return torch.stack(maps)

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel kNN distances (N, h, w) at the pyramid's stride (4 by default)."""
        return self._score(x, None)

    def held_out_patch_scores(self, x: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Like `patch_scores`, each training image compared only with the OTHER training images."""
        return self._score(x, image_index)

    def image_scores(self, x: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """Mean distance to the k nearest training images' pooled features (N,): those of the
        last `patch_scores` / `held_out_patch_scores` call when it scored this very ``x``."""
        last = self._last_image_scores
        if last is not None and last[0] is x:
            return last[1]
        return self._image_knn_of(self.features(x)[0], None)[0]

    # ------------------------------------------------------------------ state
    def gallery_megabytes(self) -> float:
        """Memory of the stored gallery in MB (10^6 bytes)."""
        return sum(t.numel() * t.element_size() for t in (self.global_features, self.pixel_features)) / 1e6

    def fit_summary(self) -> dict[str, float | int]:
        return {"gallery_images": int(self.global_features.shape[0]), "gallery_mb": self.gallery_megabytes()}

    def state(self) -> dict[str, torch.Tensor]:
        return {"global_features": self.global_features, "pixel_features": self.pixel_features,
                "gallery_image_index": self.gallery_image_index, "image_threshold": self.image_threshold}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.context.device
        self.global_features = tensors["global_features"].float().to(device)
        self.pixel_features = tensors["pixel_features"].float().to(device)
        self.gallery_image_index = tensors["gallery_image_index"].to(torch.int64).to(device)
        self.image_threshold = tensors["image_threshold"].float()
        self._image_knn = None
        self._last_image_scores = None
