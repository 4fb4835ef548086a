"""The command line: fit, predict (with bad files in the batch), evaluate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.cli import main
from tests.conftest import textured_images, with_square_defect


def _save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def category(tmp_path_factory) -> Path:
    """A tiny MVTec-layout category: 10 train, 3 good + 3 defective test images with masks."""
    root = tmp_path_factory.mktemp("category")
    for index, image in enumerate(textured_images(10, seed=0)):
        _save(root / "train" / "good" / f"{index:03d}.png", image)
    for index, image in enumerate(textured_images(3, seed=1)):
        _save(root / "test" / "good" / f"{index:03d}.png", image)
    for index, image in enumerate(textured_images(3, seed=2)):
        defective, mask = with_square_defect(image, 10 + 10 * index, 20, 10)
        _save(root / "test" / "square" / f"{index:03d}.png", defective)
        Image.fromarray(mask.astype(np.uint8) * 255).save(_save(root / "ground_truth" / "square" / f"{index:03d}_mask.png", mask * 1.0))
    return root


@pytest.fixture(scope="module")
def model(category, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m.dlens"
    assert main(["fit", "--data", str(category), "--out", str(out), "--image-size", "64", "--coreset-ratio", "0.25", "-q"]) == 0
    return out


def test_fit_writes_a_model(model, capsys):
    assert model.is_file() and model.stat().st_size > 0


def test_predict_goes_on_past_bad_files_and_exits_non_zero(model, category, tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG broken")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = category / "test" / "good" / "000.png"
    defective = category / "test" / "square" / "001.png"
    out = tmp_path / "out"
    code = main(["predict", "--model", str(model), str(good), str(bad), str(defective), str(empty), "--out", str(out), "-q"])
    assert code == 1
    captured = capsys.readouterr()
    assert str(bad) in captured.err and str(empty) in captured.err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["000.png", "corrupt.png", "001.png", "empty.png"]
    assert "error" in lines[1] and "error" in lines[3]
    assert lines[2]["is_anomalous"] and not lines[0]["is_anomalous"]
    for line in (lines[0], lines[2]):
        assert set(line) == {
            "path", "verdict", "score", "p_value", "z_score", "is_anomalous", "threshold", "review_threshold",
            "reasons", "defects", "heatmap", "mask",
        }
        assert line["verdict"] == ("NOT OK" if line["is_anomalous"] else "OK")
        assert 0.0 < line["p_value"] <= 1.0
        heatmap = np.asarray(Image.open(line["heatmap"]))
        mask = np.asarray(Image.open(line["mask"]))
        assert heatmap.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}


def test_predict_all_good_exits_zero(model, category, tmp_path):
    assert main(["predict", "--model", str(model), str(category / "test" / "good"), "--out", str(tmp_path), "-q"]) == 0


def test_evaluate_writes_the_json_shape(model, category, tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(model), "--data", str(category), "--json", str(report_path), "-q"]) == 0
    report = json.loads(report_path.read_text())
    assert report["image"]["auroc"] == 1.0
    assert report["pixel"]["auroc"] > 0.9
    assert set(report["pixel"]["aupro"]) >= {"0.3", "0.1", "0.05", "0.01", "1.0"}


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m.dlens"), "-q"]) == 2
    assert "no training images" in capsys.readouterr().err
    broken = tmp_path / "broken.dlens"
    broken.write_bytes(b"\x00" * 100)
    assert main(["predict", "--model", str(broken), "x.png", "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "broken.dlens" in err and "Traceback" not in err
