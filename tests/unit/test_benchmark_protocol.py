"""The AutoVI protocol: data variants (few-shot subsets, augmented copies, windows), thresholds
from training images, job expansion, Welch-marked tables, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.autovi_protocol import (
    comparison_table,
    latest_records,
    load_protocol_config,
    main_tables,
    protocol_jobs,
    run_protocol,
    window_tables,
)
from defectlens.benchmark import training_threshold_metrics
from defectlens.cli import main
from defectlens.data.datasets import AutoVI, open_dataset
from defectlens.data.variants import WindowSpec, crop_category, few_shot_subset, window_box, with_augmented_copies
from defectlens.errors import ConfigError
from tests.unit.test_benchmark import SIDE, make_category


# ------------------------------------------------------------------------------ data variants
def test_few_shot_subsets_are_seeded_draws_without_replacement() -> None:
    first = few_shot_subset(32, 8, seed=3)
    assert first == few_shot_subset(32, 8, seed=3) and first == sorted(set(first)) and len(first) == 8
    assert all(0 <= index < 32 for index in first)
    draws = {tuple(few_shot_subset(32, 8, seed)) for seed in range(8)}
    assert len(draws) == 8  # eight draws, eight different training sets
    assert few_shot_subset(5, 32, seed=0) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        few_shot_subset(5, 0, seed=0)


def test_augmented_copies_enlarge_the_training_set_reproducibly(tmp_path: Path) -> None:
    paths = []
    rng = np.random.default_rng(0)
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(paths[-1])
    images = with_augmented_copies(paths, "autovi", copies=4, seed=7)
    assert images[:3] == paths and len(images) == 3 + 3 * 4
    again = with_augmented_copies(paths, "autovi", copies=4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(images[3:], again[3:]))
    other = with_augmented_copies(paths, "autovi", copies=4, seed=8)
    assert any(not np.array_equal(a, b) for a, b in zip(images[3:], other[3:]))
    # p = 0.5 for rotation and for noise, independently: most of 12 copies differ from their image
    original = [np.asarray(Image.open(p), dtype=np.float32) / 255 for p in paths]
    changed = [not np.allclose(copy, original[(k - 3) // 4], atol=1e-6) for k, copy in enumerate(images[3:], start=3)]
    assert 5 <= sum(changed) <= 12


def test_window_boxes_scale_center_and_stay_inside() -> None:
    third = window_box((256, 256), WindowSpec(200, reference_side=600))  # 200 / 600 of the short side
    assert (third.width, third.height) == (85, 85) and (third.x, third.y) == (86, 86)
    whole = window_box((256, 256), WindowSpec(600, reference_side=600))
    assert (whole.x, whole.y, whole.width) == (0, 0, 256)
    corner = window_box((100, 200), WindowSpec(40, center=(195.0, 2.0)))  # shifted inside, not shrunk
    assert (corner.x, corner.y, corner.width, corner.height) == (160, 0, 40, 40)
    too_big = window_box((100, 200), WindowSpec(500))
    assert too_big.width == 100


def test_crop_category_crops_images_and_masks_together_and_drops_empty_windows(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / folder).mkdir(parents=True)
    image = np.zeros((60, 60, 3), np.uint8)
    image[0:10, 0:10] = 200  # a defect in the corner, outside a central window
    mask = np.zeros((60, 60), np.uint8)
    mask[0:10, 0:10] = 255
    centre = image.copy()
    centre[25:35, 28:32] = 250
    centre_mask = np.zeros((60, 60), np.uint8)
    centre_mask[25:35, 28:32] = 255
    Image.fromarray(image).save(root / "train/good/a.png")
    Image.fromarray(image).save(root / "test/good/g.png")
    Image.fromarray(image).save(root / "test/spot/corner.png")
    Image.fromarray(mask).save(root / "ground_truth/spot/corner_mask.png")
    Image.fromarray(centre).save(root / "test/spot/centre.png")
    Image.fromarray(centre_mask).save(root / "ground_truth/spot/centre_mask.png")
    info = crop_category(root, tmp_path / "out", WindowSpec(20))
    assert info["dropped_images"] == ["spot/corner.png"] and info["test_defective"] == 1 and info["train"] == 1
    samples = open_dataset(tmp_path / "out").test_samples()
    assert [s.path.name for s in samples] == ["g.png", "centre.png"]
    cropped = np.asarray(Image.open(tmp_path / "out/test/spot/centre.png"))
    cropped_mask = np.asarray(Image.open(samples[1].mask_path))
    assert cropped.shape == (20, 20, 3) and cropped_mask.shape == (20, 20)
    np.testing.assert_array_equal(cropped_mask > 0, cropped[..., 0] == 250)  # image and mask stay registered


def make_autovi_category(root: Path, seed: int = 0) -> Path:
    """The tiny stripes category in the AutoVI layout: channel folders and defects_config.json."""
    make_category(root, seed=seed, train=6, good=3, defective=3)
    (root / "defects_config.json").write_text(json.dumps([
        {"defect_name": "spot", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}]))
    for mask_file in sorted((root / "ground_truth" / "spot").glob("*_mask.png")):
        channel_dir = root / "ground_truth" / "spot" / mask_file.name.replace("_mask.png", "")
        channel_dir.mkdir()
        mask_file.rename(channel_dir / "000.png")
    return root


def test_crop_category_keeps_the_autovi_layout(tmp_path: Path) -> None:
    root = make_autovi_category(tmp_path / "cat")
    info = crop_category(root, tmp_path / "out", WindowSpec(600, reference_side=600))  # the whole image
    assert info["dropped"] == 0
    dataset = open_dataset(tmp_path / "out")
    assert isinstance(dataset, AutoVI) and dataset.defects_config is not None
    assert all(s.channel_dir is not None for s in dataset.test_samples() if s.label == 1)


# ------------------------------------------------------------------------------ thresholds
def test_tpr_at_tnr_uses_thresholds_from_training_scores_only() -> None:
    train = np.arange(1.0, 11.0)  # held-out training scores 1..10
    scores = np.array([1.0, 9.0, 9.2, 8.5, 9.5, 10.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    values = training_threshold_metrics(train, scores, labels, (0.9, 0.99))
    # TNR 0.9 of 10 scores: the 9th smallest (9.0); flagged = score > 9.0
    assert values["train_tpr_at_tnr_0.9"] == pytest.approx(2 / 3)
    assert values["train_tnr_at_tnr_0.9"] == pytest.approx(2 / 3)  # 9.2 > 9.0 is a false alarm on the test set
    # TNR 0.99: the 10th smallest (10.0): nothing above it
    assert values["train_tpr_at_tnr_0.99"] == 0.0 and values["train_tnr_at_tnr_0.99"] == 1.0
    # the test images' scores do not move the thresholds
    shifted = training_threshold_metrics(train, scores + np.array([0, 0, -5, 0, 0, 0]), labels, (0.9,))
    assert shifted["train_tpr_at_tnr_0.9"] == values["train_tpr_at_tnr_0.9"]


# ------------------------------------------------------------------------------ jobs
def _config(tmp_path: Path, **changes) -> dict:
    config = {
        "name": "tiny_protocol", "protocol": "autovi", "data_root": str(tmp_path / "data"),
        "methods": [{"name": "patchcore", "options": {"coreset_ratio": 0.5}},
                    {"name": "padim", "options": {"reduced_dim": 20}},
                    {"name": "not_a_method_yet", "optional": True, "seeds": [0]}],
        "image_size": SIDE, "categories": [{"path": "cat_*"}], "seeds": [0, 1],
        "experiments": {"augmentation": {"methods": ["patchcore"], "copies": 1, "seeds": [0, 1]},
                        "window": {"methods": ["patchcore"], "sizes": [300, 600], "reference_side": 600, "seeds": [0]},
                        "few_shot": {"methods": ["patchcore"], "shots": [1, 3], "draws": 2}},
        "batch_sizes": [1], "timing_images": 1, "timing_repeats": 1,
        "detector": {"batch_size": 8, "calibration_folds": 2}, "start_method": "inline", "threads": 1,
    }
    config.update(changes)
    return config


def test_protocol_jobs_expand_every_experiment(tmp_path: Path) -> None:
    make_category(tmp_path / "data" / "cat_a")
    config = load_protocol_config(_config(tmp_path))
    jobs = protocol_jobs(config)
    by_experiment = {}
    for job in jobs:
        by_experiment.setdefault(job["experiment"], []).append(job)
    assert len(by_experiment["main"]) == 2 + 2 + 1  # patchcore, padim x 2 seeds; the optional one 1 seed
    assert {(j["variant"], j["augment"]["copies"]) for j in by_experiment["augmentation"]} == {("autovi x1", 1)}
    assert sorted(j["window"]["size"] for j in by_experiment["window"]) == [300, 600]
    assert sorted((j["train_subset"], j["seed"]) for j in by_experiment["few_shot"]) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(j["batch_sizes"] == [] for j in jobs if j["experiment"] != "main")  # timing only in main
    assert all(j["train_thresholds"] for j in jobs)
    only = protocol_jobs(config, ["main"], ["padim"])
    assert {(j["experiment"], j["method"]) for j in only} == {("main", "padim")}
    with pytest.raises(ConfigError, match="unknown experiment"):
        protocol_jobs(config, ["nope"])
    eight = load_protocol_config({k: v for k, v in _config(tmp_path).items() if k != "seeds"})
    assert eight.seeds == list(range(8))  # the protocol's default: eight seeds


# ------------------------------------------------------------------------------ tables
def _record(experiment: str, variant: str, category: str, method: str, seed: int, auroc: float, status="ok") -> dict:
    return {"config": "c", "experiment": experiment, "variant": variant, "category": category, "method_label": method,
            "method": method, "backbone": "b", "seed": seed, "status": status, "fit_s": 60.0, "eval_ms_per_image": 5.0,
            "error": None if status == "ok" else "ConfigError: method 'x' is not registered\ntrace",
            "metrics": {"image_auroc": auroc, "image_ap": auroc} if status == "ok" else {}}


def test_tables_mark_the_best_with_welch_and_show_failed_rows() -> None:
    records = [_record("main", "", "a", "pc", s, 0.90 + 0.01 * s) for s in range(3)]
    records += [_record("main", "", "a", "pd", s, 0.50 + 0.01 * s) for s in range(3)]
    records += [_record("main", "", "a", "x", 0, 0.0, status="error")]
    auroc = main_tables(records)[0]
    assert auroc.header == ["Category", "pc", "pd", "x"]
    assert auroc.rows[0] == ["a", "**0.910 ± 0.010**", "0.510 ± 0.010", "failed"]
    assert "not registered" in auroc.note
    augmented = [_record("augmentation", "autovi x1", "a", "pc", s, 0.80 + 0.01 * s) for s in range(3)]
    table = comparison_table(records + augmented, "augmentation", "Augmentation")[0]
    assert table.rows[0][:4] == ["a", "pc", "**0.910 ± 0.010**", "0.810 ± 0.010"]
    assert table.rows[0][4] == "-0.100" and table.rows[0][6] == "worse" and float(table.rows[0][5]) < 0.01
    same = [_record("augmentation", "autovi x1", "a", "pc", s, 0.905 + 0.01 * s) for s in range(3)]
    assert comparison_table(records + same, "augmentation", "Augmentation")[0].rows[0][6] == "no significant difference"
    windows = [_record("window", f"{w} px", "a", "pc", s, value + 0.001 * s)
               for w, value in ((200, 0.7), (600, 0.9)) for s in range(3)]
    window = window_tables(windows)[0]
    assert window.rows[0][:3] == ["a · pc", "0.701 ± 0.001", "**0.901 ± 0.001**"]


def test_latest_records_prefer_success_and_the_latest_run() -> None:
    old = _record("main", "", "a", "pc", 0, 0.5)
    new = _record("main", "", "a", "pc", 0, 0.7)
    failed = _record("main", "", "a", "pc", 0, 0.0, status="error")
    assert latest_records([old, new, failed])[0]["metrics"]["image_auroc"] == 0.7


# ------------------------------------------------------------------------------ end to end
def test_the_protocol_runs_end_to_end_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEFECTLENS_DATA", raising=False)
    make_autovi_category(tmp_path / "data" / "cat_a")
    config = _config(tmp_path, methods=[{"name": "patchcore", "options": {"coreset_ratio": 0.5}},
                                        {"name": "not_a_method_yet", "optional": True, "seeds": [0]}], seeds=[0, 1])
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["benchmark", "--config", str(path), "--out", str(out), "-q"]) == 1  # the unregistered method failed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(records) == 3 + 2 + 2 + 4 and len(ok) == len(records) - 1
    failed = [r for r in records if r["status"] != "ok"][0]
    assert failed["method"] == "not_a_method_yet" and "not registered" in failed["error"]
    main_runs = [r for r in ok if r["experiment"] == "main"]
    assert all(r["metrics"]["auspro_all_0.05"] is not None for r in main_runs)  # AutoVI ground truth: AUsPRO
    assert all(0.0 <= r["metrics"]["train_tpr_at_tnr_0.95"] <= 1.0 for r in main_runs)
    assert {r["train"]["fitted_on"] for r in ok if r["experiment"] == "augmentation"} == {12}  # 6 images + 6 copies
    assert sorted(r["train"]["fitted_on"] for r in ok if r["experiment"] == "few_shot") == [1, 1, 3, 3]
    half = [r for r in ok if r["experiment"] == "window" and r["variant"] == "300 px"][0]
    assert half["window_info"]["window"]["size"] == 300
    for name in ("tiny_protocol.md", "tiny_protocol.json", "tiny_protocol.csv", "tiny_protocol.html", "few_shot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    markdown = (out / "tiny_protocol.md").read_text()
    assert "Image AUROC (Table 6)" in markdown and "failed" in markdown and "Few-shot" in markdown
    # resuming runs only what has no successful record: the unregistered method again
    again = run_protocol(load_protocol_config(path), out, resume=True)
    assert [r["method"] for r in again.benchmark.records] == ["not_a_method_yet"]
    assert len(again.records) == len(records)
