"""Thresholds with stated uncertainty: conformal order statistics, a generalized Pareto tail
below what the held-out images support (with a warning), Clopper-Pearson intervals, p-values
and normal-quantile units; checked on samples with known quantiles."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import stats

from defectlens.calibration import CalibratedThresholds, NormalScoreModel, clopper_pearson
from defectlens.errors import ConfigError


def test_conformal_threshold_is_the_right_order_statistic():
    scores = np.arange(1.0, 101.0)  # 1..100
    estimate = NormalScoreModel(scores).threshold(0.05, "conformal")
    # ceil(101 * 0.95) = 96 -> the 96th smallest
    assert estimate.threshold == 96.0 and estimate.model == "conformal" and not estimate.extrapolated
    assert estimate.held_out_above == 4 and estimate.estimated_fpr == pytest.approx(0.04)
    assert estimate.supported_min_fpr == pytest.approx(1 / 101)
    low, high = estimate.fpr_interval
    assert (low, high) == pytest.approx(clopper_pearson(4, 100)) and low < 0.04 < high


def test_clopper_pearson_matches_the_beta_quantiles():
    low, high = clopper_pearson(3, 40)
    assert low == pytest.approx(stats.beta.ppf(0.025, 3, 38)) and high == pytest.approx(stats.beta.ppf(0.975, 4, 37))
    assert clopper_pearson(0, 40)[0] == 0.0 and clopper_pearson(40, 40)[1] == 1.0


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_thresholds_hold_their_false_positive_rate_on_average(target):
    """Exponential scores (a generalized Pareto tail with shape 0): over many calibration sets
    the true FPR at the threshold averages to the target, also where the tail extrapolates."""
    rng = np.random.default_rng(0)
    true_fprs = []
    for _ in range(200):
        model = NormalScoreModel(rng.exponential(1.0, 200))
        true_fprs.append(math.exp(-model.threshold(target, "tail").threshold))  # P(X > t) for Exp(1)
    assert np.mean(true_fprs) == pytest.approx(target, rel=0.35)


def test_below_what_the_images_support_it_extrapolates_and_warns(caplog):
    scores = np.random.default_rng(1).normal(10.0, 1.0, 30)
    with caplog.at_level(logging.WARNING):
        thresholds = CalibratedThresholds.from_scores(scores, 0.001, 0.01)
    not_ok = thresholds.not_ok
    assert not_ok.extrapolated and not_ok.model == "tail" and not_ok.threshold > scores.max()
    assert not_ok.held_out_above == 0 and not_ok.fpr_interval[0] == 0.0 and not_ok.fpr_interval[1] > 0.05
    assert "below what 30 held-out normal images support" in caplog.text
    summary = thresholds.summary()
    assert summary["warnings"] and summary["threshold"]["target_fpr"] == 0.001
    assert thresholds.review is not None and thresholds.review.threshold < not_ok.threshold
    # the conformal rule alone would have taken the maximum; "tail" goes beyond it
    assert NormalScoreModel(scores).threshold(0.001, "conformal").threshold == scores.max()


def test_p_values_and_normal_quantile_units():
    rng = np.random.default_rng(2)
    model = NormalScoreModel(rng.normal(0.0, 1.0, 999))
    assert model.p_value(-10.0) == 1.0
    assert model.p_value(float(np.median(model.scores))) == pytest.approx(0.5, abs=0.01)
    assert model.z_score(1.645) == pytest.approx(1.645, abs=0.25)  # about the 95 % quantile
    far = model.p_value(6.0)  # beyond every held-out score: the tail, below the conformal 1/1000
    assert 0.0 < far < 1.0 / 1000 and model.z_score(6.0) > model.z_score(3.0) > 2.5


def test_quantile_rule_is_the_old_one():
    scores = np.arange(1.0, 21.0)
    assert NormalScoreModel(scores).threshold(0.05, "quantile").threshold == 19.0  # ceil(0.95 * 20) = 19th


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="zero normal scores"):
        NormalScoreModel(np.array([]))
    with pytest.raises(ConfigError, match="NaN"):
        NormalScoreModel(np.array([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="review_fpr"):
        CalibratedThresholds.from_scores(np.arange(50.0), 0.05, 0.01)
    with pytest.raises(ConfigError, match="unknown threshold model"):
        NormalScoreModel(np.arange(50.0)).threshold(0.01, "magic")


def test_round_trip_keeps_thresholds_and_p_values():
    model = NormalScoreModel(np.random.default_rng(3).gamma(2.0, 1.0, 150))
    again = NormalScoreModel.from_dict(model.to_dict())
    assert again.threshold(0.002).threshold == model.threshold(0.002).threshold
    assert again.p_value(9.0) == model.p_value(9.0)
