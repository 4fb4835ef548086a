"""sPRO / AUsPRO: brute force over every threshold, saturation pitfalls, LOCO loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.errors import DatasetError
from defectlens.metrics import (
    DefectType,
    LocoGroundTruth,
    aupro,
    auspro,
    load_defects_config,
    spro_curve,
    trapezoid_area,
)

LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)
CONFIG = [
    {"defect_name": "full", "pixel_value": 255, "saturation_threshold": 1.0,
     "relative_saturation": True},
    {"defect_name": "half", "pixel_value": 200, "saturation_threshold": 0.5,
     "relative_saturation": True},
    {"defect_name": "small", "pixel_value": 100, "saturation_threshold": 7,
     "relative_saturation": False},
    {"defect_name": "huge", "pixel_value": 50, "saturation_threshold": 100000,
     "relative_saturation": False},
]


def naive_auspro(maps, channels_per_image, config, limits=LIMITS):
    """LOCO's definitions applied literally at every distinct score (+ one below all)."""
    by_value = {entry["pixel_value"]: entry for entry in config}
    all_scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.concatenate((np.unique(all_scores)[::-1], [all_scores.min() - 1e-6]))
    fprs, spros = [], []
    negatives = sum(m.size - np.count_nonzero(np.any([c != 0 for c in chs], axis=0))
                    if chs else m.size for m, chs in zip(maps, channels_per_image))
    for threshold in thresholds:
        false_positives, values = 0, []
        for score_map, channels in zip(maps, channels_per_image):
            positive = score_map > threshold
            union = np.zeros(score_map.shape, bool)
            for channel in channels:
                entry = by_value[int(channel.max())]
                area = np.count_nonzero(channel)
                saturation = (np.floor(entry["saturation_threshold"] * area)
                              if entry["relative_saturation"]
                              else min(entry["saturation_threshold"], area))
                values.append(min(np.count_nonzero(positive & (channel != 0)) / saturation, 1.0))
                union |= channel != 0
            false_positives += np.count_nonzero(positive & ~union)
        fprs.append(false_positives / negatives)
        spros.append(np.mean(values))
    return {limit: trapezoid_area(np.array(fprs), np.array(spros), limit) / limit
            for limit in limits}


def _synthetic(seed: int, levels: int | None = None):
    rng = np.random.default_rng(seed)
    shapes = [(24, 24), (24, 24), (20, 30), (24, 24), (18, 18)]
    maps, truth = [], []
    for index, shape in enumerate(shapes):
        score_map = rng.random(shape)
        channels = []
        if index != 0:
            for value in rng.choice([255, 200, 100, 50], size=2, replace=False):
                channel = np.zeros(shape, np.uint8)
                row, col = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
                channel[row:row + rng.integers(2, 7), col:col + rng.integers(2, 7)] = value
                if value == 200:  # a two-blob channel
                    channel[0:2, 0:3] = value
                score_map[channel != 0] += rng.uniform(0.0, 0.7)
                channels.append(channel)
        if levels:
            score_map = np.floor(score_map / score_map.max() * levels)
        maps.append(score_map.astype(np.float32))
        truth.append(channels)
    return maps, truth


@pytest.mark.parametrize("levels", [None, 8])
def test_auspro_matches_brute_force_over_every_threshold(levels: int | None) -> None:
    maps, truth = _synthetic(0, levels)
    expected = naive_auspro(maps, truth, CONFIG)
    ours = auspro(maps, truth, CONFIG)
    for limit in LIMITS:
        assert ours[limit] == pytest.approx(expected[limit], abs=1e-12)
    curve = spro_curve(maps, truth, CONFIG, merge_collinear=False)
    assert len(curve.fpr) == len(np.unique(np.concatenate([m.ravel() for m in maps]))) + 1
    for limit in LIMITS:
        assert curve.area(limit) == pytest.approx(expected[limit], abs=1e-12)
        assert spro_curve(maps, truth, CONFIG).area(limit) == pytest.approx(expected[limit],
                                                                           abs=1e-12)


def test_relative_full_saturation_with_one_channel_per_region_equals_aupro() -> None:
    rng = np.random.default_rng(1)
    maps, masks, truth = [], [], []
    for index in range(5):
        score_map = rng.random((20, 20)).astype(np.float32)
        mask = np.zeros((20, 20), np.uint8)
        channels = []
        if index % 2:
            for row, col in ((2, 2), (12, 10)):
                channel = np.zeros((20, 20), np.uint8)
                channel[row:row + 4, col:col + 5] = 255
                channels.append(channel)
                mask |= channel
        maps.append(score_map)
        masks.append(mask)
        truth.append(channels)
    ours = auspro(maps, truth, CONFIG)
    reference = aupro(maps, masks, limits=LIMITS)
    for limit in LIMITS:
        assert ours[limit] == pytest.approx(reference[limit], abs=1e-12)


