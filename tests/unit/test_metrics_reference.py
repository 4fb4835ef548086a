"""Our metrics against the official MVTec AD / MVTec LOCO numbers (shared reference fixtures).

Fixtures: ``../shared/reference/metrics`` relative to the repository root, or
``$DEFECTLENS_REFERENCE`` (the reference root holding ``metrics/``, or the metrics folder
itself). Missing fixtures skip these tests with a message, except under CI (``CI=true``),
where they fail.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectlens.metrics import (
    aupro,
    auspro,
    channels_per_image,
    image_auroc,
    load_defects_config,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
    spro_curve,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SEGMENTATION_CASES = ("stripes", "random_blobs", "ties", "touching_regions",
                      "all_good_image_included", "tiny_regions", "large_maps")
SPRO_CASES = ("spro_mixed", "spro_quantized", "spro_stripes")


def _reference_dir() -> Path | None:
    configured = os.environ.get("DEFECTLENS_REFERENCE")
    candidates = ([Path(configured) / "metrics", Path(configured)] if configured
                  else [REPO_ROOT.parent / "shared" / "reference" / "metrics"])
    for candidate in candidates:
        if (candidate / "expected.json").is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def reference() -> Path:
    found = _reference_dir()
    if found is None:
        message = ("metric reference fixtures not found (../shared/reference/metrics or "
                   "$DEFECTLENS_REFERENCE)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@lru_cache(maxsize=None)
def _expected(directory: str) -> dict[str, Any]:
    return json.loads((Path(directory) / "expected.json").read_text())["cases"]


def _case(reference: Path, name: str) -> tuple[dict[str, Any], Any]:
    case = _expected(str(reference))[name]
    return case, np.load(reference / case["file"])


def _limits(values: dict[str, float]) -> dict[float, float]:
    return {float(key): value for key, value in values.items()}


def test_every_reference_case_is_tested(reference: Path) -> None:
    assert set(_expected(str(reference))) == set(SEGMENTATION_CASES) | set(SPRO_CASES)


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_segmentation_case(reference: Path, name: str) -> None:
    case, data = _case(reference, name)
    maps, masks, labels = data["anomaly_maps"], data["masks"], data["labels"]
    expected = case["expected"]
    official = _limits(expected["aupro"]["values"])
    exact = _limits(case["cross_checks"]["aupro_float64_exact"]["values"])

    ours = aupro(maps, masks, limits=official)
    for limit, value in official.items():
        assert ours[limit] == pytest.approx(value, abs=1e-7), limit
    for limit, value in exact.items():
        assert ours[limit] == pytest.approx(value, abs=1e-12), limit
    for limit, value in _limits(expected.get("aupro_analytic", {}).get("values", {})).items():
        assert ours[limit] == pytest.approx(value, abs=1e-12), limit

    assert pixel_auroc(maps, masks) == pytest.approx(expected["pixel_auroc"]["value"], abs=1e-9)

    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    expected_image = expected["image_auroc"]["value"]
    if expected_image is None:
        assert image_auroc(image_scores, labels) is None
    else:
        assert image_auroc(image_scores, labels) == pytest.approx(expected_image, abs=1e-9)

    # the official point list: one point per distinct score, plus (0, 0) and (1, 1)
    full = pro_curve(maps, masks, merge_collinear=False)
    assert full is not None and len(full.fpr) == expected["pro_curve_points"]["value"]
    # the compact curve has the same shape: same areas; and so has the combined call
    compact = pro_curve(maps, masks)
    combined = pixel_metrics(maps, masks, limits=official)
    for limit in official:
        assert compact.area(limit) == pytest.approx(ours[limit], abs=1e-12)
        assert full.area(limit) == pytest.approx(ours[limit], abs=1e-12)
        assert combined.aupro[limit] == ours[limit]
    assert combined.auroc == pytest.approx(expected["pixel_auroc"]["value"], abs=1e-9)
    assert combined.num_regions == case["num_regions_8conn"]


def test_ties_pro_curve_matches_official(reference: Path) -> None:
    case, data = _case(reference, "ties")
    official = case["expected"]["pro_curve"]
    curve = pro_curve(data["anomaly_maps"], data["masks"], merge_collinear=False)
    assert curve is not None
    # the official FPR is float32 (up to 6e-8 off); PRO is float64
    np.testing.assert_allclose(curve.fpr, official["fpr"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(curve.pro, official["pro"], rtol=0, atol=1e-12)
    assert curve.thresholds[0] == np.inf and curve.thresholds[-1] == -np.inf
    np.testing.assert_array_equal(curve.thresholds[1:-1], np.arange(250, -1, -25))


def test_lazy_loaders_give_identical_results(reference: Path) -> None:
    _, data = _case(reference, "random_blobs")
    maps, masks = data["anomaly_maps"], data["masks"]
    map_loaders = [lambda index=index: maps[index] for index in range(len(maps))]
    mask_loaders = [lambda index=index: masks[index] for index in range(len(masks))]
    eager = pixel_metrics(maps, masks)
    lazy = pixel_metrics(map_loaders, mask_loaders)
    assert lazy.aupro == eager.aupro and lazy.auroc == eager.auroc


def _spro_inputs(data: Any) -> tuple[np.ndarray, list[list[np.ndarray]], list[dict[str, Any]]]:
    maps = data["anomaly_maps"]
    channels = channels_per_image(data["channels"], data["channel_image"], len(maps))
    return maps, channels, json.loads(str(data["defects_config_json"]))


@pytest.mark.parametrize("name", SPRO_CASES)
def test_spro_case(reference: Path, name: str) -> None:
    case, data = _case(reference, name)
    maps, channels, config = _spro_inputs(data)
    expected = case["expected"]

    ours = auspro(maps, channels, config)
    for limit, value in _limits(expected["auspro"]["values"]).items():
        assert ours[limit] == pytest.approx(value, abs=1e-12), limit
    for limit, value in _limits(expected.get("auspro_analytic", {}).get("values", {})).items():
        assert ours[limit] == pytest.approx(value, abs=1e-12), limit

    # LOCO's exhaustive run uses every distinct score plus one below the minimum
    full = spro_curve(maps, channels, config, merge_collinear=False)
    assert full is not None and len(full.fpr) == expected["auspro"]["num_thresholds"]
    compact = spro_curve(maps, channels, config)
    for limit in ours:
        assert compact.area(limit) == pytest.approx(ours[limit], abs=1e-12)

    if "image_auroc" in expected:
        scores = maps.reshape(len(maps), -1).max(axis=1)
        assert image_auroc(scores, data["labels"]) == pytest.approx(
            expected["image_auroc"]["value"], abs=1e-9)


@pytest.mark.parametrize("name", ("spro_mixed", "spro_quantized"))
def test_spro_channel_areas_match_loco(reference: Path, name: str) -> None:
    case, data = _case(reference, name)
    config = load_defects_config(json.loads(str(data["defects_config_json"])))
    listed = case["channels"]["list"]
    assert len(listed) == len(data["channels"])
    for channel, image, entry in zip(data["channels"], data["channel_image"], listed):
        defect = config[entry["pixel_value"]]
        area = int(np.count_nonzero(channel))
        assert int(image) == entry["image"] and defect.defect_name == entry["defect_name"]
        assert area == entry["defect_area"]
        assert defect.saturation_area(area) == entry["saturation_area"]


def test_spro_quantized_curve_matches_loco(reference: Path) -> None:
    case, data = _case(reference, "spro_quantized")
    maps, channels, config = _spro_inputs(data)
    official = case["expected"]["spro_curve"]
    curve = spro_curve(maps, channels, config, merge_collinear=False)
    assert curve is not None
    np.testing.assert_allclose(curve.fpr, official["fpr"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.mean_spro, official["mean_spro"], rtol=0, atol=1e-12)
    # strict thresholds; LOCO's last one is min - 1e-6, ours -inf (both: everything positive)
    np.testing.assert_array_equal(curve.thresholds[:-1], official["threshold_exclusive"][:-1])
    assert curve.thresholds[-1] == -np.inf
