"""Outlier exposure with synthetic anomalies: a fraction of a training batch made anomalous.

FCDD (Liznerski et al. 2021) trains its hypersphere classifier on normal images and on
"outliers"; without real ones, each image of a batch is replaced, with probability
``fraction``, by a synthetic anomaly of it (FCDD's online supervisor; the PET-preform study:
blackened confetti, at most two shapes per image, `data.synthetic.blackened_confetti_noise`).
The generators work on numpy images; this module applies one to rows of a (N, 3, H, W)
tensor, seeded, and returns the labels and exact masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from defectlens.data.synthetic import AnomalyGenerator


class Outliers(NamedTuple):
    """A batch after outlier exposure: images (N, 3, H, W), labels (N,) float (1: made anomalous,
    i.e. at least one pixel changed) and masks (N, H, W) bool (exactly the changed pixels)."""

    images: Tensor
    labels: Tensor
    masks: Tensor


def expose_outliers(images: Tensor, generator: AnomalyGenerator, fraction: float, seed: int, **params: Any) -> Outliers:
    """Replace each image of ``images`` (N, 3, H, W) in [0, 1] by ``generator(image, rng, **params)``
    with probability ``fraction``; ``seed`` fixes which ones and their anomalies."""
    rng = np.random.default_rng(seed)
    chosen = np.flatnonzero(rng.random(images.shape[0]) < fraction)
    out = images.clone()
    labels = torch.zeros(images.shape[0], device=images.device)
    masks = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
    if chosen.size == 0:
        return Outliers(out, labels, masks)
    pixels = images[torch.from_numpy(chosen).to(images.device)].permute(0, 2, 3, 1).float().cpu().numpy()
    for row, image in zip(chosen.tolist(), pixels):
        anomalous, mask = generator(image, rng, **params)
        out[row] = torch.from_numpy(anomalous).permute(2, 0, 1).to(out.device, out.dtype)
        masks[row] = torch.from_numpy(mask).to(masks.device)
        labels[row] = float(mask.any())  # a shape that changed nothing (black on black) is no outlier
    return Outliers(out, labels, masks)
