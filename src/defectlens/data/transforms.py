"""Seeded, serializable image augmentation for fit time.

Every step works on one image in our convention — ``float32`` RGB ``(H, W, 3)`` in ``[0, 1]`` —
keeps its shape, dtype and range, and draws all its randomness from the
:class:`numpy.random.Generator` it is given, so the same seed gives the same augmented image.

A pipeline is described by a JSON-safe list of dicts, so a model file can store the exact
augmentation it was fitted with::

    pipeline = AugmentationPipeline.from_config([
        {"name": "rotate", "max_degrees": 15, "p": 0.5},
        {"name": "gaussian_noise", "variance_range": [10, 120], "p": 0.5},
    ])
    augmented = pipeline(image, rng)             # rng: int seed or numpy Generator
    config = pipeline.to_config()                # list[dict], json.dumps-able

``from_config`` also takes a preset name (``"autovi"``, ``"light"``, ``"sequential"``; see :data:`PRESETS`).
A streaming coreset can call the pipeline once per image and epoch with
``numpy.random.default_rng([seed, epoch])`` to get a different, reproducible augmentation per
epoch.

Defaults follow the AutoVI paper's augmentation (rotation within ±15°, additive Gaussian noise
with variance drawn from U(10, 120) on the 0–255 scale); the others are mild, label-preserving
photometric and geometric changes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence, Union

import cv2
import numpy as np

from defectlens.errors import ConfigError
from defectlens.params import dataclass_from_dict

SeedLike = Union[int, np.integer, np.random.Generator]

__all__ = [
    "SeedLike",
    "as_generator",
    "AugmentationStep",
    "Rotate",
    "BrightnessContrast",
    "HorizontalFlip",
    "VerticalFlip",
    "GaussianBlur",
    "GaussianNoise",
    "RandomErasing",
    "AugmentationPipeline",
    "Compose",
    "STEP_TYPES",
    "PRESETS",
]


def as_generator(seed: SeedLike) -> np.random.Generator:
    """Return ``seed`` itself when it is a Generator, else a new Generator seeded with it.

    ``None`` is refused on purpose: every stochastic step in defectlens is reproducible.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int or numpy.random.Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_image(image: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) float image in [0, 1]; return it as float32."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"expected an RGB image of shape (H, W, 3), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"expected a float image in [0, 1], got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def check_range(name: str, value: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    """Validate a (min, max) pair within [low, high]; return it as a tuple of floats."""
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (min, max), got {value!r}") from None
    if not (low <= first <= second) or (high is not None and second > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must satisfy min <= max within {bound}, got {value!r}")
    return first, second


@dataclass(frozen=True)
class AugmentationStep:
    """Base class: a step applied with probability ``p``.

    Subclasses set ``name`` (the key in configs) and implement :meth:`transform`.
    """

    name: ClassVar[str] = ""
    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) <= 1.0:
            raise ConfigError(f"{self.name}: probability p must be in [0, 1], got {self.p!r}")

    def __call__(self, image: np.ndarray, rng: SeedLike) -> np.ndarray:
        """Apply the step with probability ``p``; always returns a new float32 array."""
        generator = as_generator(rng)
        image = _check_image(image)
        # Draw the coin first so a step's parameters do not depend on earlier coins' outcomes.
        if generator.random() >= self.p:
            return image.copy()
        out = self.transform(image, generator)
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the step unconditionally. ``image`` is float32 (H, W, 3) in [0, 1]."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"name": ..., <field>: <value>, ...}`` (tuples become lists)."""
        fields = {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }
        return {"name": self.name, **fields}


@dataclass(frozen=True)
class Rotate(AugmentationStep):
    """Rotate about the image centre by an angle drawn from U(-max_degrees, max_degrees).

    The size is kept; corners are filled by reflecting the image (``border="reflect"``) or with
    black (``border="constant"``).
    """

    name: ClassVar[str] = "rotate"
    max_degrees: float = 15.0
    border: str = "reflect"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.max_degrees) <= 180.0:
            raise ConfigError(f"rotate: max_degrees must be in [0, 180], got {self.max_degrees!r}")
        if self.border not in ("reflect", "constant"):
            raise ConfigError(f"rotate: border must be 'reflect' or 'constant', got {self.border!r}")

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        angle_deg = float(rng.uniform(-self.max_degrees, self.max_degrees))
        height, width = image.shape[:2]
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle_deg, 1.0)
        border = cv2.BORDER_REFLECT_101 if self.border == "reflect" else cv2.BORDER_CONSTANT
        return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border)


