"""Defect-wise (instance) recall per defect class."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.metrics import defect_wise_recall


def _square(shape, row, col, size, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[row:row + size, col:col + size] = value
    return mask


def test_coverage_criteria_per_instance() -> None:
    truth = _square((40, 40), 0, 0, 10) | _square((40, 40), 20, 20, 10)  # 2 x 100 pixels
    predicted = np.zeros((40, 40), bool)
    predicted[0:3, 0:10] = True  # 30 % of the first instance
    predicted[25, 25] = True  # 1 % of the second instance
    result = defect_wise_recall([predicted], [truth], ["scratch"])
    stats = result.per_class["scratch"]
    assert result.criteria == ("any", "1%", "5%", "10%", "25%", "50%")
    assert stats.num_instances == 2
    assert stats.detected == {"any": 2, "1%": 2, "5%": 1, "10%": 1, "25%": 1, "50%": 0}
    assert stats.recall["5%"] == 0.5
    assert stats.pixel_coverage == pytest.approx(31 / 200)
    assert result.mean_recall == result.pooled_recall == stats.recall


def test_exact_boundary_uses_integer_arithmetic() -> None:
    truth = _square((10, 10), 0, 0, 10)  # 100 pixels
    predicted = np.zeros((10, 10), bool)
    predicted.ravel()[:10] = True  # exactly 10 %
    result = defect_wise_recall([predicted], [truth])
    assert result.per_class["all"].detected["10%"] == 1
    assert result.per_class["all"].detected["25%"] == 0


def test_mean_over_classes_versus_pooled() -> None:
    shape = (30, 30)
    truths = [_square(shape, 0, 0, 5) | _square(shape, 10, 10, 5) | _square(shape, 20, 20, 5),
              _square(shape, 0, 0, 5), None]
    predicted = [_square(shape, 0, 0, 5), np.zeros(shape, bool), _square(shape, 3, 3, 2)]
    result = defect_wise_recall(predicted, truths, ["crack", "hole", "good"])
    assert result.per_class["crack"].recall["any"] == pytest.approx(1 / 3)
    assert result.per_class["hole"].recall["any"] == 0.0
    assert "good" not in result.per_class
    assert result.mean_recall["any"] == pytest.approx((1 / 3 + 0) / 2)
    assert result.pooled_recall["any"] == pytest.approx(1 / 4)
    assert result.false_positive_regions == 1  # the prediction on the good image
    assert result.mean_pixel_coverage == pytest.approx((25 / 75 + 0) / 2)


def test_instances_are_eight_connected_and_holes_belong_to_no_instance() -> None:
    truth = np.zeros((8, 8), np.uint8)
    truth[0, 0] = truth[1, 1] = truth[2, 2] = 1  # diagonal: one instance
    ring = np.zeros((8, 8), np.uint8)
    ring[4:8, 4:8] = 1
    ring[5:7, 5:7] = 0  # ring with a hole: one instance
    predicted = np.zeros((8, 8), bool)
    predicted[5:7, 5:7] = True  # only the hole
    result = defect_wise_recall([predicted], [truth | ring])
    assert result.per_class["all"].num_instances == 2
    assert result.per_class["all"].detected["any"] == 0
    assert result.false_positive_regions == 1


def test_min_region_size_removes_small_predictions_and_reports_it() -> None:
    truth = _square((30, 30), 10, 10, 6)
    predicted = np.zeros((30, 30), bool)
    predicted[0, 0] = True  # 1-pixel false positive
    predicted[28:30, 28:30] = True  # 4-pixel false positive
    predicted[10, 10] = True  # 1-pixel true detection
    kept = defect_wise_recall([predicted], [truth])
    assert kept.per_class["all"].detected["any"] == 1
    assert kept.predicted_regions == 3 and kept.removed_regions == 0
    assert kept.false_positive_regions == 2
    filtered = defect_wise_recall([predicted], [truth], min_region_size=2)
    assert filtered.per_class["all"].detected["any"] == 0
    assert filtered.predicted_regions == 3
    assert filtered.removed_regions == 2 and filtered.removed_pixels == 2
    assert filtered.false_positive_regions == 1
    assert filtered.to_dict()["removed_regions"] == 2


def test_inputs_are_streamed_and_validated() -> None:
    truth = _square((6, 6), 0, 0, 3)
    predicted = truth.astype(bool)
    result = defect_wise_recall((p for p in [predicted]), iter([lambda: truth]))
    assert result.per_class["all"].recall["50%"] == 1.0
    with pytest.raises(ValueError, match="float dtype"):
        defect_wise_recall([truth.astype(np.float32)], [truth])
    with pytest.raises(ValueError, match="differ in length"):
        defect_wise_recall([predicted, predicted], [truth])
    with pytest.raises(ValueError, match="shape"):
        defect_wise_recall([predicted], [np.zeros((5, 6))])
