"""Pictures for people: heat-map overlays and mask images."""

from __future__ import annotations

import cv2
import numpy as np


def heat_colors(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Jet colours (H, W, 3) uint8 RGB for a map, scaled so the threshold sits mid-scale.

    0 -> dark blue, threshold -> green, 2 x threshold and above -> dark red; the same colour
    means the same score relative to the threshold in every image of a model.
    """
    scale = 2.0 * threshold if threshold > 0 else max(float(anomaly_map.max()), 1e-12)
    levels = np.clip(anomaly_map / scale, 0.0, 1.0)
    bgr = cv2.applyColorMap((levels * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, threshold: float, mask: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
    """Image (H, W, 3) float [0, 1] with the jet heat map blended over it; mask outline in white.

    Returns uint8 RGB (H, W, 3).
    """
    base = (np.clip(image, 0.0, 1.0) * 255).astype(np.float32)
    colours = heat_colors(anomaly_map, threshold).astype(np.float32)
    blended = np.clip((1.0 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
    return blended


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W) -> uint8 {0, 255} image."""
    return mask.astype(np.uint8) * 255
