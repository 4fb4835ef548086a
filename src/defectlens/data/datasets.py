"""Data sets on disk: MVTec AD category layout and plain folders of images.

An MVTec AD category root holds ``train/good``, ``test/<defect>/`` and
``ground_truth/<defect>/<stem>_mask.png``; ``good`` test images have no mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from defectlens.data.images import PathLike, is_image_file
from defectlens.errors import DatasetError

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One test image: its path, label (0 good, 1 defective), defect type and mask path."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def list_images(folder: PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name; DatasetError if missing."""
    directory = Path(folder)
    if not directory.is_dir():
        raise DatasetError(f"not a folder: {directory}")
    return sorted(path for path in directory.iterdir() if path.is_file() and is_image_file(path))


def is_mvtec_category(root: PathLike) -> bool:
    """True when `root` looks like an MVTec AD category (has train/good or test/)."""
    directory = Path(root)
    return (directory / "train" / GOOD).is_dir() or (directory / "test").is_dir()


def training_images(source: PathLike) -> list[Path]:
    """Good training images: `train/good` of an MVTec category root, else the folder itself.

    Raises:
        DatasetError: the folder is missing or holds no image.
    """
    directory = Path(source)
    folder = directory / "train" / GOOD if (directory / "train" / GOOD).is_dir() else directory
    images = list_images(folder)
    if not images:
        raise DatasetError(f"no training images (png, jpg, bmp, tif, webp) in {folder}")
    return images


class MVTecAD:
    """An MVTec AD category (also PIPED and any data set in the same layout)."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not (self.root / "test").is_dir():
            raise DatasetError(f"{self.root} is not an MVTec AD category root (no test/ folder)")
        self.name = self.root.name

    def train_images(self) -> list[Path]:
        return training_images(self.root)

    def test_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in (self.root / "test").iterdir() if p.is_dir()):
            defect_type = defect_dir.name
            for image_path in list_images(defect_dir):
                if defect_type == GOOD:
                    samples.append(Sample(image_path, 0, GOOD, None))
                    continue
                mask_path = self.root / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
                samples.append(Sample(image_path, 1, defect_type, mask_path if mask_path.exists() else None))
        if not samples:
            raise DatasetError(f"no test images under {self.root / 'test'}")
        return samples


class ImageFolder:
    """A plain folder of images with optional labels: `good/` and other subfolders, or flat."""

    def __init__(self, root: PathLike, masks: PathLike | None = None) -> None:
        self.root = Path(root)
        self.masks = Path(masks) if masks else None
        self.name = self.root.name

    def test_samples(self) -> list[Sample]:
        subfolders = sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        folders: Sequence[Path] = subfolders or [self.root]
        samples: list[Sample] = []
        for folder in folders:
            defect_type = folder.name if subfolders else "unknown"
            label = 0 if defect_type == GOOD else 1
            for image_path in list_images(folder):
                mask_path = None
                if self.masks is not None:
                    candidate = self.masks / defect_type / f"{image_path.stem}_mask.png"
                    mask_path = candidate if candidate.exists() else None
                samples.append(Sample(image_path, label, defect_type, mask_path))
        if not samples:
            raise DatasetError(f"no images in {self.root}")
        return samples
