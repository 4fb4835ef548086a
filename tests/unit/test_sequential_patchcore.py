"""Sequential PatchCore: streaming fit in bounded memory, calibration, fine-tuning, melding,
pooling, and their CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from defectlens.cli import main
from defectlens.detector import Detector
from defectlens.meld import meld_detectors
from defectlens.errors import ConfigError
from defectlens.methods import SequentialPatchCore
from defectlens.methods.patchcore import flatten_patches
from defectlens.ops.streaming_coreset import StreamingCoreset
from defectlens.samples import Batch
from tests.conftest import textured_images, with_square_defect

FAST = dict(image_size=64, batch_size=4)
SEQ = dict(method="sequential_patchcore", coreset_size=120, epochs=2)
_EXTRACTORS: dict = {}


def make(**options) -> Detector:
    """A Detector sharing one feature extractor with the others (building one takes a while)."""
    detector = Detector(**options)
    if detector.image_size == (64, 64):
        if "default" not in _EXTRACTORS:
            _EXTRACTORS["default"] = detector.extractor
        detector._extractor = _EXTRACTORS["default"]
    return detector


@pytest.fixture(scope="module")
def normal_images() -> list[np.ndarray]:
    return textured_images(8, seed=0)


class FeatureEpochs:
    """The part of `samples.FitData` a streaming method reads: the same feature batches each epoch."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = [Batch(x, index, [None] * len(index), [(0, 0)] * len(index)) for x, index in batches]

    def epoch(self, epoch: int) -> list[Batch]:
        return self.batches


def rows_in(rows: torch.Tensor, bank: torch.Tensor) -> bool:
    """Every row of `rows` is exactly a row of `bank`."""
    return bool((rows[:, None] == bank[None]).all(-1).any(1).all())


class FeatureSpy:
    """Wraps Detector.features: records how many images each backbone pass saw."""

    def __init__(self, detector: Detector) -> None:
        self.calls: list[int] = []
        self._features = detector.features
        detector.features = self  # type: ignore[method-assign]

    def __call__(self, images):
        self.calls.append(len(images))
        return self._features(images)


@pytest.fixture(scope="module")
def fitted(normal_images) -> tuple[Detector, list[int]]:
    detector = make(**SEQ, **FAST, calibration_images=3, augmentation="light", pool_size=2, blur_sigma=2)
    spy = FeatureSpy(detector)
    detector.fit(normal_images)
    return detector, list(spy.calls)


def test_streaming_fit_detects_and_locates_a_defect(fitted):
    detector, _ = fitted
    assert detector.method.memory_bank.shape == (120, detector.method.memory_bank.shape[1])
    good = textured_images(2, seed=5)
    defective, mask = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    predictions = detector.predict_batch([*good, defective])
    assert predictions[2].score > max(p.score for p in predictions[:2])
    assert predictions[2].is_anomalous and not any(p.is_anomalous for p in predictions[:2])
    peak = np.unravel_index(np.argmax(predictions[2].anomaly_map), (64, 64))
    assert mask[peak]


def test_fit_streams_batches_and_recomputes_only_calibration_images(fitted):
    detector, calls = fitted
    info = detector.fit_info
    epochs = info.method["epochs_run"]
    assert 1 <= epochs <= 2 and len(info.method["changes_per_epoch"]) == epochs
    assert max(calls) <= 4  # one batch of features at a time, never all of them
    assert sum(calls) == 8 * epochs + 3  # every epoch, then only the 3 calibration images
    assert info.calibration["num_scores"] == 3
    assert info.calibration["min"] <= detector.threshold <= info.calibration["max"]