@dataclass(frozen=True)
class BrightnessContrast(AugmentationStep):
    """``out = (image - mean) * c + mean + b`` with c ~ U(contrast_range), b ~ U(±brightness).

    ``mean`` is the image's mean grey level, so contrast changes keep the average brightness.
    """

    name: ClassVar[str] = "brightness_contrast"
    brightness: float = 0.1
    contrast_range: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.brightness) <= 1.0:
            raise ConfigError(f"brightness_contrast: brightness must be in [0, 1], got {self.brightness!r}")
        object.__setattr__(self, "contrast_range", check_range("contrast_range", self.contrast_range, 0.0))

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        contrast = float(rng.uniform(*self.contrast_range))
        offset = float(rng.uniform(-self.brightness, self.brightness))
        mean = float(image.mean())
        return (image - mean) * contrast + mean + offset


@dataclass(frozen=True)
class HorizontalFlip(AugmentationStep):
    """Mirror left-right."""

    name: ClassVar[str] = "hflip"

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.ascontiguousarray(image[:, ::-1])


@dataclass(frozen=True)
class VerticalFlip(AugmentationStep):
    """Mirror top-bottom."""

    name: ClassVar[str] = "vflip"

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.ascontiguousarray(image[::-1])


@dataclass(frozen=True)
class GaussianBlur(AugmentationStep):
    """Gaussian blur with sigma (pixels) drawn from U(sigma_range); kernel size follows sigma."""

    name: ClassVar[str] = "gaussian_blur"
    sigma_range: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = check_range("sigma_range", self.sigma_range, 0.0)
        if low <= 0.0:
            raise ConfigError(f"gaussian_blur: sigma_range must be > 0, got {self.sigma_range!r}")
        object.__setattr__(self, "sigma_range", (low, high))

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = float(rng.uniform(*self.sigma_range))
        return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


@dataclass(frozen=True)
class GaussianNoise(AugmentationStep):
    """Additive i.i.d. Gaussian noise, variance drawn from U(variance_range) on the 0–255 scale.

    The default (10, 120) is AutoVI's: standard deviations of about 3 to 11 grey levels.
    """

    name: ClassVar[str] = "gaussian_noise"
    variance_range: tuple[float, float] = (10.0, 120.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "variance_range", check_range("variance_range", self.variance_range, 0.0))

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = math.sqrt(float(rng.uniform(*self.variance_range))) / 255.0
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
        return image + noise


@dataclass(frozen=True)
class RandomErasing(AugmentationStep):
    """Erase one rectangle (area fraction ~ U(area_range), aspect ratio log-uniform in aspect_range).

    ``fill``: ``"noise"`` (uniform random pixels), ``"mean"`` (the image's mean colour),
    ``"zero"`` (black) or a number in [0, 1] (that grey level).
    """

    name: ClassVar[str] = "random_erasing"
    area_range: tuple[float, float] = (0.02, 0.1)
    aspect_range: tuple[float, float] = (0.3, 3.3)
    fill: Union[str, float] = "noise"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "area_range", check_range("area_range", self.area_range, 0.0, 1.0))
        low, high = check_range("aspect_range", self.aspect_range, 0.0)
        if low <= 0.0:
            raise ConfigError(f"random_erasing: aspect_range must be > 0, got {self.aspect_range!r}")
        object.__setattr__(self, "aspect_range", (low, high))
        if isinstance(self.fill, str):
            if self.fill not in ("noise", "mean", "zero"):
                raise ConfigError(f"random_erasing: fill must be 'noise', 'mean', 'zero' or a number, got {self.fill!r}")
        elif not 0.0 <= float(self.fill) <= 1.0:
            raise ConfigError(f"random_erasing: numeric fill must be in [0, 1], got {self.fill!r}")

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        area = float(rng.uniform(*self.area_range)) * height * width
        aspect = math.exp(float(rng.uniform(math.log(self.aspect_range[0]), math.log(self.aspect_range[1]))))
        box_h = int(np.clip(round(math.sqrt(area * aspect)), 1, height))
        box_w = int(np.clip(round(math.sqrt(area / aspect)), 1, width))
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        out = image.copy()
        if self.fill == "noise":
            out[top : top + box_h, left : left + box_w] = rng.random((box_h, box_w, 3), dtype=np.float32)
        elif self.fill == "mean":
            out[top : top + box_h, left : left + box_w] = image.reshape(-1, 3).mean(axis=0)
        elif self.fill == "zero":
            out[top : top + box_h, left : left + box_w] = 0.0
        else:
            out[top : top + box_h, left : left + box_w] = float(self.fill)
        return out


