"""Defective images paired with normal ones, for corruption models that need real defects of
*other* products or generated defects (the student-teacher study's transfer noise and
generated defects).

Two sources:

* **Transfer folders** (`transfer_pairs`): MVTec-layout categories of other products -
  ``train/good`` (normal) and ``test/<defect>`` (defective, with optional
  ``ground_truth/<defect>/<stem>_mask.png``). A folder may also hold several such categories
  (a data set root, e.g. ``piped/``). Each pair is a defective image and a normal image of the
  same category, drawn at random; the defect mask restricts what is transferred.
* **Generated defects** (`generated_defect_pairs`): each defect image with the clean image it
  was made from. Layouts:

      FOLDER/defect/<name>  +  FOLDER/clean/<name>      the same file names
      FOLDER/synthetic_<kind>.json                      written by ``defectlens synth``:
                                                        test/<kind>/NNN.png, its mask and the
                                                        path of the good image it came from

  A diffusion model (as the study used), an image editor or our ``synth`` command can fill them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from defectlens.data.datasets import MVTecAD, is_mvtec_category, list_images, training_images
from defectlens.errors import DatasetError


@dataclass(frozen=True)
class DefectPair:
    """A defective image, a normal image to compare it with, and the defect's mask (or None)."""

    defective: Path
    normal: Path
    mask: Path | None = None


def categories_in(folder: str | Path) -> list[Path]:
    """``folder`` itself when it is an MVTec-layout category, else its category subfolders (sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"transfer folder not found: {root}")
    if is_mvtec_category(root):
        return [root]
    found = sorted(child for child in root.iterdir() if child.is_dir() and is_mvtec_category(child))
    if not found:
        raise DatasetError(f"{root} is neither an MVTec-layout category (train/good, test/<defect>) nor a folder of them")
    return found


def transfer_pairs(folders: Sequence[str | Path], count: int, seed: int) -> list[DefectPair]:
    """``count`` pairs (defective, normal of the same category, its mask), drawn with ``seed``.

    The category is drawn uniformly among all categories of ``folders``, then a defective test
    image and a normal training image of it. Raises DatasetError when no category has both.
    """
    sources = []
    for folder in folders:
        for category in categories_in(folder):
            defective = [s for s in MVTecAD(category).test_samples() if s.label == 1]
            normal = training_images(category) if (category / "train" / "good").is_dir() else []
            if defective and normal:
                sources.append((defective, normal))
    if not sources:
        raise DatasetError(f"no category with both train/good and defective test images in {list(map(str, folders))}")
    rng = np.random.default_rng([seed, 7])
    pairs = []
    for _ in range(int(count)):
        defective, normal = sources[int(rng.integers(len(sources)))]
        sample = defective[int(rng.integers(len(defective)))]
        pairs.append(DefectPair(sample.path, normal[int(rng.integers(len(normal)))], sample.mask_path))
    return pairs


def generated_defect_pairs(folder: str | Path) -> list[DefectPair]:
    """Every (defect image, its clean original, its mask if known) of a generated-defects folder.

    Raises DatasetError when the folder has neither layout or a named clean image is missing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"generated defects folder not found: {root}")
    pairs: list[DefectPair] = []
    if (root / "defect").is_dir() and (root / "clean").is_dir():
        for defect in list_images(root / "defect"):
            clean = root / "clean" / defect.name
            if not clean.is_file():
                raise DatasetError(f"{defect} has no clean original {clean}")
            pairs.append(DefectPair(defect, clean))
    for manifest in sorted(root.glob("synthetic_*.json")):
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["anomalous"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"{manifest} is not a defectlens synth manifest ({error})") from None
        for entry in entries:
            source = Path(entry["source"])
            if not source.is_file() and not source.is_absolute():
                source = root / source  # a relative path: try it from the folder
            if not source.is_file():
                raise DatasetError(f"{manifest}: the clean original {source} of {entry['image']} is missing")
            mask = root / entry["mask"] if entry.get("mask") else None
            pairs.append(DefectPair(root / entry["image"], source, mask))
    if not pairs:
        raise DatasetError(f"{root} holds no generated defects: expected defect/ + clean/ folders with the same file "
                           "names, or the synthetic_<kind>.json of `defectlens synth`")
    return pairs
