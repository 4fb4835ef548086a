"""Export (ONNX / OpenVINO) parity with the torch model, the numpy step, the CLI without torch.

Parity: image scores and maps of the export within 1e-4 relative of ``Detector.predict_batch``
(maps: max |difference| over the map's max), the same verdict on every image - for PatchCore
(k = 1; k = 3 with reweighting and pooling), Sequential PatchCore and PaDiM, on synthetic
images and on real transistor images. The full transistor test set at 256 px is
benchmarks/export_parity.py (a real fit takes minutes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from defectlens.detector import Detector  # noqa: E402
from defectlens.errors import ConfigError  # noqa: E402
from defectlens.export import export_detector  # noqa: E402
from defectlens.export.runtime import ExportedDetector, resize  # noqa: E402
from tests.conftest import textured_images, with_square_defect  # noqa: E402

try:
    import openvino  # noqa: F401

    RUNTIMES = ("onnxruntime", "openvino")
except ImportError:  # OpenVINO is optional
    RUNTIMES = ("onnxruntime",)

TOLERANCE = 1e-4
_EXTRACTOR: dict = {}


def fitted(images: list[np.ndarray], image_size: int = 64, **options) -> Detector:
    detector = Detector(image_size=image_size, batch_size=4, **options)
    key = image_size
    if key not in _EXTRACTOR:
        _EXTRACTOR[key] = detector.extractor
    detector._extractor = _EXTRACTOR[key]
    return detector.fit(images)


def assert_parity(detector: Detector, directory, images: list[np.ndarray]) -> list[float]:
    """Export predictions match torch's for every runtime; returns the worst relative gaps."""
    expected = detector.predict_batch(images)
    worst = []
    for runtime in RUNTIMES:
        got = ExportedDetector(directory, runtime, batch_size=3).predict_batch(images)
        for want, have in zip(expected, got):
            assert have.anomaly_map.shape == want.anomaly_map.shape
            score_gap = abs(have.score - want.score) / abs(want.score)
            map_gap = float(np.abs(have.anomaly_map - want.anomaly_map).max() / np.abs(want.anomaly_map).max())
            assert score_gap <= TOLERANCE, (runtime, want.score, have.score)
            assert map_gap <= TOLERANCE, (runtime, map_gap)
            assert have.verdict == want.verdict and have.threshold == want.threshold
            assert np.array_equal(have.mask, want.mask) or want.verdict != "OK"
            worst += [score_gap, map_gap]
    return worst


@pytest.fixture(scope="module")
def synthetic():
    train = textured_images(6, seed=0)
    test = textured_images(3, seed=5)
    test.append(with_square_defect(test[0], 20, 20, 10)[0])
    test.append(test[1][:50, :70])  # another size: resized in, map resized out
    test.append(np.asarray(Image.fromarray((test[2] * 255).astype(np.uint8)).resize((90, 100)), np.float32) / 255)
    return train, test


@pytest.mark.parametrize(
    "options",
    [
        dict(method="patchcore"),
        dict(method="patchcore", num_neighbors=3, reweight=True, pool_size=3),
        dict(method="sequential_patchcore", coreset_size=100, epochs=2),
        dict(method="padim"),
        dict(method="padim", covariance="global", reduction="negated_pca", reduced_dim=40),
    ],
    ids=["patchcore", "patchcore_k3_reweight", "sequential_patchcore", "padim", "padim_global"],
)
def test_export_matches_the_torch_model(options, synthetic, tmp_path):
    train, test = synthetic
    detector = fitted(train, **options)
    directory = export_detector(detector, tmp_path / "export", "openvino" if "openvino" in RUNTIMES else "onnx")
    metadata = json.loads((directory / "defectlens_export.json").read_text())
    assert metadata["threshold"] == detector.threshold and metadata["method"] == options["method"]
    assert metadata["image_size"] == [64, 64] and (directory / metadata["files"]["onnx"]).is_file()
    if options.get("covariance") != "global":  # one Gaussian for all locations misses the square
        verdicts = {p.verdict for p in detector.predict_batch(test)}
        assert "NOT OK" in verdicts  # the defect is found, so "same verdict" is not trivially all OK
    assert_parity(detector, directory, test)


def test_numpy_resize_is_torchs(synthetic):
    rng = np.random.default_rng(0)
    for source, target in [((256, 256), (224, 160)), ((100, 37), (256, 256)), ((300, 500), (256, 256)), ((7, 9), (3, 20))]:
        image = rng.random((*source, 3), dtype=np.float32)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
        want = F.interpolate(tensor, size=target, mode="bilinear", align_corners=False, antialias=True)
        np.testing.assert_allclose(resize(image, target, True), want[0].permute(1, 2, 0).numpy(), atol=1e-6)
        plane = image[..., 0]
        want = F.interpolate(torch.from_numpy(plane)[None, None], size=target, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(resize(plane, target, False), want[0, 0].numpy(), atol=1e-6)


def test_what_is_not_exportable_is_refused(synthetic, tmp_path):
    train, _ = synthetic
    with pytest.raises(ConfigError, match="fitted"):
        export_detector(Detector(image_size=64), tmp_path)
    tiled = fitted(train, method="patchcore")
    tiled.tile_size = 32
    with pytest.raises(ConfigError, match="tiled"):
        export_detector(tiled, tmp_path)
    with pytest.raises(ConfigError, match="format"):
        export_detector(fitted(train, method="padim"), tmp_path, "tflite")


def test_real_transistor_images(transistor_root, tmp_path):
    """PatchCore 10 % and PaDiM on 16 real training images (128 px), 8 test images."""
    train = sorted((transistor_root / "train" / "good").glob("*.png"))[:16]
    test = sorted((transistor_root / "test" / "good").glob("*.png"))[:3]
    for defect in ("bent_lead", "damaged_case", "misplaced", "cut_lead", "missing_lead"):
        test += sorted((transistor_root / "test" / defect).glob("*.png"))[:1]
    test = [str(p) for p in test]
    for method in ("patchcore", "padim"):
        detector = fitted([str(p) for p in train], image_size=128, method=method)
        directory = export_detector(detector, tmp_path / method, "onnx")
        assert_parity(detector, directory, test)


def test_cli_export_and_predict_without_torch(synthetic, tmp_path):
    train, test = synthetic
    images = tmp_path / "images"
    images.mkdir()
    for k, image in enumerate(test[:4]):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(images / f"part_{k}.png")
    model = fitted(train, method="patchcore").save(tmp_path / "model.dlens")
    from defectlens.cli import main

    assert main(["export", str(model), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert main(["predict", "--model", str(model), str(images), "--out", str(tmp_path / "torch"), "-q"]) in (0, 1)
    script = (
        "import sys; from defectlens.cli import main; "
        f"code = main(['predict', '--threads', '1', '--model', {str(tmp_path / 'onnx')!r}, '--runtime', 'onnxruntime', "
        f"{str(images)!r}, '--out', {str(tmp_path / 'ort')!r}, '-q']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    rows = {}
    for name in ("torch", "ort"):
        lines = (tmp_path / name / "results.jsonl").read_text().splitlines()
        rows[name] = {json.loads(line)["path"]: json.loads(line) for line in lines}
    assert rows["torch"].keys() == rows["ort"].keys() and len(rows["ort"]) == 4
    for path, want in rows["torch"].items():
        have = rows["ort"][path]
        assert have["verdict"] == want["verdict"]
        assert abs(have["score"] - want["score"]) <= TOLERANCE * abs(want["score"])
