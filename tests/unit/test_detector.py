"""Detector: fit / predict / save / load on small generated images, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from defectlens.detector import Detector
from defectlens.errors import ConfigError, DatasetError, ModelFileError, NotFittedError
from tests.conftest import textured_images, with_square_defect

FAST = dict(image_size=64, batch_size=8)


@pytest.fixture(scope="module")
def normal_images() -> list[np.ndarray]:
    return textured_images(12, seed=0)


@pytest.fixture(scope="module", params=["patchcore", "padim"])
def fitted(request, normal_images) -> Detector:
    options = {"coreset_ratio": 0.25} if request.param == "patchcore" else {"reduced_dim": 32}
    return Detector(method=request.param, **FAST, **options).fit(normal_images)


def test_defect_scores_higher_and_is_located(fitted):
    good = textured_images(3, seed=5)
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    predictions = fitted.predict_batch([*good, defective])
    good_scores = [p.score for p in predictions[:3]]
    bad = predictions[3]
    assert bad.score > max(good_scores)
    assert bad.is_anomalous and bad.anomaly_map.shape == (64, 64)
    peak = np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)
    assert mask[peak]
    assert bad.mask[mask].mean() > 0.5
    assert not any(p.is_anomalous for p in predictions[:3])


def test_threshold_comes_from_held_out_normal_scores(fitted):
    info = fitted.fit_info
    assert info.num_images == 12
    assert info.calibration["num_scores"] == 12
    assert info.calibration["min"] <= fitted.threshold <= info.calibration["max"]


def test_maps_come_back_at_each_input_size(fitted):
    wide = textured_images(1, size=(50, 90), seed=3)[0]
    prediction = fitted.predict(wide)
    assert prediction.anomaly_map.shape == (50, 90) and prediction.mask.shape == (50, 90)


def test_save_load_gives_identical_scores(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.dlens")
    loaded = Detector.load(path)
    images = textured_images(2, seed=11)
    before = fitted.predict_batch(images)
    after = loaded.predict_batch(images)
    assert loaded.threshold == fitted.threshold
    for first, second in zip(before, after):
        assert first.score == second.score
        np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)


def test_model_file_is_safetensors_with_json_metadata(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.dlens")
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["defectlens"])
    assert metadata["method"] == fitted.method_name
    assert metadata["backbone"] == "efficientnet_lite0"
    assert metadata["preprocessing"]["image_size"] == [64, 64]
    assert metadata["threshold"] == fitted.threshold
    assert metadata["library_version"]
    assert b"pickle" not in path.read_bytes()[:200]


def _rewrite(path, tensors=None, metadata_update=None):
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["defectlens"])
    stored = load_file(str(path))
    metadata.update(metadata_update or {})
    save_file(tensors or stored, str(path), metadata={"defectlens": json.dumps(metadata)})


def test_tampered_tensors_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.dlens")
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    _rewrite(path, tensors=tensors)
    with pytest.raises(ModelFileError, match="checksum"):
        Detector.load(path)


def test_other_library_version_is_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.dlens")
    _rewrite(path, metadata_update={"library_version": "0.0.9"})
    with pytest.raises(ModelFileError, match="written by defectlens 0.0.9"):
        Detector.load(path)


def test_truncated_and_foreign_files_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.dlens")
    data = path.read_bytes()
    (tmp_path / "cut.dlens").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        Detector.load(tmp_path / "cut.dlens")
    (tmp_path / "text.dlens").write_text("hello")
    with pytest.raises(ModelFileError):
        Detector.load(tmp_path / "text.dlens")
    with pytest.raises(ModelFileError, match="not found"):
        Detector.load(tmp_path / "missing.dlens")


def test_empty_training_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        Detector(**FAST).fit(tmp_path)


def test_bad_configuration_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        Detector(method="magic")
    with pytest.raises(ConfigError, match="bad option"):
        Detector(method="patchcore", covariance="full")
    with pytest.raises(ConfigError, match="covariance"):
        Detector(method="padim", covariance="diagonal")
    with pytest.raises(ConfigError):
        Detector(backbone="vgg")
    with pytest.raises(NotFittedError):
        Detector(**FAST).predict(np.zeros((8, 8, 3), np.float32))


def test_fit_from_folder_of_files(tmp_path, normal_images):
    for index, image in enumerate(normal_images[:4]):
        Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / f"{index}.png")
    detector = Detector(**FAST, coreset_ratio=0.5).fit(tmp_path)
    assert detector.fit_info.num_images == 4
    assert detector.predict(str(tmp_path / "0.png")).source == str(tmp_path / "0.png")


@pytest.mark.parametrize("covariance", ["full", "tied", "global"])
def test_padim_covariance_models_state_sizes(normal_images, covariance):
    detector = Detector(method="padim", covariance=covariance, reduced_dim=16, **FAST).fit(normal_images)
    state = detector.method.state()
    locations = 8 * 8
    expected_precisions = locations if covariance == "full" else 1
    assert state["precision"].shape == (expected_precisions, 16, 16)
    assert state["mean"].shape == ((1 if covariance == "global" else locations), 16)


def test_patchcore_reweighting_keeps_the_ranking(normal_images):
    detector = Detector(coreset_ratio=0.25, reweight=True, **FAST).fit(normal_images)
    defective, _ = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    good = textured_images(1, seed=7)[0]
    scores = [p.score for p in detector.predict_batch([good, defective])]
    assert 0 < scores[0] < scores[1]
