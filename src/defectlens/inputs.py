"""Image inputs: folders, paths and arrays, decoded to float32 RGB (H, W, 3) in [0, 1]."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import numpy as np

from defectlens.data.datasets import training_images
from defectlens.data.images import as_float_rgb, read_image

ImageInput = Union[str, Path, np.ndarray]
"""A path to an image file, or an image array (H, W), (H, W, 3) or (H, W, 4)."""


def expand_inputs(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A folder (or MVTec category root: its train/good) -> its images; a path or array -> [it];
    a stack of arrays (N, H, W[, C]) -> its images; any other iterable -> its items."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        return list(training_images(path)) if path.is_dir() else [path]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def load_input(image: ImageInput, index: int = 0) -> tuple[np.ndarray, str | None]:
    """Decode one input to float32 RGB (H, W, 3); returns it with its path (None for arrays).

    Raises:
        ImageReadError: the file cannot be read or the array is not an image.
    """
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    return as_float_rgb(np.asarray(image), f"<array {index}>"), None
