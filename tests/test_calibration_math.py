"""Metric, feature, risk and threshold functions against hand computations and definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from axguard.calibration import features as f
from axguard.calibration import metrics as m
from axguard.calibration.risk import fit_risk_model, predict_risk, select_risk_model
from axguard.calibration.thresholds import (
    GuaranteeUnavailable,
    error_recall_threshold,
    false_alarm_threshold,
    minimum_count,
)

IS_ERROR = np.array([True, False, True, False])
SCORE = np.array([0.9, 0.1, 0.4, 0.5])


def test_auroc_by_hand():
    # error/correct pairs ranked right: (0.9,0.1) (0.9,0.5) (0.4,0.1); wrong: (0.4,0.5)
    assert m.auroc(IS_ERROR, SCORE) == pytest.approx(0.75)


def test_aupr_error_by_hand():
    # ranked: E(0.9) C(0.5) E(0.4) C(0.1): precision at the errors 1/1 and 2/3
    assert m.aupr_error(IS_ERROR, SCORE) == pytest.approx((1 + 2 / 3) / 2)


def test_fpr_at_95_correct_kept_by_hand():
    # keeping both correct predictions needs threshold 0.5, which also accepts the 0.4 error
    assert m.fpr_at_95_correct_kept(IS_ERROR, SCORE) == pytest.approx(0.5)
    many_correct = np.r_[np.zeros(20, bool), True]
    scores = np.r_[np.arange(20) / 20, 0.99]  # keep 19 of 20: threshold 0.9
    assert m.fpr_at_95_correct_kept(many_correct, scores) == 0.0


def test_risk_coverage_aurc_and_eaurc_by_hand():
    coverage, risk = m.risk_coverage(IS_ERROR, SCORE)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 1 / 2, 1 / 3, 1 / 2])
    assert m.aurc(IS_ERROR, SCORE) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    oracle = (0 + 0 + 1 / 3 + 1 / 2) / 4
    assert m.eaurc(IS_ERROR, SCORE) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 4 - oracle)


def test_separation_matches_scipy():
    correct, wrong = np.array([3.0, 4.0, 5.0, 6.0]), np.array([1.0, 2.5, 3.5])
    out = m.separation(correct, wrong)
    assert out["median_gap"] == pytest.approx(4.5 - 2.5)
    assert out["mann_whitney_p"] == pytest.approx(
        stats.mannwhitneyu(correct, wrong, alternative="two-sided").pvalue)


def test_binomial_interval_is_clopper_pearson():
    low, high = m.binomial_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))


def test_bootstrap_interval_contains_the_point_and_is_paired():
    rng = np.random.default_rng(1)
    is_error = rng.random(300) < 0.2
    score = is_error + rng.normal(0, 1, 300)
    low, high = m.bootstrap_interval(m.auroc, is_error, score, n_resamples=300)
    assert low < m.auroc(is_error, score) < high
    same = m.paired_auroc_difference(is_error, score, score, n_resamples=100)
    assert same["difference"] == same["low"] == same["high"] == 0.0


def test_logit_features_by_hand():
    logits = np.array([[2.0, 0.0, 0.0]])
    z = math.exp(2) + 2
    p = np.array([math.exp(2) / z, 1 / z, 1 / z])
    assert f.msp(logits)[0] == pytest.approx(p[0])
    assert f.margin(logits)[0] == pytest.approx(2.0)
    assert f.entropy(logits)[0] == pytest.approx(-(p * np.log(p)).sum())
    assert f.energy(logits)[0] == pytest.approx(-math.log(z))
    assert f.error_sign("msp") == -1 and f.error_sign("entropy") == 1
    assert f.error_sign("co:saliency:sum") == -1


def test_predict_risk_equals_sklearn():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 3)) * [1, 5, 0.1] + [0, 3, 1]
    y = (x[:, 0] + rng.normal(size=200)) > 1
    features = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}
    model = fit_risk_model(features, y, ["a", "b", "c"])
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)
    ).fit(x, y)
    np.testing.assert_allclose(predict_risk(model, features), reference.predict_proba(x)[:, 1],
                               rtol=1e-6)


def test_selection_keeps_a_useful_feature_and_drops_noise():
    rng = np.random.default_rng(3)
    y = rng.random(600) < 0.2
    signal = -y.astype(float)
    useful = {"msp": signal + rng.normal(0, 2, 600), "extra": signal + rng.normal(0, 0.5, 600),
              "noise": rng.normal(size=600)}
    model, scores = select_risk_model(useful, y, [["msp"], ["msp", "extra"]])
    assert model.features == ["msp", "extra"] and len(scores) == 2
    model, _ = select_risk_model(useful, y, [["msp"], ["msp", "noise"]])
    assert model.features == ["msp"]
    few = y & (np.arange(600) < 40)
    model, scores = select_risk_model(useful, few, [["msp"], ["msp", "extra"]])
    assert model.features == ["msp"] and scores == []


def test_minimum_counts():
    assert minimum_count(0.05, 0.05) == 59
    assert minimum_count(0.1, 0.05) == 29


def test_false_alarm_threshold_is_the_smallest_valid_order_statistic():
    risks = np.linspace(0, 1, 200)
    rule = false_alarm_threshold(risks, beta=0.05, delta=0.05)
    k, n = rule.order_index, rule.n
    assert stats.binom.sf(k - 1, n, 0.95) <= 0.05 < stats.binom.sf(k - 2, n, 0.95)
    assert rule.value == risks[k - 1]
    with pytest.raises(GuaranteeUnavailable, match="59"):
        false_alarm_threshold(np.linspace(0, 1, 58), 0.05, 0.05)
    assert false_alarm_threshold(np.linspace(0, 1, 59), 0.05, 0.05).order_index == 59


def test_error_recall_threshold_is_the_largest_valid_order_statistic():
    risks = np.linspace(0, 1, 100)
    rule = error_recall_threshold(risks, recall=0.9, delta=0.05)
    j, n = rule.order_index, rule.n
    assert stats.binom.cdf(j - 1, n, 0.1) <= 0.05 < stats.binom.cdf(j, n, 0.1)
    with pytest.raises(GuaranteeUnavailable, match="at least 29"):
        error_recall_threshold(np.linspace(0, 1, 28), 0.9, 0.05)


@pytest.mark.parametrize("n", [60, 200])
def test_false_alarm_promise_holds_at_the_stated_confidence_in_simulation(n):
    """Risks of correct predictions ~ U(0, 1): the true false-alarm rate of t is 1 − t."""
    rng = np.random.default_rng(n)
    trials, beta, delta = 4000, 0.05, 0.05
    broken = sum(1 - false_alarm_threshold(rng.random(n), beta, delta).value > beta
                 for _ in range(trials))
    assert broken / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


@pytest.mark.parametrize("m_errors", [29, 120])
def test_error_recall_promise_holds_at_the_stated_confidence_in_simulation(m_errors):
    """Risks of wrong predictions ~ U(0, 1): the true recall of t (risk ≥ t) is 1 − t."""
    rng = np.random.default_rng(m_errors)
    trials, recall, delta = 4000, 0.9, 0.05
    broken = sum(1 - error_recall_threshold(rng.random(m_errors), recall, delta).value < recall
                 for _ in range(trials))
    assert broken / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
