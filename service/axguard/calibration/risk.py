"""Fitting the risk model: logistic fusion of evidence families, cross-fitted selection.

Fitted with scikit-learn; applied by `verdict.predict_risk`, the one implementation used by
calibration, evaluation and serving alike.

Selection rule (documented in the artifact): start from the base family "msp"
(−log(1 − MSP)); at each step, add the candidate family with the best out-of-fold AUROC;
keep it only when the one-sided 95% paired-bootstrap lower bound of its out-of-fold AUROC
gain over the current set is above zero. Out-of-fold predictions come from K-fold
cross-fitting repeated R times (each image's risk averaged over the repeats), with the
regularisation of every fit chosen by inner cross-validation. Stop when no candidate passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from ..verdict import Family, RiskModel, predict_risk
from .metrics import auroc

C_GRID = tuple(np.logspace(-3, 2, 8).tolist())
"""Inverse regularisation strengths tried by the inner cross-validation."""
MIN_ERRORS_FOR_SELECTION = 10
SELECTION_RULE = (
    "forward selection from msp: a family enters when the one-sided 95% paired-bootstrap "
    "lower bound of its out-of-fold AUROC gain over the families kept so far is above 0")


def _matrix(features: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.column_stack([np.asarray(features[n], dtype=float) for n in names])


def fit_risk_model(features: dict[str, np.ndarray], is_error: np.ndarray,
                   names: Sequence[str], *, c: float | None = None, seed: int = 0
                   ) -> RiskModel:
    """Return a standardised logistic risk model of `is_error` on the named features.

    Unweighted, so the risk estimates P(wrong | features) on data like the fit data. With
    `c` None the inverse regularisation is chosen from C_GRID by inner cross-validation
    (log-loss, 3 folds, or fewer when errors are scarce).
    """
    x = _matrix(features, names)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    y = is_error.astype(int)
    inner = min(3, int(y.sum()), int((1 - y).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.8's l1_ratios notice
        if c is None and inner >= 2:
            fit = LogisticRegressionCV(
                Cs=list(C_GRID), cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
                scoring="neg_log_loss", max_iter=2000).fit(z, y)
            c = float(np.ravel(fit.C_)[0])
        else:
            c = 1.0 if c is None else c
            fit = LogisticRegression(C=c, max_iter=2000).fit(z, y)
    return RiskModel(features=list(names), mean=mean.tolist(), scale=scale.tolist(),
                     coef=fit.coef_[0].tolist(), intercept=float(fit.intercept_[0]),
                     regularisation_c=float(c))


def cross_fitted_risk(features: dict[str, np.ndarray], is_error: np.ndarray,
                      names: Sequence[str], *, folds: int, repeats: int, seed: int
                      ) -> np.ndarray:
    """Return each image's out-of-fold risk, (N,), averaged over `repeats` K-fold splits."""
    total = np.zeros(len(is_error))
    for r in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for train, test in splitter.split(np.zeros(len(is_error)), is_error):
            model = fit_risk_model({n: features[n][train] for n in names}, is_error[train],
                                   names, seed=seed)
            total[test] += predict_risk(model, {n: features[n][test] for n in names})
    return total / repeats


def paired_gain_lower_bound(is_error: np.ndarray, new: np.ndarray, old: np.ndarray, *,
                            n_resamples: int, seed: int, level: float = 0.95) -> float:
    """Return the one-sided `level` lower bound of AUROC(new) − AUROC(old) by a paired
    bootstrap over images (the same resamples for both)."""
    from .metrics import resamples

    diffs = [auroc(is_error[i], new[i]) - auroc(is_error[i], old[i])
             for i in resamples(is_error, n_resamples, seed)]
    return float(np.percentile(diffs, (1 - level) * 100)) if diffs else float("-inf")


@dataclass
class StepResult:
    """One family tried at one step."""

    step: int
    family: Family
    features: list[str]
    auroc: float
    gain: float
    gain_low: float
    accepted: bool


def select_families(features: dict[str, np.ndarray], is_error: np.ndarray,
                    base: Family, candidates: list[Family], *, folds: int = 5,
                    repeats: int = 2, n_resamples: int = 500, seed: int = 0
                    ) -> tuple[list[Family], list[StepResult], np.ndarray]:
    """Return (kept families, base first; every step tried; out-of-fold risk of the kept
    set) by the rule in this module's docstring."""
    kept = [base]
    names = base.features()
    current = cross_fitted_risk(features, is_error, names, folds=folds, repeats=repeats,
                                seed=seed)
    steps: list[StepResult] = []
    remaining = list(candidates)
    step = 0
    while remaining:
        step += 1
        tried = []
        for family in remaining:
            trial = names + family.features()
            risk = cross_fitted_risk(features, is_error, trial, folds=folds,
                                     repeats=repeats, seed=seed)
            tried.append((auroc(is_error, risk) - auroc(is_error, current), family, risk))
        gain, best, risk = max(tried, key=lambda t: t[0])
        low = paired_gain_lower_bound(is_error, risk, current, n_resamples=n_resamples,
                                      seed=seed + step)
        accepted = low > 0
        for g, family, r in tried:
            steps.append(StepResult(step, family, family.features(), auroc(is_error, r), g,
                                    low if family is best else float("nan"),
                                    accepted and family is best))
        if not accepted:
            break
        kept.append(best)
        names = names + best.features()
        current = risk
        remaining.remove(best)
    return kept, steps, current


def prior_log_odds_shift(fit_error_rate: float, error_rate: float) -> float:
    """Return logit(error_rate) − logit(fit_error_rate): what moves a logistic risk fitted
    on data with one error rate to data with another (only the intercept changes)."""
    return float(np.log(error_rate / (1 - error_rate))
                 - np.log(fit_error_rate / (1 - fit_error_rate)))


def prior_shift(risk_model: RiskModel, fit_error_rate: float, error_rate: float) -> RiskModel:
    """Return the model with its intercept moved from the fit data's error rate to the
    population's (the fit split over-samples one outcome)."""
    shift = prior_log_odds_shift(fit_error_rate, error_rate)
    return risk_model.model_copy(update={"intercept": risk_model.intercept + shift})


def shift_risk(risk: np.ndarray, fit_error_rate: float, error_rate: float) -> np.ndarray:
    """Return risks moved the same way as `prior_shift` moves a model (for out-of-fold
    risks, which come from several fold models)."""
    z = np.log(np.clip(risk, 1e-300, None)) - np.log(np.clip(1 - risk, 1e-300, None))
    z = z + prior_log_odds_shift(fit_error_rate, error_rate)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))
