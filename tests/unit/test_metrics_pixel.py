"""Pixel AUROC, AUPRO, PRO curve and pixel F1: edge cases and a naive reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from defectlens.metrics import (
    aupro,
    image_auroc,
    pixel_auroc,
    pixel_classification_at_threshold,
    pixel_f1_max,
    pixel_metrics,
    pro_curve,
    trapezoid_area,
)

LIMITS = (0.3, 0.1, 0.05, 0.01, 1.0)


def naive_aupro(maps: list[np.ndarray], masks: list[np.ndarray | None],
                limits: tuple[float, ...] = LIMITS) -> dict[float, float]:
    """The official algorithm (global sort, cumsum, last point of each tie run) in float64,
    on flattened images so that sizes may differ."""
    scores, fp_change, pro_change = [], [], []
    regions = 0
    for score_map, mask in zip(maps, masks):
        mask = np.zeros(score_map.shape, bool) if mask is None else mask != 0
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        sizes = np.bincount(labeled.ravel())
        change = np.where(labeled > 0, 1.0 / sizes[labeled], 0.0)
        scores.append(score_map.ravel().astype(np.float64))
        fp_change.append((labeled == 0).ravel())
        pro_change.append(change.ravel())
        regions += count
    flat = np.concatenate(scores)
    order = np.argsort(flat, kind="stable")[::-1]
    ok = np.concatenate(fp_change)
    fpr = np.cumsum(ok[order]) / ok.sum()
    pro = np.cumsum(np.concatenate(pro_change)[order]) / regions
    keep = np.append(np.diff(flat[order]) != 0, True)
    fpr = np.concatenate(([0.0], np.minimum(fpr[keep], 1), [1.0]))
    pro = np.concatenate(([0.0], np.minimum(pro[keep], 1), [1.0]))
    return {limit: trapezoid_area(fpr, pro, limit) / limit for limit in limits}


def _random_case(seed: int, shapes: list[tuple[int, int]], levels: int | None = None,
                 dtype: type = np.float32) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index, shape in enumerate(shapes):
        score_map = rng.random(shape)
        mask = np.zeros(shape, dtype=np.uint8)
        if index % 3 != 0:
            for _ in range(int(rng.integers(1, 4))):
                row, col = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                height, width = rng.integers(1, 9), rng.integers(1, 9)
                mask[row:row + height, col:col + width] = 255
                score_map[row:row + height, col:col + width] += rng.uniform(0, 0.8)
        if levels is not None:
            score_map = np.floor(score_map * levels / score_map.max())
        maps.append(score_map.astype(dtype))
        masks.append(mask if index % 3 else None)
    return maps, masks


@pytest.mark.parametrize("levels", [None, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_naive_official_algorithm_with_mixed_sizes(levels: int | None,
                                                           dtype: type) -> None:
    shapes = [(32, 32), (31, 32), (40, 17), (32, 32), (5, 64), (23, 29), (32, 32)]
    maps, masks = _random_case(1, shapes, levels, dtype)
    expected = naive_aupro(maps, masks)
    ours = aupro(maps, masks)
    for limit in LIMITS:
        assert ours[limit] == pytest.approx(expected[limit], abs=1e-12)
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([(np.zeros(m.shape) if k is None else k != 0).ravel()
                                  for m, k in zip(maps, masks)])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(flat_labels, flat_scores),
                                                     abs=1e-12)
    full = pro_curve(maps, masks, merge_collinear=False)
    compact = pro_curve(maps, masks)
    assert len(full.fpr) == len(np.unique(flat_scores)) + 2
    assert len(compact.fpr) <= len(full.fpr)
    # compact points are official points; the others lie on horizontal segments, at the
    # height of the next compact point (thresholds descend in both curves)
    nearest = np.searchsorted(-compact.thresholds, -full.thresholds, side="left")
    np.testing.assert_allclose(full.pro, compact.pro[nearest], rtol=0, atol=1e-12)
    shared = compact.thresholds[nearest] == full.thresholds
    assert shared.sum() == len(compact.fpr)
    np.testing.assert_allclose(full.fpr[shared], compact.fpr, rtol=0, atol=1e-15)
    for limit in LIMITS:
        assert compact.area(limit) == pytest.approx(expected[limit], abs=1e-12)


def test_integer_maps_and_bool_masks() -> None:
    maps, masks = _random_case(2, [(20, 20)] * 6, levels=9)
    int_maps = [m.astype(np.uint8) for m in maps]
    bool_masks = [None if k is None else k > 0 for k in masks]
    assert aupro(int_maps, bool_masks) == aupro(maps, masks)


def test_no_defective_image_gives_none() -> None:
    maps = [np.random.default_rng(0).random((8, 8)).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((8, 8), np.uint8), None, np.zeros((8, 8), np.uint8)]
    assert aupro(maps, masks) == {limit: None for limit in LIMITS}
    assert pixel_auroc(maps, masks) is None
    assert pro_curve(maps, masks) is None
    assert pixel_f1_max(maps, masks) == (None, None)
    result = pixel_metrics(maps, masks)
    assert result.auroc is None and result.pro_curve is None and result.num_regions == 0
    assert image_auroc([m.max() for m in maps], [0, 0, 0]) is None


def test_all_pixels_defective_gives_none() -> None:
    maps = [np.arange(16, dtype=np.float32).reshape(4, 4)]
    masks = [np.full((4, 4), 255, np.uint8)]
    assert aupro(maps, masks)[0.3] is None
    assert pixel_auroc(maps, masks) is None


def test_all_equal_scores() -> None:
    maps = [np.full((10, 10), 0.5, np.float32) for _ in range(4)]
    masks = [None, np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8), None]
    masks[1][2:5, 2:5] = 255
    masks[2][7:, 0:3] = 1
    assert pixel_auroc(maps, masks) == 0.5
    assert image_auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 1, 0]) == 0.5
    # one tie run: the curve is the straight line (0, 0) - (1, 1), area L^2 / 2, over L
    result = aupro(maps, masks)
    for limit in LIMITS:
        assert result[limit] == pytest.approx(limit / 2, abs=1e-15)
    curve = pro_curve(maps, masks, merge_collinear=False)
    np.testing.assert_array_equal(curve.fpr, [0, 1, 1])


def test_region_with_hole_is_one_region_and_hole_pixels_are_negatives() -> None:
    mask = np.zeros((9, 9), np.uint8)
    mask[1:8, 1:8] = 255
    mask[3:6, 3:6] = 0  # a 3x3 hole: 9 defect-free pixels inside the ring
    score_map = np.zeros((9, 9), np.float32)
    score_map[mask > 0] = 0.5  # the ring
    score_map[3:6, 3:6] = 1.0  # the hole scores highest
    good = np.zeros((9, 9), np.float32)
    result = pixel_metrics([score_map, good], [mask, None])
    assert result.num_regions == 1
    assert result.num_defect_pixels == 49 - 9
    assert result.num_defect_free_pixels == 81 - 40 + 81
    # curve: hole first -> (9/122, 0), then the ring -> (9/122, 1), then the rest -> (1, 1)
    curve = result.pro_curve
    np.testing.assert_allclose(curve.fpr[:4], [0, 9 / 122, 9 / 122, 1])
    np.testing.assert_allclose(curve.pro[:4], [0, 0, 1, 1])
    expected = naive_aupro([score_map, good], [mask, None])
    for limit in LIMITS:
        assert result.aupro[limit] == pytest.approx(expected[limit], abs=1e-12)


def test_diagonal_touching_pixels_form_one_region() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 255  # 8-connected: one region of 3 pixels
    mask[5, 0] = 255  # another region
    score_map = np.random.default_rng(3).random((6, 6)).astype(np.float32)
    assert pixel_metrics([score_map], [mask]).num_regions == 2
    assert aupro([score_map], [mask])[0.3] == pytest.approx(
        naive_aupro([score_map], [mask])[0.3], abs=1e-12)


def test_maps_are_read_exactly_twice_from_a_lazy_sequence() -> None:
    maps, masks = _random_case(4, [(16, 16)] * 5)
    calls = [0] * len(maps)

    def loader(index: int):
        def load() -> np.ndarray:
            calls[index] += 1
            return maps[index]
        return load

    aupro([loader(i) for i in range(len(maps))], masks)
    assert calls == [2] * len(maps)


def test_one_shot_iterators_are_accepted() -> None:
    maps, masks = _random_case(5, [(16, 16)] * 4)
    assert aupro(iter(maps), (m for m in masks)) == aupro(maps, masks)


def test_input_errors_name_the_image() -> None:
    maps, masks = _random_case(6, [(8, 8)] * 3)
    with pytest.raises(ValueError, match="differ in length"):
        aupro(maps, masks[:2])
    with pytest.raises(ValueError, match="mask 1 has shape"):
        aupro(maps, [masks[0], np.zeros((8, 9)), masks[2]])
    broken = [m.copy() for m in maps]
    broken[2][0, 0] = np.nan
    with pytest.raises(ValueError, match="anomaly map 2 contains NaN"):
        pixel_auroc(broken, masks)
    with pytest.raises(ValueError, match="one 2-D array"):
        aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match="limit"):
        aupro(maps, masks, limits=(0.0,))


def test_pixel_f1_max_matches_brute_force_and_its_threshold_reproduces_it() -> None:
    maps, masks = _random_case(7, [(24, 24), (20, 30), (24, 24), (10, 10)], levels=12)
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([(np.zeros(m.shape, bool) if k is None else k != 0).ravel()
                             for m, k in zip(maps, masks)])
    best = 0.0
    for threshold in np.concatenate(([-np.inf], np.unique(scores))):
        flagged = scores > threshold
        tp = np.count_nonzero(flagged & labels)
        f1 = 2 * tp / (flagged.sum() + labels.sum())
        best = max(best, f1)
    f1, threshold = pixel_f1_max(maps, masks)
    assert f1 == pytest.approx(best, abs=1e-15)
    assert threshold in set(scores.tolist()) | {-np.inf}
    summary = pixel_classification_at_threshold(maps, masks, threshold)
    assert summary["f1"] == pytest.approx(f1, abs=1e-15)
    assert summary["tp"] + summary["fn"] == labels.sum()
    assert summary["tp"] + summary["fp"] + summary["tn"] + summary["fn"] == scores.size
    assert pixel_metrics(maps, masks).f1_threshold == threshold


def test_streaming_memory_stays_far_below_the_data_size() -> None:
    size, count = 192, 40  # 40 maps of 192 x 192 float32: 5.6 MiB of scores in all

    def load_map(index: int) -> np.ndarray:
        return np.random.default_rng(index).random((size, size), dtype=np.float32)

    def load_mask(index: int) -> np.ndarray | None:
        if index % 3 == 0:
            return None
        mask = np.zeros((size, size), np.uint8)
        row, col = np.random.default_rng(1000 + index).integers(0, size - 20, 2)
        mask[row:row + 20, col:col + 20] = 255
        return mask

    maps = [lambda index=index: load_map(index) for index in range(count)]
    masks = [lambda index=index: load_mask(index) for index in range(count)]
    tracemalloc.start()
    try:
        pixel_metrics(maps, masks, with_curve=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total_float64 = size * size * count * 8
    assert peak < 0.25 * total_float64, (peak, total_float64)


@pytest.mark.parametrize("block_size", [1, 2, 7])
def test_block_walk_does_not_change_results(block_size: int) -> None:
    from defectlens.metrics.pixel import _pixel_sweep

    maps, masks = _random_case(9, [(20, 20), (17, 23), (20, 20), (9, 31)], levels=15)
    sweep = _pixel_sweep(maps, masks, regions=True, track_extremes=True)
    whole = sweep.summarize(LIMITS, curve=True)
    blocks = sweep.summarize(LIMITS, curve=True, block_size=block_size)
    for limit in LIMITS:
        assert blocks.areas[limit] == pytest.approx(whole.areas[limit], abs=1e-14)
    assert blocks.auc == whole.auc
    assert (blocks.f1, blocks.f1_threshold) == (whole.f1, whole.f1_threshold)
    for ours, reference in zip(blocks.curve, whole.curve):
        np.testing.assert_array_equal(ours, reference)
