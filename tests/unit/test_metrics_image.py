"""Image-level metrics: AUROC, AP, F1-max, TPR at a normal-only TNR, confusion counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from defectlens.metrics import (
    average_precision,
    classification_at_threshold,
    f1_max,
    image_auroc,
    image_scores_from_maps,
    normal_quantile_threshold,
    tpr_at_tnr,
)


def test_image_auroc_counts_ties_one_half() -> None:
    # positives 2, 3; negatives 1, 2: pairs (2>1)=1, (2=2)=0.5, (3>1)=1, (3>2)=1 -> 3.5 / 4
    assert image_auroc([2, 3, 1, 2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert image_auroc([0.3] * 6, [0, 1, 0, 1, 1, 0]) == 0.5


def test_image_auroc_is_none_with_one_class() -> None:
    assert image_auroc([0.1, 0.7, 0.3], [1, 1, 1]) is None  # no good image
    assert image_auroc([0.1, 0.7, 0.3], [0, 0, 0]) is None  # no defective image
    assert image_auroc([], []) is None


def test_average_precision_uses_sklearn_and_none_without_defects() -> None:
    scores, labels = [0.1, 0.8, 0.35, 0.4, 0.9], [0, 1, 0, 1, 1]
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores))
    assert average_precision(scores, [0] * 5) is None


def test_f1_max_is_the_best_over_all_thresholds_and_its_threshold_reproduces_it() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = (rng.random(60) < 0.4).astype(int)
    best = max(
        2 * np.sum((scores > t) & (labels == 1)) / (np.sum(scores > t) + labels.sum())
        for t in np.concatenate(([-np.inf], np.unique(scores)))
    )
    f1, threshold = f1_max(scores, labels)
    assert f1 == pytest.approx(best)
    assert threshold == -math.inf or threshold in set(scores.tolist())
    assert classification_at_threshold(scores, labels, threshold)["f1"] == pytest.approx(f1)
    assert f1_max(scores, np.zeros(60)) == (None, None)


def test_f1_max_threshold_minus_inf_when_flagging_everything_is_best() -> None:
    assert f1_max([0.2, 0.4, 0.1], [1, 1, 0]) == (1.0, 0.1)
    assert f1_max([0.5, 0.4, 0.1], [1, 1, 0])[0] == 1.0
    assert f1_max([0.2, 0.4, 0.3], [1, 0, 1]) == (pytest.approx(0.8), -math.inf)  # flag all: P 2/3, R 1


def test_ap_and_f1_are_undefined_without_both_classes() -> None:
    # with no good image every ranking would have AP = F1 = 1: the metrics say nothing, so None
    assert f1_max([0.2, 0.4], [1, 1]) == (None, None)
    assert average_precision([0.2, 0.4], [1, 1]) is None and average_precision([0.2, 0.4], [0, 0]) is None


def test_normal_quantile_threshold_convention() -> None:
    normals = np.arange(1, 21, dtype=float)  # 1..20
    # k = ceil(tnr * n): 0.95 * 20 = 19 exactly (not 19.000000000000004)
    assert normal_quantile_threshold(normals, 0.95) == 19
    assert normal_quantile_threshold(normals, 0.90) == 18
    assert normal_quantile_threshold(normals, 0.99) == 20
    assert normal_quantile_threshold(normals, 0.951) == 20
    assert normal_quantile_threshold(normals[::-1], 0.05) == 1
    # the same as numpy's lower empirical quantile
    assert normal_quantile_threshold(normals, 0.93) == np.quantile(normals, 0.93,
                                                                   method="inverted_cdf")
    with pytest.raises(ValueError):
        normal_quantile_threshold(normals, 0.0)


def test_tpr_at_tnr_sets_thresholds_on_normal_images_only() -> None:
    normals = list(np.arange(1, 21, dtype=float))  # thresholds 18, 19, 20
    defective = [0.5, 18.0, 18.5, 19.5, 25.0]
    scores = normals + defective
    labels = [0] * 20 + [1] * 5
    result = tpr_at_tnr(scores, labels)
    assert set(result) == {0.90, 0.95, 0.99}
    assert result[0.90].threshold == 18 and result[0.90].tpr == pytest.approx(3 / 5)
    assert result[0.95].threshold == 19 and result[0.95].tpr == pytest.approx(2 / 5)
    assert result[0.99].threshold == 20 and result[0.99].tpr == pytest.approx(1 / 5)
    assert result[0.95].tnr == pytest.approx(0.95)
    # moving defective scores never moves the thresholds
    shuffled = tpr_at_tnr(normals + [100.0] * 5, labels)
    assert all(shuffled[t].threshold == result[t].threshold for t in result)


def test_tpr_at_tnr_with_ties_and_missing_classes() -> None:
    result = tpr_at_tnr([1, 1, 1, 1, 2, 1], [0, 0, 0, 0, 1, 1], tnrs=(0.5,))
    assert result[0.5].threshold == 1 and result[0.5].tnr == 1.0
    assert result[0.5].tpr == 0.5  # the defective image scoring 1 is not above 1
    assert tpr_at_tnr([1, 2], [1, 1]) == {0.90: None, 0.95: None, 0.99: None}
    assert tpr_at_tnr([1, 2], [0, 0])[0.95].tpr is None


def test_classification_at_threshold_is_strict() -> None:
    summary = classification_at_threshold([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.5)
    assert (summary["tp"], summary["fp"], summary["tn"], summary["fn"]) == (1, 0, 2, 1)
    assert summary["precision"] == 1.0 and summary["recall"] == 0.5
    assert summary["accuracy"] == 0.75 and summary["f1"] == pytest.approx(2 / 3)
    nothing = classification_at_threshold([0.1, 0.2], [0, 1], 1.0)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and nothing["f1"] == 0.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="one label per score"):
        image_auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, float("nan")], [1, 0])


def test_image_scores_from_maps_takes_the_maximum_lazily() -> None:
    maps = [np.array([[0.1, 0.4]]), lambda: np.array([[0.9], [0.2]])]
    np.testing.assert_array_equal(image_scores_from_maps(maps), [0.4, 0.9])
