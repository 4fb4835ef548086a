"""OK / REVIEW / NOT OK and the inspection rules: the same verdicts from the judge, a fitted
detector, its model file and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.errors import ConfigError
from defectlens.rules import InspectionRules, mask_to_png
from defectlens.verdicts import judge
from tests.conftest import textured_images, with_square_defect


def blob_map(shape=(64, 64), blobs=((20, 30, 6, 10.0),)) -> np.ndarray:
    """Background 1.0 with square blobs (top, left, side, value)."""
    anomaly_map = np.ones(shape, np.float32)
    for top, left, side, value in blobs:
        anomaly_map[top : top + side, left : left + side] = value
    return anomaly_map


def test_three_states_by_score():
    anomaly_map = blob_map()
    assert judge(3.0, anomaly_map, threshold=5.0).verdict == "OK"
    assert judge(3.0, anomaly_map, threshold=5.0, review_threshold=2.0).verdict == "REVIEW"
    judged = judge(10.0, anomaly_map, threshold=5.0, review_threshold=2.0)
    assert judged.verdict == "NOT OK" and judged.mask.sum() == 36 and "NOT OK threshold 5" in judged.reasons[0]


def test_dont_care_region_hides_a_defect_and_says_so():
    anomaly_map = blob_map()
    polygon = [[28, 18], [42, 18], [42, 30], [28, 30]]  # x, y around the blob (x 30-35, y 20-25)
    rules = InspectionRules.from_dict({"dont_care": {"polygons": [polygon]}})
    judged = judge(10.0, anomaly_map, 5.0, rules=rules)
    assert judged.verdict == "OK" and not judged.mask.any() and "ignored" in " ".join(judged.reasons)
    moved = blob_map(blobs=((40, 5, 6, 10.0),))
    assert judge(10.0, moved, 5.0, rules=rules).verdict == "NOT OK"


def test_care_mask_png_selects_where_to_look():
    care = np.zeros((32, 32), bool)
    care[:, :16] = True  # left half, at another resolution than the map: resized
    rules = InspectionRules.from_dict({"care": {"mask_png": mask_to_png(care)}})
    assert judge(10.0, blob_map(blobs=((10, 5, 6, 10.0),)), 5.0, rules=rules).verdict == "NOT OK"
    right = judge(10.0, blob_map(blobs=((10, 45, 6, 10.0),)), 5.0, rules=rules)
    assert right.verdict == "OK" and right.score == 1.0  # the score is the inspected max


def test_minimum_area_and_maximum_count():
    two = blob_map(blobs=((5, 5, 3, 10.0), (40, 40, 8, 10.0)))  # 9 px and 64 px
    by_area = judge(10.0, two, 5.0, rules=InspectionRules(min_defect_area_px=20))
    assert by_area.verdict == "NOT OK" and len(by_area.defects) == 1 and by_area.defects[0]["area_px"] == 64
    assert "smaller than the minimum area" in " ".join(by_area.reasons)
    assert judge(10.0, two, 5.0, rules=InspectionRules(min_defect_area_px=100)).verdict == "OK"
    mm = InspectionRules(min_defect_area_mm2=0.16, mm_per_px=0.05)  # 0.16 mm2 = 64 px
    assert mm.min_area_px == pytest.approx(64) and len(judge(10.0, two, 5.0, rules=mm).defects) == 1
    assert judge(10.0, two, 5.0, rules=InspectionRules(max_defect_count=1)).verdict == "NOT OK"
    assert judge(10.0, two, 5.0, rules=InspectionRules(max_defect_count=2)).verdict == "OK"


def test_zones_have_their_own_thresholds_and_review():
    anomaly_map = blob_map(blobs=((20, 30, 6, 4.0),))  # below the model threshold 5
    zone = {"name": "seal", "polygons": [[[25, 15], [45, 15], [45, 35], [25, 35]]], "threshold_scale": 0.6}
    rules = InspectionRules.from_dict({"zones": [zone], "min_defect_area_px": 1})
    judged = judge(4.0, anomaly_map, 5.0, rules=rules)
    assert judged.verdict == "NOT OK" and judged.defects[0]["zone"] == "seal"
    assert judge(4.0, anomaly_map, 5.0, rules=InspectionRules(min_defect_area_px=1)).verdict == "OK"
    review = judge(4.0, anomaly_map, 5.0, review_threshold=3.0, rules=InspectionRules(min_defect_area_px=1))
    assert review.verdict == "REVIEW"


def test_bad_rules_are_refused():
    with pytest.raises(ConfigError, match="unknown inspection rule"):
        InspectionRules.from_dict({"min_area": 3})
    with pytest.raises(ConfigError, match="mm_per_px"):
        InspectionRules.from_dict({"min_defect_area_mm2": 1.0})
    with pytest.raises(ConfigError, match="3 vertices"):
        InspectionRules.from_dict({"dont_care": {"polygons": [[[0, 0], [1, 1]]]}})
    with pytest.raises(ConfigError, match="zone"):
        InspectionRules.from_dict({"zones": [{"name": "a"}]})


@pytest.fixture(scope="module")
def fitted() -> Detector:
    return Detector(image_size=64, batch_size=8, coreset_ratio=0.25, target_fpr=0.02, review_fpr=0.2).fit(
        textured_images(16, seed=0)
    )


def test_detector_gives_three_states_p_values_and_rules_survive_the_model_file(fitted, tmp_path):
    defective, _ = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good = textured_images(20, seed=5)
    predictions = fitted.predict_batch([*good, defective])
    assert predictions[-1].verdict == "NOT OK" and predictions[-1].is_anomalous
    assert {p.verdict for p in predictions[:-1]} <= {"OK", "REVIEW"}
    assert predictions[-1].p_value < min(p.p_value for p in predictions[:-1])
    assert predictions[-1].z_score > 2
    assert fitted.review_threshold < fitted.threshold
    # a don't-care polygon over what the defect lights up: not NOT OK, with the reason; saved with the model
    ys, xs = np.nonzero(predictions[-1].mask)
    box = [[int(xs.min()) - 1, int(ys.min()) - 1], [int(xs.max()) + 1, int(ys.min()) - 1],
           [int(xs.max()) + 1, int(ys.max()) + 1], [int(xs.min()) - 1, int(ys.max()) + 1]]
    fitted.rules = InspectionRules.from_dict({"dont_care": {"polygons": [box]}})
    try:
        hidden = fitted.predict(defective)
        assert hidden.verdict != "NOT OK" and any("ignored" in reason for reason in hidden.reasons)
        loaded = Detector.load(fitted.save(tmp_path / "ruled.dlens"))
        assert loaded.rules == fitted.rules and loaded.predict(defective).verdict == hidden.verdict
        assert loaded.review_threshold == fitted.review_threshold
        assert loaded.predict(defective).p_value == pytest.approx(hidden.p_value)
    finally:
        fitted.rules = InspectionRules()


def test_cli_rules_and_recalibrate_edit_the_model_without_refitting(fitted, tmp_path, capsys):
    from defectlens.data.images import save_png

    model = fitted.save(tmp_path / "m.dlens")
    assert main(["rules", str(model), "--set", "min_defect_area_px=40", "--set", "max_defect_count=1",
                 "--dont-care", "[[[0,0],[10,0],[10,10]]]"]) == 0
    loaded = Detector.load(model)
    assert loaded.rules.min_defect_area_px == 40 and loaded.rules.max_defect_count == 1 and loaded.rules.dont_care
    capsys.readouterr()
    assert main(["rules", str(model), "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["min_defect_area_px"] == 40 and shown["dont_care"]["polygons"] == [[[0, 0], [10, 0], [10, 10]]]
    good = tmp_path / "good"
    good.mkdir()
    for k, image in enumerate(textured_images(12, seed=40)):
        save_png(good / f"{k}.png", (image * 255).astype(np.uint8))
    assert main(["recalibrate", str(model), "--good", str(good), "--target-fpr", "0.05", "-q"]) == 0
    again = Detector.load(model)
    assert again.fit_info.calibration["num_scores"] == 12 and again.target_fpr == 0.05
    assert again.rules == loaded.rules and again.threshold != fitted.threshold
    assert "calibrate" in again.fit_info.calibration["source"]
