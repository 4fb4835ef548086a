"""`defectlens benchmark`: config parsing, runs, result files, Welch-marked summary tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.benchmark import (
    execute_jobs,
    load_config,
    mark_best,
    read_results,
    run_benchmark,
    significantly_different,
    summary_tables,
)
from defectlens.cli import main
from defectlens.errors import ConfigError, DatasetError

SIDE = 64


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_category(root: Path, seed: int = 0, train: int = 6, good: int = 3, defective: int = 3) -> Path:
    """Smooth stripes with mild noise; defects are bright squares (exact masks)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE]

    def normal() -> np.ndarray:
        base = 0.5 + 0.25 * np.sin(x / 5.0 + rng.uniform(0, 0.3))[..., None] * np.array([1.0, 0.8, 0.6])
        return np.clip(base + rng.normal(0, 0.02, (SIDE, SIDE, 3)), 0, 1)

    for index in range(train):
        _save(root / "train" / "good" / f"{index:03d}.png", (normal() * 255).astype(np.uint8))
    for index in range(good):
        _save(root / "test" / "good" / f"{index:03d}.png", (normal() * 255).astype(np.uint8))
    for index in range(defective):
        image = normal()
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        top, left = rng.integers(8, SIDE - 24, size=2)
        mask[top : top + 14, left : left + 14] = 255
        image[mask > 0] = (1.0, 0.1, 0.1)
        _save(root / "test" / "spot" / f"{index:03d}.png", (image * 255).astype(np.uint8))
        _save(root / "ground_truth" / "spot" / f"{index:03d}_mask.png", mask)
    return root


def tiny_config(tmp_path: Path, **changes) -> dict:
    config = {
        "name": "tiny",
        "data_root": str(tmp_path / "data"),
        "methods": [{"name": "patchcore", "options": {"coreset_ratio": 0.5}}, {"name": "padim", "options": {"reduced_dim": 20}}],
        "backbones": ["efficientnet_lite0"],
        "image_size": SIDE,
        "categories": [{"path": "cat_*"}],
        "seeds": [0, 1],
        "batch_sizes": [1, 2],
        "timing_images": 2,
        "timing_repeats": 1,
        "detector": {"batch_size": 8, "calibration_images": 4, "calibration_folds": 2},
        "start_method": "inline",
        "threads": 1,
    }
    config.update(changes)
    return config


def test_load_config_json_toml_globs_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEFECTLENS_DATA", raising=False)
    for name in ("cat_a", "cat_b"):
        (tmp_path / "data" / name / "test").mkdir(parents=True)
    (tmp_path / "data" / "notes").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "c.toml").write_text(
        'name = "t"\ndata_root = "../data"\nseeds = [0, 1, 2]\nbatch_sizes = [1, 4]\n'
        '[[methods]]\nname = "padim"\noptions = { covariance = "tied" }\n'
        '[[categories]]\npath = "cat_*"\nimage_size = 96\n'
        '[[categories]]\npath = "cat_a"\nname = "again"\n'
    )
    config = load_config(tmp_path / "bench" / "c.toml")
    assert [c.name for c in config.categories] == ["cat_a", "cat_b", "again"]
    assert [c.image_size for c in config.categories] == [96, 96, 256]
    assert config.methods[0].options == {"covariance": "tied"}
    assert len(config.jobs()) == 3 * 3 and config.start_method == "spawn"
    monkeypatch.setenv("DEFECTLENS_DATA", str(tmp_path / "data"))
    (tmp_path / "c.json").write_text(json.dumps({"methods": ["patchcore"], "categories": ["cat_b"], "data_root": "/nope"}))
    assert load_config(tmp_path / "c.json").categories[0].path == tmp_path / "data" / "cat_b"
    with pytest.raises(ConfigError, match="unknown method"):
        load_config({"methods": ["nope"], "categories": ["cat_a"]})
    with pytest.raises(DatasetError, match="no category folder"):
        load_config({"methods": ["padim"], "categories": ["zzz_*"]})
    with pytest.raises(ConfigError, match="seeds"):
        load_config({"methods": ["padim"], "categories": ["cat_a"], "seeds": []})