def test_bank_rows_remember_their_training_image(fitted, normal_images):
    detector, _ = fitted
    method: SequentialPatchCore = detector.method
    origins = method.bank_image_index
    assert origins.min() >= 0 and origins.max() < 8
    # rows from epoch 0 (not augmented) are patches of the image they name
    features = detector.features(normal_images)
    patches = flatten_patches(features).view(8, -1, features.shape[1])
    exact = 0
    for row, image in zip(method.memory_bank, origins.tolist()):
        distances = torch.linalg.vector_norm(patches[image] - row, dim=1)
        exact += bool(distances.min() < 1e-3)
    assert exact > 0


def test_leave_one_out_excludes_the_image_own_vectors(fitted, normal_images):
    detector, _ = fitted
    features = detector.features(normal_images[:2])
    plain = detector.method.patch_scores(features)
    held_out = detector.method.held_out_patch_scores(features, torch.tensor([0, 1]))
    assert bool((held_out >= plain - 1e-3).all())
    assert bool((held_out > plain + 1e-2).any())


def test_method_streams_like_one_coreset_over_the_concatenated_stream():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 8, 4, 4, generator=generator) for _ in range(4)]
    method = SequentialPatchCore(coreset_size=30, epochs=1)
    method.fit_batches(FeatureEpochs([(b, torch.arange(3) + 3 * k) for k, b in enumerate(batches)]))
    reference = StreamingCoreset(30, 8)
    reference.update(torch.cat([flatten_patches(b) for b in batches]))
    assert torch.equal(method.memory_bank, reference.coreset())
    # origin: the image each row came from
    all_patches = torch.cat([flatten_patches(b) for b in batches])
    image_of_patch = torch.arange(12).repeat_interleave(16)
    for row, image in zip(method.memory_bank, method.bank_image_index):
        match = torch.nonzero((all_patches == row).all(1)).squeeze(1)
        assert int(image) in image_of_patch[match].tolist()
    assert method.fit_summary()["epochs_run"] == 1


def test_epochs_stop_when_nothing_changes():
    features = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    method = SequentialPatchCore(coreset_size=10, epochs=50)
    method.fit_batches(FeatureEpochs([(features, torch.arange(4))]))
    summary = method.fit_summary()
    assert summary["converged"] and summary["epochs_run"] < 50 and summary["changes_per_epoch"][-1] == 0


def test_same_seed_same_model(normal_images):
    options = dict(**SEQ, **FAST, augmentation="sequential", calibration_images=2)
    first = make(**options).fit(normal_images[:4])
    second = make(**options).fit(normal_images[:4])
    assert torch.equal(first.method.memory_bank, second.method.memory_bank)
    assert first.threshold == second.threshold


def test_save_load_keeps_options_and_scores(fitted, tmp_path):
    detector, _ = fitted
    path = detector.save(tmp_path / "seq.dlens")
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["defectlens"])
    assert metadata["method"] == "sequential_patchcore"
    assert metadata["method_options"]["coreset_size"] == 120
    assert (metadata["detector"]["blur_sigma"], metadata["detector"]["pool_size"]) == (2.0, 2)
    assert metadata["detector"]["augmentation"][0]["name"] == "brightness_contrast"
    assert metadata["fit"]["method"]["epochs_run"] >= 1
    loaded = Detector.load(path)
    image = textured_images(1, seed=3)[0]
    assert loaded.predict(image).score == pytest.approx(detector.predict(image).score, rel=1e-6)
    assert torch.equal(loaded.method.bank_image_index, detector.method.bank_image_index)


def test_pooling_changes_the_map_and_defaults_to_none(normal_images):
    plain = make(method="patchcore", coreset_ratio=0.25, **FAST, calibration_images=2).fit(normal_images[:4])
    assert plain.pool_size == 1 and plain.blur_sigma == 4.0
    defective, _ = with_square_defect(textured_images(1, seed=9)[0], 20, 30, 12)
    before = plain.predict(defective).anomaly_map
    plain.pool_size = 3
    after = plain.predict(defective).anomaly_map
    assert after.max() < before.max()  # averaging spreads the peak
    with pytest.raises(ConfigError):
        Detector(pool_size=0)


