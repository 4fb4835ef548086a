"""Evaluation of anomaly maps from any program, LOCO/AutoVI layouts, JSON/Markdown/HTML reports."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from defectlens import metrics
from defectlens.cli import main
from defectlens.data.datasets import AutoVI, MVTecAD, MVTecLOCO, open_dataset
from defectlens.errors import DatasetError
from defectlens.evaluation import evaluate_maps, evaluate_maps_run, read_scores_file
from defectlens.report import markdown_report, write_html_report, write_json, write_markdown

SIZE = (24, 32)  # H, W: not square on purpose
LOCO_CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 200, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "dent", "pixel_value": 100, "saturation_threshold": 20, "relative_saturation": False},
]


# ------------------------------------------------------------------------------------------
# tiny data sets written to tmp_path
# ------------------------------------------------------------------------------------------
def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image(rng: np.random.Generator) -> np.ndarray:
    return (rng.random((*SIZE, 3)) * 255).astype(np.uint8)


def make_mvtec(root: Path, good: int = 3, defects: dict[str, int] | None = None, seed: int = 0) -> Path:
    """test/good, test/<defect> and ground_truth/<defect>/<stem>_mask.png, one box per mask."""
    rng = np.random.default_rng(seed)
    defects = {"crack": 2, "hole": 2} if defects is None else defects
    for index in range(good):
        _save(root / "test" / "good" / f"{index:03d}.png", _image(rng))
    for defect, count in defects.items():
        for index in range(count):
            _save(root / "test" / defect / f"{index:03d}.png", _image(rng))
            mask = np.zeros(SIZE, dtype=np.uint8)
            top, left = rng.integers(0, SIZE[0] - 6), rng.integers(0, SIZE[1] - 6)
            mask[top : top + 3 + index, left : left + 4] = 255
            _save(root / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
    for index in range(4):
        _save(root / "train" / "good" / f"{index:03d}.png", _image(rng))
    return root


def make_maps(dataset, maps_dir: Path, suffix: str = ".tiff", seed: int = 1) -> list[np.ndarray]:
    """Random float32 maps, raised inside the defects, written in the test images' layout."""
    rng = np.random.default_rng(seed)
    maps = []
    for sample in dataset.test_samples():
        anomaly_map = rng.random(SIZE).astype(np.float32)
        if sample.mask_path is not None:
            anomaly_map[np.asarray(Image.open(sample.mask_path)) > 0] += 0.6
        if sample.channel_dir is not None:
            for channel in sorted(sample.channel_dir.glob("*.png")):
                anomaly_map[np.asarray(Image.open(channel)) > 0] += 0.5
        relative = sample.path.relative_to(dataset.root).with_suffix(suffix)
        target = maps_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npy":
            np.save(target, anomaly_map)
        else:
            tifffile.imwrite(target, anomaly_map)
        maps.append(anomaly_map)
    return maps


def make_loco(root: Path, with_logical: bool = True) -> Path:
    """A LOCO-style category: channels per defective image and defects_config.json."""
    rng = np.random.default_rng(3)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "defects_config.json").write_text(json.dumps(LOCO_CONFIG))
    folders = {"good": 3, "structural_anomalies": 2}
    if with_logical:
        folders["logical_anomalies"] = 2
    else:
        folders = {"good": 3, "fastening": 2, "obstruction": 1}
    for folder, count in folders.items():
        for index in range(count):
            _save(root / "test" / folder / f"{index:03d}.png", _image(rng))
            if folder == "good":
                continue
            for channel, value in enumerate((255, 200, 100)[: 1 + index]):
                mask = np.zeros(SIZE, dtype=np.uint8)
                top, left = rng.integers(0, SIZE[0] - 8), rng.integers(0, SIZE[1] - 8)
                mask[top : top + 4 + channel, left : left + 5] = value
                _save(root / "ground_truth" / folder / f"{index:03d}" / f"{channel:03d}.png", mask)
    for index in range(3):
        _save(root / "train" / "good" / f"{index:03d}.png", _image(rng))
    return root


def _masks(dataset) -> list[np.ndarray | None]:
    return [None if s.mask_path is None else np.asarray(Image.open(s.mask_path)) > 0 for s in dataset.test_samples()]


# ------------------------------------------------------------------------------------------
# evaluate_maps
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".tiff", ".npy"])
def test_evaluate_maps_equals_direct_metrics(tmp_path: Path, suffix: str) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part"))
    maps = make_maps(dataset, tmp_path / "maps", suffix)
    samples = dataset.test_samples()
    labels = np.array([s.label for s in samples])

    report = evaluate_maps(tmp_path / "maps", dataset)

    scores = np.array([m.max() for m in maps], dtype=np.float64)
    assert report["image"]["auroc"] == metrics.image_auroc(scores, labels)
    assert report["image"]["ap"] == metrics.average_precision(scores, labels)
    assert report["image"]["f1_max"] == metrics.f1_max(scores, labels)[0]
    expected = metrics.pixel_metrics(maps, _masks(dataset))
    assert report["pixel"]["auroc"] == expected.auroc
    assert report["pixel"]["f1_max"] == expected.f1_max
    assert report["pixel"]["aupro"] == {str(limit): value for limit, value in expected.aupro.items()}
    assert report["pixel"]["aupro"]["0.3"] is not None
    crack = [i for i, s in enumerate(samples) if s.defect_type in ("good", "crack")]
    assert report["per_defect_type"]["crack"]["image_auroc"] == metrics.image_auroc(scores[crack], labels[crack])
    assert report["model"]["image_score"] == "map_max"
    assert "spro" not in report


