"""FCDD's hypersphere-classifier (HSC) objective (Liznerski et al., ICLR 2021, Eq. 1-2).

A fully convolutional network phi maps an image to a map; its pseudo-Huber transform

    A(X) = sqrt(phi(X)^2 + 1) - 1          (>= 0, per cell / pixel)

is the anomaly map. With labels y (0 normal, 1 anomalous, e.g. synthetic outliers) the loss is

    L = mean_i [ (1 - y_i) * mean(A(X_i))  -  y_i * log(1 - exp(-mean(A(X_i)))) ]

normal maps are pulled to 0 everywhere; an anomalous image only needs a large mean, so its
map may stay low outside the anomaly (FCDD's explanation maps).

With ground-truth anomaly maps Y (FCDD Sec. 3, Eq. 3; our synthetic outliers have exact ones)

    L = mean_i [ mean_j((1 - Y_ij) A_ij)  -  log(1 - exp(-mean_j(Y_ij A_ij))) ]

(means over all pixels j; the anomalous term only for images with an anomalous pixel, as FCDD's
code): normal pixels of outlier images are pulled down too, so a map that is high everywhere no
longer pays off (`hsc_pixel_loss`). Shared by ``fcdd`` (map at
an intermediate feature stride) and ``fcdd_fpn`` (map at input resolution).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SMALLEST_MEAN = 1e-6
"""Means below this are clamped in the anomalous term (its log diverges at 0)."""


def pseudo_huber(phi: Tensor) -> Tensor:
    """A = sqrt(phi^2 + 1) - 1, elementwise (>= 0, ~ phi^2 / 2 near 0, ~ |phi| far away)."""
    return torch.sqrt(phi * phi + 1.0) - 1.0


def hsc_loss(anomaly_maps: Tensor, labels: Tensor) -> Tensor:
    """HSC loss of maps A (N, h, w) (or (N, 1, h, w)) >= 0 and labels (N,) in {0, 1}: a scalar."""
    means = anomaly_maps.flatten(1).mean(dim=1)
    labels = labels.to(means.dtype)
    normal = means
    anomalous = -torch.log(-torch.expm1(-means.clamp_min(_SMALLEST_MEAN)))  # -log(1 - exp(-mean))
    return ((1.0 - labels) * normal + labels * anomalous).mean()


def hsc_pixel_loss(anomaly_maps: Tensor, masks: Tensor) -> Tensor:
    """FCDD's HSC loss with ground-truth maps: A (N, H, W) >= 0 and masks (N, H, W) in [0, 1]
    (1: anomalous pixel) of the same size; a scalar. Images without anomalous pixels get only
    the normal term."""
    maps = anomaly_maps.flatten(1)
    truth = masks.flatten(1).to(maps.dtype)
    normal = ((1.0 - truth) * maps).mean(dim=1)
    anomalous_mean = (truth * maps).mean(dim=1)
    has_anomaly = truth.amax(dim=1) > 0
    anomalous = -torch.log(-torch.expm1(-anomalous_mean.clamp_min(_SMALLEST_MEAN)))
    return (normal + torch.where(has_anomaly, anomalous, torch.zeros_like(anomalous))).mean()
