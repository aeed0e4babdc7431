"""Metric, feature, risk and threshold functions against hand computations and definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from axguard.calibration import metrics as m
from axguard.calibration.calibrate import split_for_guarantee
from axguard.calibration.risk import (
    cross_fitted_risk,
    fit_risk_model,
    paired_gain_lower_bound,
    prior_shift,
    select_families,
    shift_risk,
)
from axguard.calibration.thresholds import (
    GuaranteeUnavailable,
    error_recall_threshold,
    false_alarm_threshold,
    minimum_count,
)
from axguard.verdict import Family, predict_risk

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


def test_predict_risk_equals_sklearn():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 3)) * [1, 5, 0.1] + [0, 3, 1]
    y = (x[:, 0] + rng.normal(size=200)) > 1
    features = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}
    model = fit_risk_model(features, y, ["a", "b", "c"], c=1.0)
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)
    ).fit(x, y)
    np.testing.assert_allclose(predict_risk(model, features), reference.predict_proba(x)[:, 1],
                               rtol=1e-5)


def test_inner_cross_validation_picks_strong_regularisation_for_pure_noise():
    rng = np.random.default_rng(4)
    y = rng.random(400) < 0.3
    noise = {f"n{i}": rng.normal(size=400) for i in range(8)}
    model = fit_risk_model(noise, y, list(noise))
    # Nothing to learn: the chosen C is the grid's smallest, and the coefficients are tiny.
    assert model.regularisation_c == pytest.approx(1e-3)
    assert max(abs(c) for c in model.coef) < 0.05


def test_cross_fitted_risk_is_out_of_fold():
    # A feature that identifies each image exactly cannot leak into its own out-of-fold
    # prediction: a lookup table would score 1.0 in sample, out of fold it is chance.
    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.3
    oof = cross_fitted_risk({"msp": rng.normal(size=300)}, y, ["msp"], folds=5, repeats=2,
                            seed=0)
    assert oof.shape == (300,) and 0.35 < m.auroc(y, oof) < 0.65


def test_paired_gain_lower_bound_by_construction():
    rng = np.random.default_rng(6)
    y = rng.random(500) < 0.3
    weak = y + rng.normal(0, 2, 500)
    strong = y + rng.normal(0, 0.3, 500)
    assert paired_gain_lower_bound(y, strong, weak, n_resamples=200, seed=0) > 0.1
    assert paired_gain_lower_bound(y, weak, weak, n_resamples=50, seed=0) == 0.0


def _signal_data(n: int = 600, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.2
    signal = -y.astype(float)
    return y, {"neg_log_1m_msp": signal + rng.normal(0, 2, n),
               "boundary_log_distance": signal + rng.normal(0, 0.5, n),
               "msp": rng.normal(size=n), "margin": rng.normal(size=n),
               "entropy": rng.normal(size=n), "energy": rng.normal(size=n)}


def test_selection_keeps_a_useful_family_and_drops_noise():
    y, features = _signal_data()
    kept, steps, oof = select_families(
        features, y, Family(name="msp"), [Family(name="logit"), Family(name="boundary")],
        folds=5, repeats=1, n_resamples=200)
    assert [f.key for f in kept] == ["msp", "boundary"]
    assert steps[0].accepted is False or steps[0].family.key == "boundary"
    accepted = [s for s in steps if s.accepted]
    assert [s.family.key for s in accepted] == ["boundary"] and accepted[0].gain_low > 0
    # The noise family was tried after boundary entered and refused.
    assert any(s.family.key == "logit" and s.step == 2 and not s.accepted for s in steps)
    assert m.auroc(y, oof) > m.auroc(y, -features["neg_log_1m_msp"])


def test_selection_without_evidence_keeps_msp_alone():
    rng = np.random.default_rng(7)
    y, features = _signal_data(seed=7)
    features["boundary_log_distance"] = rng.normal(size=len(y))
    kept, steps, _ = select_families(
        features, y, Family(name="msp"), [Family(name="logit"), Family(name="boundary")],
        folds=5, repeats=1, n_resamples=200)
    assert [f.key for f in kept] == ["msp"] and not any(s.accepted for s in steps)


def test_prior_shift_moves_only_the_intercept_by_the_log_odds():
    y, features = _signal_data()
    model = fit_risk_model(features, y, ["neg_log_1m_msp"], c=1.0)
    shifted = prior_shift(model, fit_error_rate=0.5, error_rate=0.2)
    assert shifted.coef == model.coef
    assert shifted.intercept == pytest.approx(model.intercept + math.log(0.25))
    # Shifting the risks equals predicting with the shifted model.
    np.testing.assert_allclose(shift_risk(predict_risk(model, features), 0.5, 0.2),
                               predict_risk(shifted, features), rtol=1e-9)


@pytest.mark.parametrize("mode", ["false_alarm", "error_recall"])
def test_split_for_guarantee_holds_out_only_what_the_rule_uses(mode):
    rng = np.random.default_rng(8)
    is_error = rng.random(1000) < 0.1
    fit = split_for_guarantee(is_error, mode, 0.5, seed=0)
    used = ~is_error if mode == "false_alarm" else is_error
    assert not (~fit & ~used).any()  # the other outcome is all fitted on
    assert (~fit).sum() == round(0.5 * used.sum())
    assert (split_for_guarantee(is_error, mode, 0.5, seed=0) == fit).all()


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
