"""From patch scores to anomaly maps and image scores (shared by every method).

patch scores (N, h, w) on the feature grid
  -> bilinear upsampling to the model input size (N, S, S)
  -> Gaussian blur with sigma in model-input pixels (default 4, as PatchCore and PaDiM)
  -> bilinear resize to each input image's own size (H, W)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
    """One map (S, S) resized to the original image's (H, W), as float32 numpy."""
    resized = upsample(anomaly_map.unsqueeze(0), image_size, circular_x)[0]
    return resized.cpu().numpy().astype(np.float32, copy=False)