def test_fine_tuning_starts_from_the_initial_bank(fitted):
    detector, _ = fitted
    new_images = textured_images(4, seed=21)
    tuned = make(**SEQ, **FAST, calibration_images=2)
    tuned.fit(new_images, init=detector)
    origins = tuned.method.bank_image_index
    assert tuned.method.memory_bank.shape[0] == 120
    assert bool((origins == -1).any())  # vectors kept from the initial model
    assert rows_in(tuned.method.memory_bank[origins == -1], detector.method.memory_bank)
    with pytest.raises(ConfigError, match="image_size"):
        make(**SEQ, image_size=96).fit(new_images, init=detector)
    with pytest.raises(ConfigError, match="cannot start from another model"):
        make(method="patchcore", **FAST).fit(new_images, init=detector)


def test_meld_two_models(normal_images, tmp_path):
    left = make(**SEQ, **FAST, calibration_images=2).fit(normal_images[:4])
    right = make(**SEQ, **FAST, calibration_images=2).fit(normal_images[4:])
    melded = meld_detectors([left, right], size=100)
    bank, origins = melded.method.memory_bank, melded.method.bank_image_index
    assert bank.shape[0] == 100
    union = torch.cat([left.method.memory_bank, right.method.memory_bank])
    assert rows_in(bank, union)
    assert set(origins.tolist()) <= set(range(8)) and origins.max() >= 4  # right's images shifted past left's
    assert melded.threshold == max(left.threshold, right.threshold)
    assert "largest" in melded.fit_info.calibration["source"]
    path = melded.save(tmp_path / "melded.dlens")
    assert Detector.load(path).predict(normal_images[0]).anomaly_map.shape == (64, 64)
    melded.calibrate(textured_images(3, seed=30))
    assert melded.fit_info.calibration["num_scores"] == 3
    other = make(**SEQ, image_size=96)
    other.threshold = 1.0  # compatibility is checked before the banks are touched
    with pytest.raises(ConfigError, match="image_size"):
        meld_detectors([left, other], size=100)
    padim = make(method="padim", **FAST)
    padim.threshold = 1.0
    with pytest.raises(ConfigError, match="PatchCore"):
        meld_detectors([left, padim], size=100)


def test_cli_fit_meld_and_init(tmp_path, normal_images, capsys):
    from defectlens.data.images import save_png

    for half in (0, 1):
        folder = tmp_path / f"half{half}"
        folder.mkdir()
        for k, image in enumerate(normal_images[4 * half : 4 * half + 3]):
            save_png(folder / f"{k}.png", (image * 255).astype(np.uint8))
    common = ["--method", "sequential_patchcore", "--image-size", "64", "--batch-size", "4", "-q"]
    assert main(["fit", "--data", str(tmp_path / "half0"), "--out", str(tmp_path / "a.dlens"), *common,
                 "--coreset-size", "80", "--epochs", "2", "--augmentation", '[{"name": "hflip"}]',
                 "--pool-size", "2"]) == 0
    assert main(["fit", "--data", str(tmp_path / "half1"), "--out", str(tmp_path / "b.dlens"), *common,
                 "--coreset-size", "80", "--epochs", "1", "--init", str(tmp_path / "a.dlens")]) == 0
    model = Detector.load(tmp_path / "a.dlens")
    assert model.method.coreset_size == 80 and model.pool_size == 2
    assert model.augmentation == [{"name": "hflip", "p": 0.5}]
    assert bool((Detector.load(tmp_path / "b.dlens").method.bank_image_index == -1).any())
    capsys.readouterr()
    assert main(["meld", str(tmp_path / "a.dlens"), str(tmp_path / "b.dlens"), "--size", "60",
                 "--out", str(tmp_path / "m.dlens")]) == 0
    assert "coreset of 60 vectors" in capsys.readouterr().out
    assert Detector.load(tmp_path / "m.dlens").method.memory_bank.shape[0] == 60