STEP_TYPES: dict[str, type[AugmentationStep]] = {
    step.name: step
    for step in (Rotate, BrightnessContrast, HorizontalFlip, VerticalFlip, GaussianBlur, GaussianNoise, RandomErasing)
}
"""Config name → step class."""

PRESETS: dict[str, list[dict[str, Any]]] = {
    # AutoVI (Carvalho et al. 2024): rotation within ±15° and Gaussian noise, σ² ~ U(10, 120).
    "autovi": [
        {"name": "rotate", "max_degrees": 15.0, "p": 0.5},
        {"name": "gaussian_noise", "variance_range": [10.0, 120.0], "p": 0.5},
    ],
    # Mild photometric jitter that suits parts whose pose is fixed by the fixture.
    "light": [
        {"name": "brightness_contrast", "brightness": 0.05, "contrast_range": [0.9, 1.1], "p": 0.5},
        {"name": "gaussian_blur", "sigma_range": [0.1, 0.8], "p": 0.3},
        {"name": "gaussian_noise", "variance_range": [10.0, 60.0], "p": 0.3},
    ],
    # The Sequential PatchCore study's kinds (brightness/contrast, flips, blur, noise, random
    # masking), mild; flips suit textures and surfaces, not parts with a fixed orientation.
    "sequential": [
        {"name": "brightness_contrast", "brightness": 0.05, "contrast_range": [0.9, 1.1], "p": 0.5},
        {"name": "hflip", "p": 0.5},
        {"name": "vflip", "p": 0.5},
        {"name": "gaussian_blur", "sigma_range": [0.1, 0.8], "p": 0.3},
        {"name": "gaussian_noise", "variance_range": [10.0, 60.0], "p": 0.3},
        {"name": "random_erasing", "area_range": [0.01, 0.05], "fill": "mean", "p": 0.2},
    ],
}
"""Named pipelines accepted by :meth:`AugmentationPipeline.from_config`."""


def step_from_dict(config: Mapping[str, Any]) -> AugmentationStep:
    """Build one step from ``{"name": ..., **params}``; unknown names or params raise ConfigError."""
    return dataclass_from_dict(config, "name", STEP_TYPES, "augmentation")


class AugmentationPipeline:
    """Apply steps in order, each with its own probability; ``__call__(image, rng) -> image``.

    Args:
        steps: step objects (e.g. ``Rotate(max_degrees=10)``), applied in order.
    """

    def __init__(self, steps: Sequence[AugmentationStep] = ()) -> None:
        for step in steps:
            if not isinstance(step, AugmentationStep):
                raise ConfigError(f"pipeline steps must be AugmentationStep objects, got {step!r}")
        self.steps: tuple[AugmentationStep, ...] = tuple(steps)

    @classmethod
    def from_config(cls, config: Union[str, Sequence[Mapping[str, Any]], None]) -> "AugmentationPipeline":
        """Build from a preset name, a list of step dicts, or None / [] (identity)."""
        if config is None:
            return cls(())
        if isinstance(config, str):
            if config not in PRESETS:
                raise ConfigError(f"unknown augmentation preset {config!r}; known: {', '.join(sorted(PRESETS))}")
            config = PRESETS[config]
        if isinstance(config, Mapping):
            raise ConfigError("augmentation config must be a list of step dicts, not a single dict")
        return cls([step_from_dict(item) for item in config])

    def to_config(self) -> list[dict[str, Any]]:
        """JSON-safe list of step dicts; ``from_config(to_config())`` rebuilds an equal pipeline."""
        return [step.to_dict() for step in self.steps]

    def __call__(self, image: np.ndarray, rng: SeedLike) -> np.ndarray:
        """Augment one float32 (H, W, 3) image in [0, 1]; the result has the same shape and dtype."""
        generator = as_generator(rng)
        out = _check_image(image).copy()
        for step in self.steps:
            out = step(out, generator)
        return out

    def __len__(self) -> int:
        return len(self.steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AugmentationPipeline) and self.steps == other.steps

    def __repr__(self) -> str:
        return f"AugmentationPipeline({list(self.steps)!r})"


Compose = AugmentationPipeline
"""Alias, for readers who know torchvision."""
