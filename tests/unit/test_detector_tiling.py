"""Tiling in the Detector: images larger than the model input are cut into overlapping tiles,
scored tile by tile (a batch at a time) and their maps stitched back at full resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from defectlens.detector import Detector
from defectlens.errors import ConfigError
from defectlens.tiling import tile_boxes
from tests.conftest import textured_images, with_square_defect

SIZE = (128, 160)  # 3 x 3 tiles of 64 px with 16 px overlap
METHODS = {
    "patchcore": {"coreset_ratio": 0.2},
    "sequential_patchcore": {"coreset_size": 150, "epochs": 1},
    "padim": {"reduced_dim": 24},
}
TILED = dict(image_size=64, tile_size=64, tile_overlap=16, batch_size=8, calibration_images=3)
_EXTRACTORS: dict = {}


def make(**options) -> Detector:
    """A Detector sharing one feature extractor with the others (building one takes a while)."""
    detector = Detector(**options)
    if "default" not in _EXTRACTORS:
        _EXTRACTORS["default"] = detector.extractor
    detector._extractor = _EXTRACTORS["default"]
    return detector


class FeatureSpy:
    def __init__(self, detector: Detector) -> None:
        self.calls: list[int] = []
        self._features = detector.features
        detector.features = self  # type: ignore[method-assign]

    def __call__(self, images):
        assert all(image.shape[:2] == (64, 64) for image in images)  # tiles, never the whole image
        self.calls.append(len(images))
        return self._features(images)


@pytest.fixture(scope="module")
def large_normal() -> list[np.ndarray]:
    return textured_images(3, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def models(large_normal) -> dict[str, Detector]:
    """Every method fitted on the same tiled images (fitted on first use)."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Detector:
            self[name] = make(method=name, **TILED, **METHODS[name]).fit(large_normal)
            return self[name]

    return Lazy()


@pytest.fixture(params=sorted(METHODS))
def tiled(request, models) -> Detector:
    return models[request.param]


@pytest.fixture
def tiled_patchcore(models) -> Detector:
    return models["patchcore"]


def test_defect_pasted_into_one_tile_shows_up_in_the_stitched_map(tiled):
    good = textured_images(1, size=SIZE, seed=7)[0]
    top, left, side = 60, 100, 12  # inside the middle-right tile only (x 96..160)
    defective, mask = with_square_defect(good, top, left, side)
    predictions = tiled.predict_batch([good, defective])
    bad = predictions[1]
    assert bad.anomaly_map.shape == SIZE and bad.mask.shape == SIZE  # full resolution
    peak = np.unravel_index(np.argmax(bad.anomaly_map), SIZE)
    assert abs(peak[0] - (top + side / 2)) <= side and abs(peak[1] - (left + side / 2)) <= side
    assert bad.score == pytest.approx(float(bad.anomaly_map.max()))  # image score = max of the map
    assert bad.score > predictions[0].score and bad.is_anomalous
    # the defect stands out of everything away from it
    far = np.ones(SIZE, bool)
    far[top - 30 : top + side + 30, left - 30 : left + side + 30] = False
    assert bad.anomaly_map[mask].mean() > bad.anomaly_map[far].max()


def test_calibration_is_per_image_not_per_tile(tiled):
    assert tiled.fit_info.num_images == 3
    assert tiled.fit_info.calibration["num_scores"] == 3
    if tiled.method_name != "padim":
        index = tiled.method.bank_image_index
        assert index.min() >= 0 and index.max() <= 2  # bank rows name images, not tiles


def test_large_image_is_scored_a_batch_of_tiles_at_a_time(tiled_patchcore):
    tiled = tiled_patchcore
    image = textured_images(1, size=(200, 260), seed=11)[0]
    spy = FeatureSpy(tiled)
    try:
        prediction = tiled.predict(image)
    finally:
        del tiled.features  # back to the class method
    assert prediction.anomaly_map.shape == (200, 260)
    assert max(spy.calls) <= tiled.batch_size
    assert sum(spy.calls) == len(tile_boxes(200, 260, 64, 16))
    assert np.isfinite(prediction.anomaly_map).all() and prediction.anomaly_map.min() > 0


def test_small_image_is_padded_to_one_tile(tiled_patchcore):
    prediction = tiled_patchcore.predict(textured_images(1, size=(40, 50), seed=2)[0])
    assert prediction.anomaly_map.shape == (40, 50)


def test_save_load_keeps_tiling(tiled_patchcore, tmp_path, large_normal):
    tiled = tiled_patchcore
    path = tiled.save(tmp_path / "tiled.dlens")
    with safe_open(str(path), framework="pt") as handle:
        preprocessing = json.loads(handle.metadata()["defectlens"])["detector"]
    assert preprocessing["tile_size"] == 64 and preprocessing["tile_overlap"] == 16
    loaded = Detector.load(path)
    loaded._extractor = tiled._extractor
    assert (loaded.tile_size, loaded.tile_overlap) == (64, 16)
    image = large_normal[0]
    np.testing.assert_allclose(loaded.predict(image).anomaly_map, tiled.predict(image).anomaly_map, rtol=1e-5, atol=1e-5)


def test_tiling_configuration_errors():
    with pytest.raises(ConfigError):
        Detector(tile_size=8)
    with pytest.raises(ConfigError):
        Detector(tile_size=64, tile_overlap=64)
    with pytest.raises(ConfigError):
        Detector(tile_size=64, circular_padding=True)
