"""Data sets on disk: MVTec AD, MVTec LOCO AD and AutoVI category layouts, plain folders.

An MVTec AD category root holds ``train/good``, ``test/<defect>/`` and
``ground_truth/<defect>/<stem>_mask.png``; ``good`` test images have no mask.

MVTec LOCO AD and AutoVI keep one *folder* of ground-truth channels per defective image,
``ground_truth/<defect>/<stem>/<k>.png`` (one channel per defect, non-zero value = the
defect type's ``pixel_value``), and a ``defects_config.json`` at the category root that the
sPRO metric needs. LOCO's defect folders are ``logical_anomalies`` and
``structural_anomalies``; AutoVI's are named after the defect (``fastening``, ...).
:func:`open_dataset` tells the layouts apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from defectlens.data.images import PathLike, is_image_file
from defectlens.errors import DatasetError

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One test image: its path, label (0 good, 1 defective), defect type and mask path.

    ``channel_dir`` is set instead of ``mask_path`` for LOCO-style ground truth: the folder
    of the image's defect channels (``<k>.png``); the pixel mask is their union.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None
    channel_dir: Path | None = None


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


def _test_samples(root: Path, defective: Callable[[str, Path], Sample]) -> list[Sample]:
    """Every image under ``root/test/<type>/``, sorted: good ones as they are, the others
    through ``defective(defect type, image path)``, which finds their ground truth."""
    samples = [
        Sample(image_path, 0, GOOD, None) if defect_dir.name == GOOD else defective(defect_dir.name, image_path)
        for defect_dir in sorted(p for p in (root / "test").iterdir() if p.is_dir())
        for image_path in list_images(defect_dir)
    ]
    if not samples:
        raise DatasetError(f"no test images under {root / 'test'}")
    return samples


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
        def defective(defect_type: str, image_path: Path) -> Sample:
            mask_path = self.root / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
            return Sample(image_path, 1, defect_type, mask_path if mask_path.exists() else None)

        return _test_samples(self.root, defective)


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


DEFECTS_CONFIG = "defects_config.json"
LOCO_DEFECT_FOLDERS = ("logical_anomalies", "structural_anomalies")


class _ChannelDataset:
    """A category whose ground truth is a folder of channels per defective image."""

    kind = "channels"

    def __init__(self, root: PathLike, require_config: bool) -> None:
        self.root = Path(root)
        if not (self.root / "test").is_dir():
            raise DatasetError(f"{self.root} is not a category root (no test/ folder)")
        config = self.root / DEFECTS_CONFIG
        if require_config and not config.is_file():
            raise DatasetError(f"{self.root}: {DEFECTS_CONFIG} is missing (needed for sPRO)")
        self.defects_config: Path | None = config if config.is_file() else None
        self.name = self.root.name

    def train_images(self) -> list[Path]:
        return training_images(self.root)

    def validation_images(self) -> list[Path]:
        """``validation/good`` images (LOCO ships them); empty when there is none."""
        folder = self.root / "validation" / GOOD
        return list_images(folder) if folder.is_dir() else []

    def test_samples(self) -> list[Sample]:
        def defective(defect_type: str, image_path: Path) -> Sample:
            channel_dir = self.root / "ground_truth" / defect_type / image_path.stem
            if not channel_dir.is_dir():
                raise DatasetError(f"no ground truth for {image_path}: folder {channel_dir} is missing")
            return Sample(image_path, 1, defect_type, None, channel_dir)

        return _test_samples(self.root, defective)


class MVTecLOCO(_ChannelDataset):
    """A MVTec LOCO AD category: ``test/{good,logical_anomalies,structural_anomalies}``,
    ``ground_truth/<type>/<stem>/<k>.png`` channels and ``defects_config.json``.

    The evaluation reports logical and structural anomalies separately (each against all
    good images) and together.
    """

    kind = "mvtec_loco"

    def __init__(self, root: PathLike, require_config: bool = True) -> None:
        super().__init__(root, require_config=require_config)


class AutoVI(_ChannelDataset):
    """An AutoVI category (Renault, 2024): LOCO-like - ``test/<good|defect>/*.png``,
    ``ground_truth/<defect>/<stem>/<k>.png`` channels, ``defects_config.json`` at the root.

    Without ``defects_config.json`` the data set still loads (pixel metrics use the union of
    the channels) but sPRO cannot be computed.
    """

    kind = "autovi"

    def __init__(self, root: PathLike) -> None:
        super().__init__(root, require_config=False)


def _has_channel_folders(root: Path) -> bool:
    """True when ``ground_truth/<defect>/`` holds folders (LOCO style) rather than masks."""
    truth = root / "ground_truth"
    if not truth.is_dir():
        return False
    for defect_dir in truth.iterdir():
        if defect_dir.is_dir():
            for entry in defect_dir.iterdir():
                return entry.is_dir()
    return False


def dataset_warnings(dataset: object, samples: Sequence[Sample]) -> list[str]:
    """What a test set lacks for a meaningful evaluation, each naming the folder or file."""
    root = Path(getattr(dataset, "root", "."))
    warnings = []
    good = sum(sample.label == 0 for sample in samples)
    if good == 0:
        extra = ""
        if (root / "validation" / GOOD).is_dir():
            extra = f" ({root / 'validation' / GOOD} holds good images: they are for calibration, fit --validation)"
        warnings.append(f"no good test images in {root / 'test' / GOOD}: image AUROC, AP and F1 are undefined (null){extra}")
    if good == len(samples):
        warnings.append(f"no defective test images under {root / 'test'}: image AUROC, AP and F1 are undefined (null)")
    missing = [s.path.name for s in samples if s.label == 1 and s.mask_path is None and s.channel_dir is None]
    if missing:
        warnings.append(f"{len(missing)} defective image(s) have no ground-truth mask under {root / 'ground_truth'} "
                        f"(e.g. {missing[0]}): they count in image metrics only")
    if isinstance(dataset, _ChannelDataset) and dataset.defects_config is None:
        warnings.append(f"{root / DEFECTS_CONFIG} is missing: sPRO / AUsPRO skipped (it needs the defects' saturation "
                        "thresholds); pixel metrics use the union of the ground-truth channels")
    return warnings


def open_dataset(root: PathLike) -> MVTecAD | MVTecLOCO | AutoVI | ImageFolder:
    """Open a labelled test set, recognizing its layout.

    * ``test/logical_anomalies`` or ``test/structural_anomalies`` -> :class:`MVTecLOCO`
      (without ``defects_config.json`` sPRO is skipped, `dataset_warnings` says so);
    * ``defects_config.json`` or channel folders in ``ground_truth/<defect>/<stem>/`` ->
      :class:`AutoVI`;
    * a ``test/`` folder -> :class:`MVTecAD` (also PIPED and other data in that layout);
    * otherwise a folder of images (``good/`` and defect subfolders) -> :class:`ImageFolder`.

    Raises:
        DatasetError: ``root`` is not a folder.
    """
    directory = Path(root)
    if not directory.is_dir():
        raise DatasetError(f"data set folder not found: {directory}")
    if (directory / "test").is_dir():
        has_config = (directory / DEFECTS_CONFIG).is_file()
        if any((directory / "test" / name).is_dir() for name in LOCO_DEFECT_FOLDERS):
            return MVTecLOCO(directory, require_config=has_config)
        if has_config or _has_channel_folders(directory):
            return AutoVI(directory)
        return MVTecAD(directory)
    return ImageFolder(directory)
