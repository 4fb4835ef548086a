"""DRAEM's simulated anomalies: an anomaly-source image, augmented, pasted through a Perlin mask.

DRAEM (Zavrtanik et al. 2021, Sec. 3.3) fills a thresholded Perlin-noise mask with an image of
the DTD texture set, augmented by three of ten random image operations, blended with the
normal image at opacity beta ~ U(0, 0.8); half of the training images stay normal. DTD cannot
be shipped or downloaded here, so the anomaly source is

* a folder the user names (``AnomalySource(folder)``; any images, searched recursively, e.g. a
  local copy of DTD), one image drawn at random per anomaly and resized to the image, or
* by default, images that exist offline: half the time the procedural colourful fractal-noise
  texture of `synthetic.perlin_anomaly` (``source=None`` there), half the time a random crop of
  one of scikit-image's bundled images (textures: brick, grass, gravel; and natural / colour
  images whose crops look like textures).

The Perlin mask, the beta blend and the exact mask (pixels that changed by more than one grey
level) are `synthetic.perlin_anomaly`'s; this module only chooses and augments the source.

The ten augmentations follow DRAEM's ``imgaug`` list (on uint8 pixels, like imgaug):
gamma contrast (0.5-2, per channel), brightness x U(0.8, 1.2) + U(-30, 30) (on the luma of
YCrCb), PIL sharpness U(0, 2), hue and saturation + U(-50, 50) (each its own draw, on imgaug's
0-255 hue scale), solarize (p = 0.5, threshold U(32, 128)), posterize (1-8 bits), invert, PIL
autocontrast (cutoff 0-20 %), PIL equalize, rotation U(-45, 45) degrees with black corners.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from defectlens.data.images import IMAGE_SUFFIXES, as_float_rgb, read_image
from defectlens.data.synthetic import perlin_anomaly
from defectlens.data.transforms import Rotate, SeedLike, as_generator
from defectlens.errors import DatasetError

BUILTIN_IMAGES: tuple[str, ...] = (
    "brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "coffee", "chelsea", "rocket",
    "astronaut", "retina",
)
"""scikit-image sample images bundled with the package (no download), used as the default source."""

PROCEDURAL_FRACTION = 0.5
"""Share of default-source anomalies filled with `synthetic`'s procedural texture."""


# ------------------------------------------------------------------------------ augmentation
def _gamma(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=3)
    return np.round(255.0 * (pixels / 255.0) ** gamma).astype(np.uint8)


def _brightness(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ycrcb = cv2.cvtColor(pixels, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    ycrcb[..., 0] = ycrcb[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30.0, 30.0)
    return cv2.cvtColor(np.clip(np.round(ycrcb), 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)


def _sharpness(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(pixels)).enhance(float(rng.uniform(0.0, 2.0))))


def _hue_saturation(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV).astype(np.int32)  # OpenCV hue: 0..179
    hue_shift, saturation_shift = rng.integers(-50, 51, size=2)
    hsv[..., 0] = np.mod(hsv[..., 0] + int(round(hue_shift * 180 / 255)), 180)
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation_shift, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = int(rng.integers(32, 129))
    if rng.random() < 0.5:
        return np.asarray(ImageOps.solarize(Image.fromarray(pixels), threshold))
    return pixels


def _posterize(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(pixels), int(rng.integers(1, 9))))


def _invert(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - pixels


def _autocontrast(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(pixels), cutoff=int(rng.integers(0, 21))))


def _equalize(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(pixels)))


_ROTATE = Rotate(max_degrees=45.0, border="constant", p=1.0)


def _rotate(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rotated = _ROTATE.transform(pixels.astype(np.float32) / 255.0, rng)
    return np.round(np.clip(rotated, 0.0, 1.0) * 255.0).astype(np.uint8)


AUGMENTATIONS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert, _autocontrast, _equalize, _rotate,
)
"""DRAEM's ten anomaly-source augmentations, on uint8 RGB (H, W, 3)."""


