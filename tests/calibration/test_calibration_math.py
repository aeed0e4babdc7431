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
from axguard.calibration.risk import (
    BACKWARD,
    FORWARD,
    cross_fitted_risk,
    cross_fitted_risks,
    family_cost,
    fit_risk_model,
    fuse,
)
from axguard.calibration.thresholds import (
    GuaranteeUnavailable,
    error_recall_threshold,
    false_alarm_threshold,
    minimum_count,
)
from axguard.flag.verdict import Family, predict_risk

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


def _signal_data(n: int = 600, seed: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.2
    signal = -y.astype(float)
    return y, {"neg_log_1m_msp": signal + rng.normal(0, 2, n),
               "boundary_log_distance": signal + rng.normal(0, 0.5, n),
               "msp": rng.normal(size=n), "margin": rng.normal(size=n),
               "entropy": rng.normal(size=n), "energy": rng.normal(size=n)}


LOGIT, BOUNDARY = Family(name="logit"), Family(name="boundary")


def test_fusion_keeps_every_offered_family_shrunk_and_reports_drop_one_effects():
    y, features = _signal_data()
    fusion = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=5, repeats=1,
                  n_resamples=200)
    # No selection step: the noise family stays in, its weight shrunk by the penalty.
    assert [f.key for f in fusion.families] == ["msp", "logit", "boundary"]
    assert not fusion.fallback and fusion.risks.shape == (1, len(y))
    effects = {e.family.key: e for e in fusion.effects}
    assert effects["boundary"].drop_one > 0.05  # the informative family carries the gain
    assert abs(effects["logit"].drop_one) < 0.02  # noise: about nothing either way
    assert fusion.fused_vs_msp["low"] > 0
    assert m.auroc(y, fusion.risk) > m.auroc(y, -features["neg_log_1m_msp"])


def test_fusion_falls_back_to_msp_only_when_worse_beyond_noise():
    rng = np.random.default_rng(11)
    n = 2000
    y = rng.random(n) < 0.1
    msp_score = -(y + rng.normal(0, 0.3, n))  # a strong MSP
    noise = {k: rng.normal(size=n) * 50 for k in ("msp", "margin", "entropy", "energy")}
    features = {"neg_log_1m_msp": msp_score, **noise,
                "boundary_log_distance": rng.normal(size=n)}
    # Fixed, unshrunk noise would lose to MSP; the cross-validated penalty shrinks it, so
    # the fused model is no worse beyond noise and stays.
    fusion = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=5, repeats=1,
                  n_resamples=200)
    assert fusion.fused_vs_msp["high"] >= 0 and not fusion.fallback
    # A family that misleads out of sample cannot be shrunk away: built to equal the label
    # on one cross-fitting fold and its opposite on the other, every fold model learns a
    # rule that is exactly wrong where it is applied. The guard sees it and falls back.
    from sklearn.model_selection import StratifiedKFold

    y2, base = _signal_data(n=400, seed=5)
    first, _ = next(StratifiedKFold(2, shuffle=True, random_state=0).split(np.zeros(400), y2))
    flip = np.zeros(400, dtype=bool)
    flip[first] = True
    misleading = {**base, "boundary_log_distance": np.where(flip, y2, ~y2).astype(float)}
    fallback = fuse(misleading, y2, Family(name="msp"), [BOUNDARY], folds=2, repeats=1,
                    n_resamples=200)
    assert fallback.fused_vs_msp["high"] < 0
    assert [f.key for f in fallback.families] == ["msp"]
    assert fallback.fallback.startswith("the fused model is worse than MSP out of fold")


def test_fusion_with_too_few_errors_is_msp_alone():
    y, features = _signal_data()
    y = np.zeros_like(y)
    y[:9] = True
    fusion = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=3, repeats=1)
    assert [f.key for f in fusion.families] == ["msp"]
    assert fusion.fallback.startswith("only 9 wrong predictions")


def test_fusion_needs_three_errors_per_fused_feature():
    y, features = _signal_data()
    y = np.zeros_like(y)
    y[::40] = True  # 15 errors; msp + logit + boundary are 6 features: 18 needed
    fusion = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=3, repeats=1)
    assert [f.key for f in fusion.families] == ["msp"]
    assert fusion.fallback == ("only 15 wrong predictions for 6 features (fewer than 3 per "
                               "feature): the fused model would overfit")
    # Fewer families offered need fewer errors: msp + boundary (2 features) fuse.
    two = fuse(features, y, Family(name="msp"), [BOUNDARY], folds=3, repeats=1)
    assert not two.fallback.startswith("only")


def test_a_cost_bound_keeps_the_most_useful_families_that_fit():
    y, features = _signal_data()
    # logit costs 0, boundary 2 (a backward): a bound of 1 leaves boundary out.
    bounded = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=5, repeats=1,
                   n_resamples=100, max_cost=1)
    assert [f.key for f in bounded.families] == ["msp", "logit"]
    within = fuse(features, y, Family(name="msp"), [LOGIT, BOUNDARY], folds=5, repeats=1,
                  n_resamples=100, max_cost=2)
    assert [f.key for f in within.families] == ["msp", "logit", "boundary"]


def test_family_costs_by_hand():
    from axguard.flag.verdict import MethodPair

    assert family_cost(Family(name="msp")) == family_cost(LOGIT) == 0
    assert family_cost(BOUNDARY) == BACKWARD == 2
    assert family_cost(Family(name="counterfactual", method="saliency")) == 2 * 2 + 2 * 1
    assert family_cost(Family(name="perturbation", epsilon=0.01)) == 2 + FORWARD
    assert family_cost(Family(name="views", views=("hflip", "shift:1:0"))) == 2
    co = Family(name="co", pairs=(MethodPair(method="saliency", ax_process="sum"),
                                  MethodPair(method="saliency", ax_process="product"),
                                  MethodPair(method="deconvolution", ax_process="sum")))
    assert family_cost(co) == 2 * 2 + 3 * 1  # two heatmaps, three AX forwards


def test_cross_fitted_risks_are_one_out_of_fold_row_per_repeat():
    y, features = _signal_data()
    rows = cross_fitted_risks(features, y, ["neg_log_1m_msp"], folds=4, repeats=3, seed=0)
    assert rows.shape == (3, len(y)) and np.isfinite(rows).all()
    np.testing.assert_allclose(rows.mean(axis=0), cross_fitted_risk(
        features, y, ["neg_log_1m_msp"], folds=4, repeats=3, seed=0))


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