def test_saturation_area_rules() -> None:
    relative = DefectType("half", 200, 0.5, True)
    assert relative.saturation_area(441) == 220  # floor(220.5)
    absolute = DefectType("small", 100, 150, False)
    assert absolute.saturation_area(720) == 150
    assert absolute.saturation_area(40) == 40  # above the area: falls back to the area


def test_relative_saturation_rounding_to_zero_is_an_error_or_one_pixel() -> None:
    config = [{"defect_name": "tiny", "pixel_value": 9, "saturation_threshold": 0.4,
               "relative_saturation": True}]
    score_map = np.zeros((6, 6), np.float32)
    score_map[2, 2] = 1.0
    channel = np.zeros((6, 6), np.uint8)
    channel[2, 2] = 9  # 1 pixel * 0.4 -> 0 pixels
    with pytest.raises(ValueError, match=r"image 0, channel 0.*'tiny'.*rounds down to 0"):
        auspro([score_map], [[channel]], config)
    # one_pixel: found once its pixel is flagged; here it scores highest -> perfect
    result = auspro([score_map], [[channel]], config, on_zero_saturation="one_pixel")
    assert result[1.0] == pytest.approx(1.0)
    assert result[0.01] == pytest.approx(1.0)


def test_channel_errors() -> None:
    score_map = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="exactly one non-zero"):
        auspro([score_map], [[np.zeros((4, 4), np.uint8)]], CONFIG)
    unknown = np.zeros((4, 4), np.uint8)
    unknown[0, 0] = 7
    with pytest.raises(ValueError, match="not in the defects config"):
        auspro([score_map], [[unknown]], CONFIG)
    with pytest.raises(ValueError, match="outside"):
        DefectType("bad", 1, 1.5, True)


def test_no_channel_at_all_gives_none() -> None:
    maps = [np.random.default_rng(2).random((5, 5)) for _ in range(2)]
    assert auspro(maps, [[], None], CONFIG) == {limit: None for limit in LIMITS}
    assert spro_curve(maps, [[], None], CONFIG) is None


def _write_loco_category(root: Path, maps_truth) -> list[str]:
    (root / "defects_config.json").write_text(json.dumps(CONFIG))
    keys = []
    for index, channels in enumerate(maps_truth):
        defect_type = "logical_anomalies" if channels else "good"
        stem = f"{index:03d}"
        (root / "test" / defect_type).mkdir(parents=True, exist_ok=True)
        image_path = root / "test" / defect_type / f"{stem}.png"
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(image_path)
        if channels:
            folder = root / "ground_truth" / defect_type / stem
            folder.mkdir(parents=True)
            for number, channel in enumerate(channels):
                Image.fromarray(channel).save(folder / f"{number:03d}.png")
        keys.append(f"{defect_type}/{stem}.png")
    return keys


def test_loco_ground_truth_loader(tmp_path: Path) -> None:
    maps, truth = _synthetic(3)
    keys = _write_loco_category(tmp_path, truth)
    ground_truth = LocoGroundTruth(tmp_path, keys)
    assert len(ground_truth) == len(maps)
    assert ground_truth[0] == []
    for loaded, original in zip(ground_truth, truth):
        assert len(loaded) == len(original)
        for a, b in zip(loaded, original):
            np.testing.assert_array_equal(a, b)
    assert auspro(maps, ground_truth, ground_truth.defects_config) == auspro(maps, truth, CONFIG)
    # default listing: every test/*/*.png, sorted
    listed = LocoGroundTruth(tmp_path)
    assert sorted(listed.test_images) == sorted(k[:-4] for k in keys)
    missing = LocoGroundTruth(tmp_path, ["structural_anomalies/000"])
    with pytest.raises(DatasetError, match="no ground truth"):
        missing[0]


def test_load_defects_config_forms(tmp_path: Path) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(CONFIG))
    from_path = load_defects_config(path)
    assert from_path == load_defects_config(str(path)) == load_defects_config(CONFIG)
    assert from_path == load_defects_config(json.dumps(CONFIG))
    assert from_path[200].saturation_threshold == 0.5
    with pytest.raises(DatasetError):
        load_defects_config(tmp_path / "missing.json")
