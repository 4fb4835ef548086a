"""Behaviour unchanged across refactors: per-image scores and thresholds of PatchCore,
Sequential PatchCore and PaDiM (each covariance), fitted on a fixed transistor subset with a
fixed seed, equal the values recorded from the code before the method-protocol refactor
(tests/golden/record_golden.py wrote golden.json and the model files), and those old model
files, once re-sealed with `upgrade_model` (they predate sealed files), load and give the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defectlens.artifact import upgrade_model
from defectlens.detector import Detector
from defectlens.errors import ModelFileError
from tests.golden.golden_configs import CONFIGS, golden_test_images, golden_train_images

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((GOLDEN / "golden.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fit_gives_the_recorded_scores_and_threshold(name, recorded):
    detector = Detector(**CONFIGS[name]).fit(golden_train_images())
    scores = [prediction.score for prediction in detector.predict_batch(golden_test_images())]
    np.testing.assert_allclose(scores, recorded[name]["scores"], rtol=RELATIVE)
    assert detector.threshold == pytest.approx(recorded[name]["threshold"], rel=RELATIVE)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_files_written_before_the_refactor_load_and_score_the_same(name, recorded, tmp_path):
    # written before model files were sealed (format version 1): refused as they are, loaded
    # once `defectlens upgrade-model` has re-sealed them (the user vouching for the file)
    with pytest.raises(ModelFileError, match="version-1 .*defectlens upgrade-model"):
        Detector.load(GOLDEN / f"{name}.dlens")
    upgraded = upgrade_model(GOLDEN / f"{name}.dlens", tmp_path / f"{name}.dlens")
    detector = Detector.load(upgraded)
    assert detector.threshold == pytest.approx(recorded[name]["threshold"], rel=RELATIVE)
    scores = [prediction.score for prediction in detector.predict_batch(golden_test_images())]
    np.testing.assert_allclose(scores, recorded[name]["scores"], rtol=RELATIVE)
