"""Variants of a category for benchmark experiments: few-shot subsets, augmented copies, windows.

The AutoVI study (Carvalho et al. 2024) changes the data three ways; each is one function here,
used by `defectlens.benchmark` jobs (and so by the AutoVI protocol, `defectlens.autovi_protocol`):

    few_shot_subset(n, count, seed)       ``count`` of ``n`` training images, a seeded draw
    with_augmented_copies(paths, ...)     each training image plus K augmented copies (arrays),
                                          copy k of image i seeded by (seed, i, k): the training
                                          set grows, which one-pass methods (PatchCore, PaDiM)
                                          need - the Detector's ``augmentation`` only changes
                                          epochs after the first
    window_box(shape, size, ...)          the square window of side ``size`` around a point
    crop_category(root, out, ...)         a copy of a category (MVTec AD, LOCO or AutoVI layout)
                                          with every train / test / validation image and every
                                          ground-truth mask or channel cropped to its window;
                                          defective test images whose window holds no defect
                                          pixel are left out (they cannot be found in it)

Window sizes are pixels of the image, or, with ``reference_side``, pixels of the image scaled so
its short side is ``reference_side`` (our 256 / 128 px images stand for a 600 px view: windows of
200, 400 and 600 px are then 1/3, 2/3 and all of the short side, the image upsampled first).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from defectlens.data.datasets import DEFECTS_CONFIG, GOOD, list_images
from defectlens.data.images import read_image
from defectlens.data.roi import Box
from defectlens.data.transforms import AugmentationPipeline
from defectlens.errors import ConfigError, DatasetError


# ------------------------------------------------------------------------------ training sets
def few_shot_subset(num_images: int, count: int, seed: int) -> list[int]:
    """Indices (sorted) of ``min(count, num_images)`` of ``num_images`` training images, drawn
    without replacement by ``numpy.random.default_rng([seed, count])``."""
    if count < 1:
        raise ConfigError(f"a few-shot training set needs at least one image, got {count}")
    chosen = np.random.default_rng([int(seed), int(count)]).permutation(num_images)[: min(count, num_images)]
    return sorted(int(index) for index in chosen)


def with_augmented_copies(
    images: Sequence[Path], augmentation: str | Sequence[dict[str, Any]], copies: int, seed: int
) -> list[Path | np.ndarray]:
    """The images (as given) followed by ``copies`` augmented copies of each.

    Copy ``k`` of image ``i`` is ``pipeline(read_image(images[i]), default_rng([seed, i, k]))``:
    float32 (H, W, 3) in [0, 1], reproducible. ``augmentation``: a preset name ("autovi":
    rotation within +-15 deg, p = 0.5, and Gaussian noise with variance ~ U(10, 120) on the 0-255
    scale, p = 0.5, independent) or a list of step dicts (`data.transforms`).
    """
    if copies < 0:
        raise ConfigError(f"copies must be >= 0, got {copies}")
    pipeline = AugmentationPipeline.from_config(augmentation)
    result: list[Path | np.ndarray] = list(images)
    for index, path in enumerate(images):
        pixels = read_image(path)
        for copy in range(copies):
            result.append(pipeline(pixels, np.random.default_rng([int(seed), index, copy])))
    return result


# ------------------------------------------------------------------------------------ windows
@dataclass(frozen=True)
class WindowSpec:
    """A square window: ``size`` px (of the image, or of the image scaled so its short side is
    ``reference_side``) around ``center`` = (x, y) in image pixels (None: the image centre)."""

    size: float
    center: tuple[float, float] | None = None
    reference_side: float | None = None

    def __post_init__(self) -> None:
        if not self.size > 0 or (self.reference_side is not None and not self.reference_side > 0):
            raise ConfigError(f"window size and reference_side must be > 0, got {self.size}, {self.reference_side}")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "WindowSpec":
        unknown = sorted(set(spec) - {"size", "center", "reference_side"})
        if unknown or "size" not in spec:
            raise ConfigError(f"a window needs 'size' (and optional 'center' [x, y], 'reference_side'), got {spec!r}")
        center = spec.get("center")
        if center is not None and (not isinstance(center, (list, tuple)) or len(center) != 2):
            raise ConfigError(f"window center must be [x, y] in pixels, got {center!r}")
        return cls(float(spec["size"]), None if center is None else (float(center[0]), float(center[1])),
                   None if spec.get("reference_side") is None else float(spec["reference_side"]))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "center": None if self.center is None else list(self.center),
                "reference_side": self.reference_side}


def window_box(shape: tuple[int, int], window: WindowSpec) -> Box:
    """The window of an image of ``shape`` (height, width) as a `Box` inside the image.

    Side in image pixels: ``size`` or ``size / reference_side * min(height, width)``, rounded,
    at most ``min(height, width)``; the box is centred on the point and shifted (not shrunk)
    to lie inside the image.
    """
    height, width = int(shape[0]), int(shape[1])
    short = min(height, width)
    side = window.size if window.reference_side is None else window.size / window.reference_side * short
    side = int(min(short, max(1, round(side))))
    cx, cy = window.center if window.center is not None else (width / 2.0, height / 2.0)
    left = int(np.clip(round(cx - side / 2.0), 0, width - side))
    top = int(np.clip(round(cy - side / 2.0), 0, height - side))
    return Box(left, top, side, side)


def _crop_file(source: Path, target: Path, window: WindowSpec) -> np.ndarray:
    """Crop one image / mask file (pixel values kept exactly) and write it as PNG; returns it."""
    with Image.open(source) as image:
        pixels = np.asarray(image)
    box = window_box(pixels.shape[:2], window)
    cropped = box.crop(pixels)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(cropped).save(target.with_suffix(".png"))
    return cropped


def _crop_folder(source: Path, target: Path, window: WindowSpec) -> int:
    images = list_images(source) if source.is_dir() else []
    for path in images:
        _crop_file(path, target / path.name, window)
    return len(images)


def crop_category(root: str | Path, out: str | Path, window: WindowSpec) -> dict[str, Any]:
    """Write ``out``: the category at ``root`` with every image and ground truth cropped to its window.

    MVTec AD layout (``ground_truth/<defect>/<stem>_mask.png``) and channel layout (LOCO /
    AutoVI: ``ground_truth/<defect>/<stem>/<k>.png`` and ``defects_config.json``, copied) are
    both handled; a mask or channel is cropped with its image's box. A defective test image
    whose cropped ground truth is empty is left out.

    Returns:
        ``{"window": ..., "train", "test_good", "test_defective", "dropped": int, "dropped_images": [...]}``.
    """
    source, target = Path(root), Path(out)
    if not (source / "test").is_dir():
        raise DatasetError(f"{source} is not a category root (no test/ folder)")
    if target.exists():
        shutil.rmtree(target)
    counts = {"train": _crop_folder(source / "train" / GOOD, target / "train" / GOOD, window),
              "validation": _crop_folder(source / "validation" / GOOD, target / "validation" / GOOD, window),
              "test_good": 0, "test_defective": 0}
    if (source / DEFECTS_CONFIG).is_file():
        shutil.copy2(source / DEFECTS_CONFIG, target / DEFECTS_CONFIG)
    dropped: list[str] = []
    for defect_dir in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        for path in list_images(defect_dir):
            relative = f"{defect_dir.name}/{path.name}"
            if defect_dir.name == GOOD:
                _crop_file(path, target / "test" / GOOD / path.name, window)
                counts["test_good"] += 1
                continue
            truth = source / "ground_truth" / defect_dir.name
            mask_file, channel_dir = truth / f"{path.stem}_mask.png", truth / path.stem
            truth_target = target / "ground_truth" / defect_dir.name
            if channel_dir.is_dir():
                channels = list_images(channel_dir)
                crops = [_crop_file(c, truth_target / path.stem / c.name, window) for c in channels]
                has_defect = any(bool(np.any(crop)) for crop in crops)
                if not has_defect:
                    shutil.rmtree(truth_target / path.stem)
            elif mask_file.is_file():
                has_defect = bool(np.any(_crop_file(mask_file, truth_target / mask_file.name, window)))
                if not has_defect:
                    (truth_target / mask_file.name).unlink()
            else:
                has_defect = True  # no ground truth: kept (image metrics only)
            if not has_defect:
                dropped.append(relative)
                continue
            _crop_file(path, target / "test" / defect_dir.name / path.name, window)
            counts["test_defective"] += 1
    info = {"window": window.to_dict(), **counts, "dropped": len(dropped), "dropped_images": dropped}
    (target / "window.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def image_window_sides(root: str | Path, window: WindowSpec) -> list[int]:
    """Window sides in pixels of the category's training images (one per distinct image size)."""
    sides = set()
    for path in list_images(Path(root) / "train" / GOOD)[:50]:
        with Image.open(path) as image:
            sides.add(window_box((image.height, image.width), window).width)
    return sorted(sides)
