"""fit -> save -> load -> predict -> evaluate on the real shared data (MVTec transistor, PIPED)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens.cli import main
from defectlens.data.datasets import MVTecAD, training_images
from defectlens.detector import Detector
from defectlens.evaluation import evaluate

pytestmark = pytest.mark.slow


def test_transistor_patchcore_end_to_end(transistor_root, tmp_path):
    train = training_images(transistor_root)[::3]  # 71 of 213 images keeps CI fast
    detector = Detector(method="patchcore", image_size=256, coreset_ratio=0.1).fit(train)
    path = detector.save(tmp_path / "transistor.dlens")
    loaded = Detector.load(path)
    report = evaluate(loaded, MVTecAD(transistor_root))
    assert report["image"]["auroc"] >= 0.97
    assert report["pixel"]["auroc"] >= 0.97
    assert report["pixel"]["aupro"]["0.3"] >= 0.90
    assert report["per_defect_type"]["good"]["count"] == 60
    sample = transistor_root / "test" / "misplaced" / "000.png"
    assert loaded.predict(str(sample)).score == detector.predict(str(sample)).score


def test_piped_padim_via_cli(piped_root, tmp_path):
    category = piped_root / "PA_BTN01_RL"  # holds the one 127x128 image
    model = tmp_path / "piped.dlens"
    assert main(["fit", "--method", "padim", "--data", str(category), "--image-size", "128", "--out", str(model), "-q"]) == 0
    out = tmp_path / "pred"
    odd = category / "test" / "defect" / "PA_BTN01_RL_S_D_07_2.png"
    assert main(["predict", "--model", str(model), str(odd), "--out", str(out), "-q"]) == 0
    line = json.loads((out / "results.jsonl").read_text())
    from PIL import Image

    assert np.asarray(Image.open(line["mask"])).shape == np.asarray(Image.open(odd)).shape[:2]
    report_path = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(model), "--data", str(category), "--json", str(report_path), "-q"]) == 0
    report = json.loads(report_path.read_text())
    assert report["image"]["auroc"] > 0.8 and report["pixel"]["auroc"] > 0.9
