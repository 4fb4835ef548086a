"""fit --auto: candidates scored on synthetic anomalies in held-out training images, picked by a
fixed rule, written to the model; no test image is read."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from defectlens.autoconfig import Candidate, auto_configure, make_validation_set
from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.errors import ConfigError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mvtec_ad" / "transistor"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def _train(count: int) -> list[Path]:
    return sorted((DATA / "train" / "good").glob("*.png"))[:count]


def test_validation_set_cycles_kinds_with_exact_masks():
    rng = np.random.default_rng(0)
    images = [rng.random((48, 48, 3)).astype(np.float32) for _ in range(3)]
    validation = make_validation_set(images, seed=1, kinds=("confetti", "cut_paste", "stain"), per_image=2)
    assert validation.kinds == ["good", "confetti", "cut_paste", "good", "stain", "confetti", "good", "cut_paste", "stain"]
    assert validation.labels.tolist() == [0, 1, 1, 0, 1, 1, 0, 1, 1]
    base = None
    for image, mask, kind in zip(validation.images, validation.masks, validation.kinds):
        if kind == "good":
            base = image
            continue
        assert mask.any() and np.array_equal(image[~mask], base[~mask])  # changed only inside the mask
        assert np.abs(image - base).max(axis=2)[mask].min() > 0


def test_the_rule_picks_the_best_candidate_and_keeps_the_first_of_equals():
    candidates = [Candidate("padim small", {"method": "padim", "reduced_dim": 20}),
                  Candidate("patchcore", {"method": "patchcore"}),
                  Candidate("patchcore again", {"method": "patchcore"})]

    def make(**params):
        return Detector(image_size=64, calibration_images=4, **params)

    result = auto_configure(make, [str(p) for p in _train(12)], candidates, seed=0)
    scores = {row["name"]: row["selection_score"] for row in result.rows}
    assert set(scores) == {"padim small", "patchcore", "patchcore again"}
    assert scores["patchcore"] == pytest.approx(scores["patchcore again"])  # same config, same seed: same score
    assert result.chosen.name == max(scores, key=scores.get)
    assert result.chosen.name != "patchcore again"  # ties go to the earlier candidate
    for row in result.rows:
        assert 0.5 < row["image_auroc"] <= 1.0 and 0.0 < row["aupro"] <= 1.0  # synthetic anomalies are found
    assert "| chosen |" in result.table()


def test_too_few_images_are_refused():
    with pytest.raises(ConfigError, match="at least 4"):
        auto_configure(lambda **p: Detector(**p), [str(p) for p in _train(3)])


def test_cli_auto_reads_no_test_image_and_stores_its_choice(tmp_path, capsys):
    root = tmp_path / "part"
    (root / "train" / "good").mkdir(parents=True)
    for path in _train(8):
        shutil.copy(path, root / "train" / "good" / path.name)
    (root / "test" / "broken").mkdir(parents=True)
    for path in sorted((DATA / "test" / "damaged_case").glob("*.png"))[:3]:
        shutil.copy(path, root / "test" / "broken" / path.name)
    model = tmp_path / "auto.dlens"
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        code = main(["fit", "--data", str(root), "--auto", "--budget-minutes", "0", "--image-size", "64",
                     "--calibration-images", "4", "--out", str(model), "-q"])
    finally:
        _RECORDING[0] = False
    assert code == 0
    assert [p for p in _OPENED if str(root / "train") in p], "the training images were read"
    assert not [p for p in _OPENED if str(root / "test") in p], "a test image was read"
    printed = capsys.readouterr().out
    assert "chosen: patchcore" in printed and "not tried: budget spent" in printed
    auto = Detector.load(model).fit_info.auto
    assert auto["chosen"] == "patchcore" and auto["rule"].startswith("mean of image AUROC and AUPRO")
    assert [row["name"] for row in auto["candidates"]][:2] == ["patchcore", "patchcore blur 2"]


def test_cli_auto_refuses_method_options(tmp_path):
    assert main(["fit", "--data", str(tmp_path), "--auto", "--coreset-ratio", "0.5", "--out", str(tmp_path / "m.dlens"), "-q"]) != 0