def augment_source(image: np.ndarray, rng: SeedLike, count: int = 3) -> np.ndarray:
    """Apply ``count`` of the ten `AUGMENTATIONS`, chosen without replacement, in the drawn order.

    image: float32 RGB (H, W, 3) in [0, 1] -> the same, augmented (via uint8, as imgaug works).
    """
    generator = as_generator(rng)
    pixels = np.round(np.clip(as_float_rgb(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    for index in generator.choice(len(AUGMENTATIONS), size=count, replace=False):
        pixels = np.ascontiguousarray(AUGMENTATIONS[int(index)](pixels, generator))
    return pixels.astype(np.float32) / 255.0


# ------------------------------------------------------------------------------ sources
@functools.lru_cache(maxsize=None)
def _builtin_image(name: str) -> np.ndarray:
    import skimage.data

    return as_float_rgb(np.asarray(getattr(skimage.data, name)()), f"skimage.data.{name}")


def _random_crop(image: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random square-ish crop of 1/4 to all of the shorter side, resized to ``shape``."""
    height, width = image.shape[:2]
    side = int(rng.integers(max(8, min(height, width) // 4), min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = image[top : top + side, left : left + side]
    return cv2.resize(crop, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


class AnomalySource:
    """Where DRAEM's anomalies take their pixels from.

    Args:
        folder: a folder of images (searched recursively), e.g. DTD; None = the offline default
            (procedural textures and scikit-image's bundled images, see the module docstring).
        augmentations: how many of the ten augmentations each source image gets (DRAEM: 3).
    """

    def __init__(self, folder: str | Path | None = None, augmentations: int = 3) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.augmentations = int(augmentations)
        self.paths: list[Path] = []
        if self.folder is not None:
            if not self.folder.is_dir():
                raise DatasetError(f"anomaly source is not a folder: {self.folder}")
            self.paths = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.paths:
                raise DatasetError(f"no images (png, jpg, bmp, tif, webp) under the anomaly source {self.folder}")

    def draw(self, shape: tuple[int, int], rng: SeedLike) -> np.ndarray | None:
        """An augmented source image float32 (H, W, 3) for an image of ``shape`` (H, W), or None:
        use `synthetic.perlin_anomaly`'s procedural texture (default source only)."""
        generator = as_generator(rng)
        if self.paths:
            chosen = read_image(self.paths[int(generator.integers(len(self.paths)))])
            image = cv2.resize(chosen, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        elif generator.random() < PROCEDURAL_FRACTION:
            return None
        else:
            name = BUILTIN_IMAGES[int(generator.integers(len(BUILTIN_IMAGES)))]
            image = _random_crop(_builtin_image(name), shape, generator)
        return augment_source(image, generator, self.augmentations)

    def describe(self) -> str:
        return str(self.folder) if self.folder is not None else "built-in (procedural + scikit-image samples)"


def draem_anomaly(
    image: np.ndarray, rng: SeedLike, source: AnomalySource, anomaly_probability: float = 0.5,
    beta_range: tuple[float, float] = (0.0, 0.8), threshold: float = 0.5,
    scale_exponent_range: tuple[int, int] = (0, 5),
) -> tuple[np.ndarray, np.ndarray]:
    """One DRAEM training sample: (image, all-False mask) with probability 1 - anomaly_probability,
    else a Perlin anomaly (`synthetic.perlin_anomaly`) filled from ``source``.

    image: float32 RGB (H, W, 3) in [0, 1]. Returns (float32 (H, W, 3), bool (H, W)); the mask
    is exactly the pixels that differ from ``image``.
    """
    generator = as_generator(rng)
    picture = as_float_rgb(np.asarray(image))
    if generator.random() >= anomaly_probability:
        return picture.copy(), np.zeros(picture.shape[:2], dtype=bool)
    texture = source.draw(picture.shape[:2], generator)
    return perlin_anomaly(
        picture, generator, source=texture, scale_exponent_range=scale_exponent_range, threshold=threshold,
        beta_range=beta_range,
    )


__all__: Sequence[str] = ("AUGMENTATIONS", "AnomalySource", "BUILTIN_IMAGES", "augment_source", "draem_anomaly")
