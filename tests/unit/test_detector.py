"""Detector: fit / predict / save / load on small generated images, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torch

from defectlens.calibration import NormalScoreModel, threshold_from_normal_scores
from defectlens.detector import Detector
from defectlens.methods import Padim
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


def _independent_held_out_scores(detector: Detector, images: list[np.ndarray]) -> np.ndarray:
    """Held-out image scores computed here, without the detector's calibration code:
    PatchCore leaves each image's own bank rows out; PaDiM refits on 5 folds."""
    features = detector.features(images)
    if detector.method_name == "patchcore":
        bank = detector.method.bank
        patch_scores = torch.cat([
            bank.patch_scores(features[i : i + 1], excluded=bank.bank_image_index == i) for i in range(len(images))
        ])
    else:
        patch_scores, folds = torch.zeros(features.shape[0], *features.shape[2:]), 5
        for fold in range(folds):
            held = torch.arange(len(images)) % folds == fold
            method = Padim(**detector.method.config())
            method.fit(features[~held], torch.nonzero(~held).flatten())
            patch_scores[held] = method.patch_scores(features[held])
    _, maps = detector.chain.maps(patch_scores)
    assert detector.method.image_scores(features, patch_scores) is None  # the image score is the map's max
    return maps.flatten(1).amax(dim=1).double().numpy()


def test_threshold_comes_from_held_out_normal_scores(fitted, normal_images):
    info = fitted.fit_info
    assert info.num_images == 12 and info.calibration["num_scores"] == 12
    held_out = _independent_held_out_scores(fitted, normal_images)
    expected = NormalScoreModel(held_out).threshold(fitted.target_fpr, fitted.threshold_model)
    assert fitted.threshold == pytest.approx(expected.threshold, rel=1e-5)
    stated = info.calibration["threshold"]
    assert stated["extrapolated"] and stated["num_scores"] == 12  # 12 images cannot support 1 %: said so
    assert stated["fpr_interval"][0] <= stated["estimated_fpr"] <= stated["fpr_interval"][1]
    assert info.calibration["warnings"] and "below what 12 held-out normal images support" in info.calibration["warnings"][0]
    in_sample = np.asarray([p.score for p in fitted.predict_batch(normal_images)])
    # in-sample calibration would have set a lower threshold: training images score lower seen
    assert threshold_from_normal_scores(in_sample, fitted.target_fpr) < 0.98 * fitted.threshold


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
    assert metadata["detector"]["backbone"] == "efficientnet_lite0"
    assert metadata["detector"]["image_size"] == [64, 64]
    assert metadata["method_options"] == fitted.method.config()
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
    with pytest.raises(ConfigError, match="has no option"):
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


def test_f1_optimal_threshold_on_a_labelled_validation_set(fitted, tmp_path):
    from defectlens.metrics import f1_max

    path = fitted.save(tmp_path / "model.dlens")

    good = textured_images(4, seed=31)
    bad = [with_square_defect(image, 10 + 5 * k, 12, 10)[0] for k, image in enumerate(textured_images(4, seed=32))]
    labels = [0] * 4 + [1] * 4
    detector = Detector.load(path).calibrate([*good, *bad], labels=labels)
    scores = np.asarray([p.score for p in fitted.predict_batch([*good, *bad])])
    best_f1, best_threshold = f1_max(scores, np.asarray(labels))
    assert detector.threshold == pytest.approx(best_threshold) and best_f1 == 1.0
    assert "F1-optimal" in detector.fit_info.calibration["source"]
    verdicts = [p.is_anomalous for p in detector.predict_batch([*good, *bad])]
    assert verdicts == [bool(label) for label in labels]
    with pytest.raises(ConfigError, match="good and defective"):
        Detector.load(path).calibrate(good, labels=[0] * 4)
