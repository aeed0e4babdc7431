"""Fitting the risk model: one penalised logistic fusion of every offered family.

Fitted with scikit-learn; applied by `verdict.predict_risk`, the one implementation used by
calibration, evaluation and serving alike.

Shrinkage, not selection (DESIGN section 4, issue 22). A family's gain over MSP is real on
held-out data (+0.003 to +0.004 AUROC measured on two digit models) but smaller than what a
calibration set of 60–160 errors can prove (its out-of-fold noise is about ±0.004), so a
rule that admits a family only once the calibration set proves it throws the information
away. The rule (SHRINKAGE_RULE, recorded in the artifact):

1. Every offered family's features, each standardised, in one L2 logistic model; every
   feature penalised alike (msp too: left unpenalised, cross-validation shrank every other
   family to nothing); the penalty C from C_GRID by stratified K-fold cross-validation on
   log-loss (by AUROC it measured worse).
2. Out-of-fold risks by K-fold cross-fitting repeated R times: what the threshold and every
   comparison use, so every labelled image serves the fit and the threshold alike.
3. Guards that need no power to detect gains: fall back to msp alone when fewer than
   ERRORS_PER_FEATURE wrong predictions per fused feature (and at least MIN_ERRORS_TO_FUSE)
   leave too little to fit that many weights (the events-per-variable floor: at 20–27
   errors for 15 features the fused model lost 0.008 AUROC to MSP on held-out digits, a
   loss the out-of-fold interval of so few errors could not see), or when the fused model
   is worse than MSP out of fold beyond noise (the upper end of the paired-bootstrap 95%
   interval of AUROC(fused) − AUROC(MSP) below 0).
4. Optionally a cost bound (`max_cost`, in plain-forward units, family_cost): the families
   are taken in the order of their drop-one effect while their cost fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from ..flag.verdict import Family, RiskModel, predict_risk
from .metrics import auroc, paired_auroc_difference

C_GRID = tuple(np.logspace(-3, 2, 8).tolist())
"""Inverse regularisation strengths tried by the inner cross-validation."""
INNER_FOLDS = 5
MIN_ERRORS_TO_FUSE = 10
ERRORS_PER_FEATURE = 3
"""The fewest wrong predictions per fused feature (events per variable)."""
SHRINKAGE_RULE = (
    "one L2 logistic model over every offered family (features standardised and penalised "
    "alike, the penalty by cross-validation on log-loss); msp alone when there are fewer "
    f"than {ERRORS_PER_FEATURE} wrong predictions per fused feature (at least "
    f"{MIN_ERRORS_TO_FUSE}), or when the fused model is worse than MSP out of fold beyond "
    "noise (upper end of the paired 95% interval below 0)")

FORWARD, BACKWARD = 1.0, 2.0
"""Nominal cost of a forward and of a backward pass, in plain forwards of the batch."""


def family_cost(family: Family) -> float:
    """Return what a family adds to a verdict-only check, in plain-forward units (FORWARD,
    BACKWARD): an upper bound, since families that share a heatmap or a gradient pay it
    once in the engine (e.g. boundary is free beside counterfactual:saliency)."""
    if family.name in ("msp", "logit"):
        return 0.0
    if family.name == "boundary":
        return BACKWARD  # ∇ₓ(z_ŷ − z₂)
    if family.name == "counterfactual":
        return 2 * BACKWARD + 2 * FORWARD  # h of ŷ and h₂ of the runner-up; x + h₂, x − h
    if family.name == "perturbation":
        return BACKWARD + FORWARD  # ∇ₓ(−log p_ŷ), then x − ε·sign(∇)
    if family.name == "views":
        return FORWARD * len(family.views)
    methods = {p.method for p in family.pairs}  # co: one heatmap per method, one AX forward
    return BACKWARD * len(methods) + FORWARD * len(family.pairs)


def _matrix(features: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.column_stack([np.asarray(features[n], dtype=float) for n in names])


def fit_risk_model(features: dict[str, np.ndarray], is_error: np.ndarray,
                   names: Sequence[str], *, c: float | None = None, seed: int = 0
                   ) -> RiskModel:
    """Return a standardised logistic risk model of `is_error` on the named features.

    Unweighted, so the risk estimates P(wrong | features) on data like the fit data. With
    `c` None the inverse regularisation is chosen from C_GRID by inner cross-validation
    (log-loss, INNER_FOLDS folds, or fewer when errors are scarce).
    """
    x = _matrix(features, names)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    y = is_error.astype(int)
    inner = min(INNER_FOLDS, int(y.sum()), int((1 - y).sum()))
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


def cross_fitted_risks(features: dict[str, np.ndarray], is_error: np.ndarray,
                       names: Sequence[str], *, folds: int, repeats: int, seed: int
                       ) -> np.ndarray:
    """Return (repeats, N): each image's out-of-fold risk in each of `repeats` K-fold
    splits (row r from the models fitted without the image's fold of split r)."""
    out = np.zeros((repeats, len(is_error)))
    for r in range(repeats):
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for train, test in splitter.split(np.zeros(len(is_error)), is_error):
            model = fit_risk_model({n: features[n][train] for n in names}, is_error[train],
                                   names, seed=seed)
            out[r, test] = predict_risk(model, {n: features[n][test] for n in names})
    return out


def cross_fitted_risk(features: dict[str, np.ndarray], is_error: np.ndarray,
                      names: Sequence[str], *, folds: int, repeats: int, seed: int
                      ) -> np.ndarray:
    """Return each image's out-of-fold risk, (N,), averaged over `repeats` K-fold splits."""
    return cross_fitted_risks(features, is_error, names, folds=folds, repeats=repeats,
                              seed=seed).mean(axis=0)


def names_of(families: Sequence[Family]) -> list[str]:
    """Return the features of the families, in order."""
    return [n for f in families for n in f.features()]


@dataclass
class FamilyEffect:
    """What one offered family does in the fused model."""

    family: Family
    drop_one: float
    """Out-of-fold AUROC of every offered family minus that without this one."""
    cost: float
    """family_cost, plain-forward units."""


@dataclass
class Fusion:
    """The outcome of `fuse`: the families the served model uses and the evidence."""

    families: list[Family]
    """The families of the risk model, "msp" first."""
    risks: np.ndarray | None
    """(repeats, N) out-of-fold risks of the fused model; None for msp alone, whose
    full-data risk ranks exactly as MSP and serves instead."""
    fused_vs_msp: dict[str, float]
    """Out-of-fold AUROC(fused) − AUROC(MSP) with its paired 95% interval (NaN when no
    fused model could be fitted)."""
    effects: list[FamilyEffect] = field(default_factory=list)
    fallback: str = ""
    """Why the model is msp alone although other families were offered ("" if it is not)."""

    @property
    def risk(self) -> np.ndarray | None:
        """(N,) out-of-fold risk averaged over the repeats (None for msp alone)."""
        return None if self.risks is None else self.risks.mean(axis=0)


def fuse(features: dict[str, np.ndarray], is_error: np.ndarray, base: Family,
         candidates: list[Family], *, folds: int = 5, repeats: int = 2,
         n_resamples: int = 500, seed: int = 0, max_cost: float | None = None) -> Fusion:
    """Return the fused risk model's families and out-of-fold evidence by SHRINKAGE_RULE.

    `features` holds every feature of `base` and `candidates`; `base` is msp.
    """
    nan = {"difference": float("nan"), "low": float("nan"), "high": float("nan"),
           "p_not_better": float("nan")}

    def risks(families: list[Family]) -> np.ndarray:
        return cross_fitted_risks(features, is_error, names_of(families), folds=folds,
                                  repeats=repeats, seed=seed)

    n_errors = int(is_error.sum())
    if n_errors < MIN_ERRORS_TO_FUSE or not candidates:
        reason = (f"only {n_errors} wrong predictions (fewer than {MIN_ERRORS_TO_FUSE}): "
                  "nothing to fit beyond msp" if candidates else "")
        return Fusion([base], None, nan, fallback=reason)
    offered = [base, *candidates]
    every = risks(offered)
    every_auroc = auroc(is_error, every.mean(axis=0))
    effects = [FamilyEffect(f, every_auroc - auroc(
        is_error, risks([g for g in offered if g is not f]).mean(axis=0)), family_cost(f))
               for f in candidates]
    chosen, chosen_risks = offered, every
    if max_cost is not None and sum(e.cost for e in effects) > max_cost:
        chosen, spent = [base], 0.0
        for effect in sorted(effects, key=lambda e: -e.drop_one):
            if spent + effect.cost <= max_cost:
                chosen.append(effect.family)
                spent += effect.cost
        chosen = [base, *(f for f in candidates if f in chosen)]  # the offered order
        if len(chosen) == 1:
            return Fusion([base], None, nan, effects,
                          fallback=f"no family fits within a cost of {max_cost:g}")
        chosen_risks = risks(chosen)
    msp_error_score = -np.asarray(features["neg_log_1m_msp"], dtype=float)
    n_features = len(names_of(chosen))
    if n_errors < ERRORS_PER_FEATURE * n_features:
        return Fusion([base], None, nan, effects, fallback=(
            f"only {n_errors} wrong predictions for {n_features} features (fewer than "
            f"{ERRORS_PER_FEATURE} per feature): the fused model would overfit"))
    comparison = paired_auroc_difference(is_error, chosen_risks.mean(axis=0), msp_error_score,
                                         n_resamples=n_resamples, seed=seed)
    if comparison["high"] < 0:
        return Fusion([base], None, comparison, effects, fallback=(
            f"the fused model is worse than MSP out of fold beyond noise "
            f"({comparison['difference']:+.4f} [{comparison['low']:+.4f}, "
            f"{comparison['high']:+.4f}])"))
    return Fusion(chosen, chosen_risks, comparison, effects)