def test_evaluate_maps_accepts_path_and_category_subfolder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "screw")
    make_maps(MVTecAD(root), tmp_path / "maps" / "screw")  # official layout: MAPS/<object>/test/...
    report = evaluate_maps(tmp_path / "maps", root)
    assert report["data"]["layout"] == "mvtec_ad" and report["data"]["name"] == "screw"
    assert report["pixel"]["auroc"] is not None


def test_scores_file_json_and_csv(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part"))
    make_maps(dataset, tmp_path / "maps")
    samples = dataset.test_samples()
    labels = np.array([s.label for s in samples])
    scores = np.linspace(1.0, 0.0, len(samples))  # deliberately unrelated to the maps
    relative = [s.path.relative_to(dataset.root).as_posix() for s in samples]
    (tmp_path / "scores.json").write_text(json.dumps(dict(zip(relative, scores.tolist()))))
    lines = ["path,score"] + [f"{path[len('test/'):]},{float(score)!r}" for path, score in zip(relative, scores)]
    (tmp_path / "scores.csv").write_text("\n".join(lines))
    expected = metrics.image_auroc(scores, labels)
    for file in ("scores.json", "scores.csv"):
        report = evaluate_maps(tmp_path / "maps", dataset, scores_file=tmp_path / file)
        assert report["image"]["auroc"] == expected
        assert report["model"]["image_score"] == "scores_file"
    (tmp_path / "partial.json").write_text(json.dumps({relative[0]: 1.0}))
    with pytest.raises(DatasetError, match="no score for test image"):
        evaluate_maps(tmp_path / "maps", dataset, scores_file=tmp_path / "partial.json")
    assert read_scores_file(tmp_path / "scores.csv")["good/000"] == scores[relative.index("test/good/000.png")]


def test_missing_map_names_the_file(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part"))
    make_maps(dataset, tmp_path / "maps")
    (tmp_path / "maps" / "test" / "hole" / "001.tiff").unlink()
    with pytest.raises(DatasetError, match=r"hole/001\.tiff"):
        evaluate_maps(tmp_path / "maps", dataset)


def test_map_of_another_size_is_an_error(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part"))
    make_maps(dataset, tmp_path / "maps")
    tifffile.imwrite(tmp_path / "maps" / "test" / "crack" / "000.tiff", np.zeros((12, 16), np.float32))
    with pytest.raises(DatasetError, match=r"crack/000\.tiff is 12x16 .* is 24x32"):
        evaluate_maps(tmp_path / "maps", dataset)


def test_undefined_metrics_are_null(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part", good=0))
    make_maps(dataset, tmp_path / "maps")
    report = evaluate_maps(tmp_path / "maps", dataset)
    assert report["image"]["auroc"] is None
    assert report["image"]["tpr_at_tnr"]["0.95"] is None
    assert report["per_defect_type"]["crack"]["image_auroc"] is None
    report["pixel"]["f1_threshold"] = float("-inf")  # JSON has no infinity either
    report["extra_nan"] = np.float32("nan")
    path = write_json(report, tmp_path / "report.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["image"]["auroc"] is None and loaded["extra_nan"] is None and loaded["pixel"]["f1_threshold"] is None
    assert "–" in markdown_report(report)  # undefined values shown as a dash


# ------------------------------------------------------------------------------------------
# LOCO and AutoVI
# ------------------------------------------------------------------------------------------
def test_loco_layout_and_spro_report(tmp_path: Path) -> None:
    root = make_loco(tmp_path / "juice_bottle")
    dataset = open_dataset(root)
    assert isinstance(dataset, MVTecLOCO)
    samples = dataset.test_samples()
    assert {s.defect_type for s in samples} == {"good", "logical_anomalies", "structural_anomalies"}
    assert all((s.channel_dir is not None) == (s.label == 1) for s in samples)
    maps = make_maps(dataset, tmp_path / "maps")

    report = evaluate_maps(tmp_path / "maps", dataset)

    assert set(report["spro"]) == {"all", "logical", "structural"}
    truth = metrics.LocoGroundTruth(root)
    keys = [s.path.relative_to(root / "test").with_suffix("").as_posix() for s in samples]
    assert keys == truth.test_images
    for subset, folder in (("all", None), ("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
        chosen = [i for i, s in enumerate(samples) if folder is None or s.defect_type in ("good", folder)]
        expected = metrics.auspro([maps[i] for i in chosen], [truth[i] for i in chosen], root / "defects_config.json")
        got = report["spro"][subset]["auspro"]
        assert list(got) == ["0.01", "0.05", "0.1", "0.3", "1.0"]
        for limit, value in expected.items():
            assert got[str(limit)] == pytest.approx(value, abs=1e-12)
        assert report["spro"][subset]["num_images"] == len(chosen)
    # pixel metrics use the union of the channels as the mask
    unions = [None if s.channel_dir is None else
              np.any([np.asarray(Image.open(p)) > 0 for p in s.channel_dir.glob("*.png")], axis=0) for s in samples]
    assert report["pixel"]["auroc"] == metrics.pixel_auroc(maps, unions)
    assert "AUsPRO@0.05" in markdown_report(report)


def test_autovi_and_mvtec_detection(tmp_path: Path) -> None:
    autovi = open_dataset(make_loco(tmp_path / "engine_wiring", with_logical=False))
    assert isinstance(autovi, AutoVI)
    make_maps(autovi, tmp_path / "maps")
    report = evaluate_maps(tmp_path / "maps", autovi)
    assert set(report["spro"]) == {"all", "fastening", "obstruction"}
    (tmp_path / "engine_wiring" / "defects_config.json").unlink()  # channels alone still mean AutoVI
    without_config = open_dataset(tmp_path / "engine_wiring")
    assert isinstance(without_config, AutoVI) and without_config.defects_config is None
    assert "spro" not in evaluate_maps(tmp_path / "maps", without_config)
    assert isinstance(open_dataset(make_mvtec(tmp_path / "plain")), MVTecAD)
    with pytest.raises(DatasetError):
        open_dataset(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------
class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("href", "src"):
            value = values.get(name) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)


def assert_self_contained(page: str) -> int:
    parser = _Resources()
    parser.feed(page)
    assert not parser.external, parser.external
    assert not {"script", "link", "iframe"} & parser.tags
    assert not re.search(r"https?://", page)
    assert parser.images
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as image:
            assert image.format == "PNG"
            image.verify()
    return len(parser.images)


def test_html_report_is_one_self_contained_file(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part", good=5, defects={"crack": 5, "hole": 2}))
    make_maps(dataset, tmp_path / "maps")
    report, run = evaluate_maps_run(tmp_path / "maps", dataset, threshold=0.9)
    path = write_html_report(report, run, tmp_path / "report")
    assert path == tmp_path / "report" / "index.html"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["index.html"]
    page = path.read_text(encoding="utf-8")
    images = assert_self_contained(page)
    # 3 figures (ROC, histogram, PRO) + 3 images per gallery card: 4 best, 4 misses, 4 false alarms
    assert images == 3 + 3 * (4 + 4 + 4)
    for text in ("Image-level ROC", "Per defect type", "False alarms", "Hardest defects", "AUPRO by FPR limit",
                 "Defect-wise recall", "crack", "TPR at fixed TNR"):
        assert text in page


def test_html_report_loco_has_spro_curve(tmp_path: Path) -> None:
    dataset = open_dataset(make_loco(tmp_path / "box"))
    make_maps(dataset, tmp_path / "maps")
    report, run = evaluate_maps_run(tmp_path / "maps", dataset)
    page = write_html_report(report, run, tmp_path / "report").read_text()
    assert_self_contained(page)
    assert "sPRO curve" in page and "AUsPRO" in page


def test_markdown_report_tables(tmp_path: Path) -> None:
    dataset = MVTecAD(make_mvtec(tmp_path / "part"))
    make_maps(dataset, tmp_path / "maps")
    report = evaluate_maps(tmp_path / "maps", dataset, threshold=0.95)
    text = write_markdown(report, tmp_path / "r.md").read_text()
    for heading in ("## Image level", "### TPR at fixed TNR", "## Pixel level", "### AUPRO by FPR limit",
                    "## Per defect type", "## Defect-wise recall"):
        assert heading in text
    assert "| FPR limit | 0.01 | 0.05 | 0.1 | 0.3 | 1.0 |" in text
    assert f"| AUROC | {report['image']['auroc']:.4f} |" in text


def test_cli_evaluate_maps_writes_all_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_mvtec(tmp_path / "part")
    make_maps(MVTecAD(root), tmp_path / "maps")
    code = main(["evaluate", "--maps", str(tmp_path / "maps"), "--data", str(root), "--json", str(tmp_path / "r.json"),
                 "--markdown", str(tmp_path / "r.md"), "--report", str(tmp_path / "html")])
    assert code == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "html report written" in out
    assert json.loads((tmp_path / "r.json").read_text())["model"]["maps_dir"] == str(tmp_path / "maps")
    assert (tmp_path / "r.md").is_file() and (tmp_path / "html" / "index.html").is_file()
    (tmp_path / "maps" / "test" / "good" / "000.tiff").unlink()
    assert main(["evaluate", "--maps", str(tmp_path / "maps"), "--data", str(root)]) == 2
    assert "000.tiff" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of --model / --maps
        main(["evaluate", "--maps", "x", "--model", "y", "--data", str(root)])
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", str(root)])
