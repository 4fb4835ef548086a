"""From patch scores to anomaly maps and image scores: the ONE chain every path uses.

patch scores (N, h, w) on the method's grid
  -> optional local average pooling (``pool_size`` cells)
  -> bilinear upsampling to the model input size (N, S, S)
  -> Gaussian blur with sigma in model-input pixels (default 4, as PatchCore and PaDiM)
  -> image score: the method's own (`AnomalyMethod.image_scores`) or the max of the map
  -> (in `preprocess.InputPreparation.untile`) resize to each prepared image's size, or
     stitch tiles
Fit, calibration, predict and tiling all go through `MapChain`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from defectlens.methods.base import AnomalyMethod
    from defectlens.samples import Batch


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian kernel of radius ceil(4 sigma) (as scipy and anomalib truncate)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float, circular_x: bool = False) -> torch.Tensor:
    """Separable Gaussian blur of maps (N, H, W) with reflect padding; sigma <= 0 returns maps.

    With ``circular_x`` the x direction wraps around (periodic roll-out bands).
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel_1d(sigma).to(maps.device, maps.dtype)
    radius = (kernel.numel() - 1) // 2
    planes = maps.unsqueeze(1)
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    if circular_x:
        repeats = -(-radius // maps.shape[-1])  # the kernel may be wider than the band
        tiled = planes.repeat(1, 1, 1, 2 * repeats + 1)
        start = repeats * maps.shape[-1] - radius
        planes = tiled[..., start : start + maps.shape[-1] + 2 * radius]
    else:
        planes = F.pad(planes, (radius, radius, 0, 0), mode=mode)
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
    planes = F.pad(planes, (0, 0, radius, radius), mode=mode)
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
    return planes.squeeze(1)


def upsample(maps: torch.Tensor, size: tuple[int, int], circular_x: bool = False) -> torch.Tensor:
    """Bilinear resize of maps (N, h, w) to (N, *size); optionally wrapping around in x."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if circular_x:
        from defectlens.backbones.features import resize_bilinear_circular_x

        return resize_bilinear_circular_x(maps.unsqueeze(1), size).squeeze(1)
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def pool_patch_scores(patch_scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Optional local average pooling of patch scores (N, h, w); kernel 1 is a no-op."""
    if kernel_size <= 1:
        return patch_scores
    return F.avg_pool2d(
        patch_scores.unsqueeze(1), kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False
    ).squeeze(1)[..., : patch_scores.shape[-2], : patch_scores.shape[-1]]


def anomaly_maps(
    patch_scores: torch.Tensor,
    model_size: tuple[int, int],
    blur_sigma: float = 4.0,
    circular_x: bool = False,
) -> torch.Tensor:
    """Patch scores (N, h, w) -> blurred anomaly maps (N, *model_size) float32."""
    maps = upsample(patch_scores.float(), model_size, circular_x)
    return gaussian_blur(maps, blur_sigma, circular_x)


def to_image_size(anomaly_map: torch.Tensor, image_size: tuple[int, int], circular_x: bool = False) -> np.ndarray:
    """One map (S, S) resized to the prepared image's (H, W), as float32 numpy."""
    resized = upsample(anomaly_map.unsqueeze(0), image_size, circular_x)[0]
    return resized.cpu().numpy().astype(np.float32, copy=False)


class MapChain:
    """pool -> upsample to the model input -> blur -> image score, for batches of patch scores.

    Args:
        pool_size: average pooling of patch scores (kernel in cells; 1 = none).
        model_size: (height, width) of the model input the maps are upsampled to.
        blur_sigma: Gaussian blur in model-input pixels (0 = none).
        circular_x: images are periodic in x (roll-out bands).
        method_image_scores: use the method's own image scores (False with tiling: the image
            score is then the max of the stitched map).
    """

    def __init__(
        self, pool_size: int, model_size: tuple[int, int], blur_sigma: float, circular_x: bool = False,
        method_image_scores: bool = True,
    ) -> None:
        self.pool_size = pool_size
        self.model_size = model_size
        self.blur_sigma = blur_sigma
        self.circular_x = circular_x
        self.method_image_scores = method_image_scores

    def maps(self, patch_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (N, h, w) -> (pooled patch scores (N, h, w), maps (N, *model_size))."""
        pooled = pool_patch_scores(patch_scores, self.pool_size)
        return pooled, anomaly_maps(pooled, self.model_size, self.blur_sigma, self.circular_x)

    def apply(
        self, method: "AnomalyMethod", scored: Iterable[tuple["Batch", torch.Tensor]]
    ) -> Iterator[tuple["Batch", torch.Tensor, torch.Tensor | None]]:
        """(batch, patch scores) -> (batch, maps, the method's image scores or None)."""
        for batch, patch_scores in scored:
            pooled, maps = self.maps(patch_scores)
            scores = method.image_scores(batch.x, pooled) if self.method_image_scores else None
            yield batch, maps, scores
