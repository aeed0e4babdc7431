"""The risk model: standardised logistic regression on label-free features.

Fitted with scikit-learn; applied by `predict_risk`, the one implementation used by
calibration, evaluation and serving alike.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


class RiskModel(BaseModel):
    """risk = sigmoid(Σ coef_i · (x_i − mean_i) / scale_i + intercept), in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    regularisation_c: float


def fit_risk_model(features: dict[str, np.ndarray], is_error: np.ndarray,
                   names: list[str], c: float = 1.0) -> RiskModel:
    """Return a logistic risk model of `is_error` on the named features.

    Unweighted, so the risk estimates P(wrong | features) on data like the fit split (a
    class-balanced fit would rank the same but inflate every risk).
    """
    x = np.column_stack([features[n] for n in names])
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    fit = LogisticRegression(C=c, max_iter=1000).fit(
        (x - scaler.mean_) / scale, is_error.astype(int))
    return RiskModel(features=list(names), mean=scaler.mean_.tolist(), scale=scale.tolist(),
                     coef=fit.coef_[0].tolist(), intercept=float(fit.intercept_[0]),
                     regularisation_c=c)


def predict_risk(model: RiskModel, features: dict[str, np.ndarray]) -> np.ndarray:
    """Return the risk of each prediction, (N,) float64 in [0, 1]."""
    x = np.column_stack([np.asarray(features[n], dtype=float) for n in model.features])
    z = (x - np.asarray(model.mean)) / np.asarray(model.scale) @ np.asarray(model.coef)
    return 1.0 / (1.0 + np.exp(-(z + model.intercept)))


class CandidateScore(BaseModel):
    """Cross-validated AUROC of one candidate feature set on the fit split."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    cv_auroc: float
    folds: int


def cross_validated_auroc(features: dict[str, np.ndarray], is_error: np.ndarray,
                          names: list[str], *, folds: int, seed: int, c: float = 1.0) -> float:
    """Return the mean out-of-fold AUROC of a risk model on the named features."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    out_of_fold = np.zeros(len(is_error))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(is_error)), is_error):
        model = fit_risk_model({k: v[train] for k, v in features.items()}, is_error[train],
                               names, c)
        out_of_fold[test] = predict_risk(model, {k: v[test] for k, v in features.items()})
    return float(roc_auc_score(is_error, out_of_fold))


MIN_ERRORS_FOR_SELECTION = 10


def select_risk_model(features: dict[str, np.ndarray], is_error: np.ndarray,
                      candidates: list[list[str]], *, seed: int = 0
                      ) -> tuple[RiskModel, list[CandidateScore]]:
    """Return the candidate with the best cross-validated AUROC, refitted on all the data.

    Candidates are ordered simplest first and a later one must beat the best so far by
    more than 0.005 AUROC, so extra features are only kept when they help out of sample.
    With fewer than MIN_ERRORS_FOR_SELECTION errors the out-of-fold AUROC is noise (a fold
    holds one or two errors), so the first (simplest) candidate is used and no scores are
    returned.
    """
    n_errors = int(is_error.sum())
    folds = min(5, n_errors, int((~is_error).sum()))
    scores: list[CandidateScore] = []
    best = 0
    if n_errors >= MIN_ERRORS_FOR_SELECTION:
        for i, names in enumerate(candidates):
            auc = cross_validated_auroc(features, is_error, names, folds=folds, seed=seed)
            scores.append(CandidateScore(features=names, cv_auroc=auc, folds=folds))
            if auc > scores[best].cv_auroc + 0.005:
                best = i
    return fit_risk_model(features, is_error, candidates[best]), scores
