"""The supervised segmentation baseline: FPN decoder + BCE on normal and labelled defective images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlens.cli import main
from defectlens.data.images import save_png
from defectlens.detector import Detector
from defectlens.errors import ConfigError
from tests.conftest import textured_images, with_square_defect
from tests.unit.pet_method_checks import check_fit_find_save_load, check_one_image


def write_defects(root: Path, count: int = 6, size: int = 64, seed: int = 30) -> Path:
    """An MVTec-layout folder: test/square/*.png with red squares, ground_truth/square/*_mask.png, test/good."""
    rng = np.random.default_rng(seed)
    for folder in ("test/square", "ground_truth/square", "test/good"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(textured_images(count, size=(size, size), seed=seed)):
        top, left = (int(v) for v in rng.integers(4, size - 18, size=2))
        defective, mask = with_square_defect(image, top, left, int(rng.integers(8, 14)))
        save_png(root / f"test/square/{k:03d}.png", (defective * 255).astype(np.uint8))
        save_png(root / f"ground_truth/square/{k:03d}_mask.png", (mask * 255).astype(np.uint8))
    save_png(root / "test/good/000.png", (textured_images(1, size=(size, size), seed=99)[0] * 255).astype(np.uint8))
    return root


def test_supervised_fpn_segments_a_defect_and_loads_identically(tmp_path) -> None:
    defects = write_defects(tmp_path / "defects")
    detector = check_fit_find_save_load("supervised_fpn", tmp_path, defects=str(defects), max_steps=40)
    method = detector.method
    assert method.optimizer == "adam" and method.defects == str(defects)
    x = detector.preparation.to_tensor(textured_images(2, seed=12))
    maps = method.patch_scores(x)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0  # probabilities
    torch.testing.assert_close(method.image_scores(x, maps), maps.flatten(1).mean(dim=1))  # image score = mean


def test_defects_as_pairs_and_clear_errors(tmp_path) -> None:
    defects = write_defects(tmp_path / "defects", count=2)
    pairs = [[str(defects / f"test/square/{k:03d}.png"), str(defects / f"ground_truth/square/{k:03d}_mask.png")]
             for k in range(2)]
    normal = textured_images(3)
    Detector(method="supervised_fpn", image_size=64, defects=pairs, max_steps=2).fit(normal)
    with pytest.raises(ConfigError, match="labelled defective images"):
        Detector(method="supervised_fpn", image_size=64, max_steps=2).fit(normal)
    (defects / "ground_truth/square/001_mask.png").unlink()
    with pytest.raises(ConfigError, match="no ground_truth mask"):
        Detector(method="supervised_fpn", image_size=64, defects=str(defects), max_steps=2).fit(normal)
    small = tmp_path / "small_mask.png"
    save_png(small, np.zeros((10, 10), np.uint8))
    with pytest.raises(ConfigError, match="is \\(10, 10\\)"):
        Detector(method="supervised_fpn", image_size=64, defects=[[pairs[0][0], str(small)]], max_steps=2).fit(normal)


def test_the_cli_takes_a_defects_folder(tmp_path) -> None:
    defects = write_defects(tmp_path / "defects", count=2, size=32)
    good = tmp_path / "good"
    good.mkdir()
    for k, image in enumerate(textured_images(3, size=(32, 32), seed=2)):
        save_png(good / f"{k}.png", (image * 255).astype(np.uint8))
    out = tmp_path / "sup.dlens"
    assert main(["fit", "--method", "supervised_fpn", "--data", str(good), "--out", str(out), "--image-size", "32",
                 "--defects", str(defects), "--max-steps", "2", "-q"]) == 0
    assert Detector.load(out).method.defects == str(defects)


def test_supervised_fpn_trains_on_one_normal_image(tmp_path) -> None:
    check_one_image("supervised_fpn", defects=str(write_defects(tmp_path / "defects", count=2)), max_steps=3)


def test_a_defect_fold_is_trained_on_and_left_out_of_the_evaluation(tmp_path) -> None:
    from defectlens.evaluation import evaluate

    defects = write_defects(tmp_path / "category", count=6)
    detector = Detector(method="supervised_fpn", image_size=64, defects=str(defects), defect_fraction=0.5, max_steps=2)
    detector.fit(textured_images(3))
    trained_on = detector.method.labelled_training_images()
    assert len(trained_on) == 3 and len(set(trained_on)) == 3
    report = evaluate(detector, defects)  # the same folder: only the other 3 defective images (and test/good)
    assert report["image"]["num_defective"] == 3 and report["image"]["num_good"] == 1
    assert any("3 defective images the model was trained on" in warning for warning in report["data"]["warnings"])
    again = Detector(method="supervised_fpn", defects=str(defects), defect_fraction=0.5)
    assert again.method.labelled_training_images() == trained_on  # the same seed, the same fold
    with pytest.raises(ConfigError, match="defect_fraction"):
        Detector(method="supervised_fpn", defect_fraction=0.0)