def test_welch_marking() -> None:
    groups = {"a": [0.90, 0.91, 0.92], "b": [0.50, 0.51, 0.52], "c": [0.88, 0.93, 0.91], "d": []}
    marks = mark_best(groups, higher_is_better=True)
    assert marks == {"a": "best", "b": "", "c": "tie", "d": ""}
    assert mark_best({"fast": [1.0, 1.1], "slow": [5.0, 5.2]}, higher_is_better=False) == {"fast": "best", "slow": ""}
    assert not significantly_different([0.5, 0.5], [0.5, 0.5])  # equal constants: no difference
    assert significantly_different([0.5, 0.5], [0.6, 0.6])  # zero variance, different means
    assert significantly_different([0.5], [0.6])  # one seed: cannot test, differing means differ


def test_summary_table_marks_best_and_ties() -> None:
    def record(category, method, seed, auroc):
        return {"status": "ok", "category": category, "method_label": method, "backbone": "bb", "seed": seed,
                "metrics": {"image_auroc": auroc, "pixel_auroc": 0.9}, "fit_s": 1.0 + seed,
                "infer_ms_per_image": {"1": 10.0, "16": 4.0}, "peak_rss_mb": 500.0, "model_mb": 1.0}

    records = [record("x", "good", s, 0.95 + 0.01 * s) for s in range(3)]
    records += [record("x", "close", s, 0.94 + 0.02 * s) for s in range(3)]
    records += [record("x", "bad", s, 0.60 + 0.01 * s) for s in range(3)]
    records += [record("y", m, s, 0.8) for m in ("good", "close", "bad") for s in range(3)]
    table = summary_tables(records)
    quality = table.split("### Cost")[0]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in quality.splitlines() if line.startswith("| x")}
    assert "**0.960 ± 0.010**" in rows[("x", "good", "bb")]
    assert "*0.960 ± 0.020*" in rows[("x", "close", "bb")] and "**0.960 ± 0.020**" not in rows[("x", "close", "bb")]
    assert " 0.610 ± 0.010 |" in rows[("x", "bad", "bb")] and "*0.610" not in rows[("x", "bad", "bb")]
    assert "mean (2)" in table and "Welch" in table and "ms/img b16" in table


def test_benchmark_tiny_end_to_end(tmp_path: Path) -> None:
    make_category(tmp_path / "data" / "cat_a", seed=0)
    config = load_config(tiny_config(tmp_path))
    result = run_benchmark(config, tmp_path / "out")
    assert result.failures == 0, [r.get("error") for r in result.records]
    assert len(result.records) == 4
    record = result.records[0]
    assert record["metrics"]["image_auroc"] is not None and record["model_mb"] > 0 and record["peak_rss_mb"] > 0
    assert set(record["infer_ms_per_image"]) == {"1", "2"} and record["report"]["pixel"]["aupro"]["0.3"] is not None
    assert "**" in result.table and "± " in result.table
    assert "| cat_a" in result.table and "patchcore" in result.table and "padim" in result.table
    with open(result.csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {"image_auroc", "aupro_0.3", "infer_ms_b1", "infer_ms_b2", "peak_rss_mb"} <= set(rows[0])
    # a second benchmark appends (results can be compared over time)
    second = run_benchmark(load_config(tiny_config(tmp_path, seeds=[5], methods=["padim"])), tmp_path / "out")
    assert len(read_results(result.jsonl_path)) == 5 and len(read_results(result.jsonl_path, second.run_id)) == 1
    with open(result.csv_path, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert result.summary_path.read_text().startswith("# Benchmark tiny")


def test_benchmark_failure_is_recorded_not_fatal(tmp_path: Path) -> None:
    root = make_category(tmp_path / "data" / "cat_a", train=1)
    for file in (root / "train" / "good").iterdir():
        file.write_bytes(b"not a png")
    config = load_config(tiny_config(tmp_path, methods=["padim"], seeds=[0]))
    records = list(execute_jobs(config.jobs(), "inline"))
    assert records[0]["status"] == "error" and "ImageFormatError: cannot read image" in records[0]["error"]


@pytest.mark.slow
def test_benchmark_cli_runs_each_job_in_a_fresh_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_category(tmp_path / "data" / "cat_a", seed=1)
    config = tiny_config(tmp_path, methods=["padim"], seeds=[0], start_method="spawn", batch_sizes=[1])
    (tmp_path / "bench.json").write_text(json.dumps(config))
    assert main(["benchmark", "--config", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Detection quality" in out and "Cost (this machine)" in out
    record = read_results(tmp_path / "out" / "results.jsonl")[0]
    assert record["status"] == "ok" and record["start_method"] == "spawn" and record["peak_rss_mb"] > 50
