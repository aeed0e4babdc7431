"""The serving side of the "likely wrong" flag: evidence → features → risk → verdict.

numpy and pydantic only (no scikit-learn, no scipy, no torch), so the engine can import it
cheaply; fitting, evaluation and reports live above it in `calibration/`.

The engine's passes produce raw `Evidence` for a batch (logits, gradient norms, logits of
counterfactual inputs, ...); the pure functions below turn it into label-free features
(DESIGN 1.7). A `FlagModel` names the evidence families it uses, so the engine computes
exactly those. Every feature has a fixed orientation (`error_sign`): `sign * value` is an
error score, higher = more likely wrong.

Families (each a unit that calibration keeps or drops):
    msp             −log(1 − MSP), the base of every risk model
    logit           MSP, margin z_ŷ − z₂, entropy, energy
    boundary        log[(z_ŷ − z₂) / ‖∇ₓ(z_ŷ − z₂)‖₂], first-order distance to the boundary
    counterfactual  per method M (the paper's AX process, label-free): margin change under
                    x + h₂ (h₂ the normalised heatmap of the runner-up class), whether ŷ
                    flips there, and the margin change under x − h (ŷ's own heatmap)
    perturbation    −log(1 − MSP) at x − ε·sign(∇ₓ(−log p_ŷ)) (ODIN/DOCTOR style)
    views           agreement with ŷ and mean log p_ŷ over configured test-time views
    co              the paper's label-free CO scores
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FamilyName = Literal["msp", "logit", "boundary", "counterfactual", "perturbation", "views",
                     "co"]
FAMILY_NAMES: tuple[str, ...] = ("msp", "logit", "boundary", "counterfactual",
                                 "perturbation", "views", "co")
"""Every family; "msp" is the base and always part of a risk model."""
OFFERED_FAMILIES = FAMILY_NAMES[1:]
"""Families calibration may offer (`--families`)."""
DEFAULT_FAMILIES = ("logit", "boundary", "counterfactual", "perturbation", "co")
"""Offered by default; "views" joins when the model's settings name views."""
EPSILON_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
"""Perturbation steps calibration picks from on the fit data (pixel space [0, 1])."""


# ---------------------------------------------------------------------------------------
# Pure feature functions on (N, C) logits and friends. float64 in, float64 out.

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return log softmax over the last axis, computed stably."""
    z = np.asarray(logits, dtype=float)
    top = z.max(axis=-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=-1, keepdims=True))


def msp(logits: np.ndarray) -> np.ndarray:
    """Return the maximum softmax probability, (N,) in [1/C, 1]."""
    return np.exp(log_softmax(logits).max(axis=-1))


def neg_log_one_minus_msp(logits: np.ndarray) -> np.ndarray:
    """Return −log(1 − MSP), (N,) ≥ 0, without cancellation when MSP is close to 1.

    1 − MSP is the softmax mass off the top class, so −log(1 − MSP) =
    logsumexp(z) − logsumexp(z without its maximum).
    """
    z = np.asarray(logits, dtype=float)
    top = z.argmax(axis=-1)
    others = np.where(np.arange(z.shape[-1]) == top[..., None], -np.inf, z)
    return _logsumexp(z) - _logsumexp(others)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


def top_two(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (predicted class ŷ, runner-up class), each (N,) int; ties go to the lower index."""
    order = np.argsort(-np.asarray(logits, dtype=float), axis=-1, kind="stable")
    return order[..., 0], order[..., 1]


def pair_margin(logits: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return z_first − z_second per row, (N,)."""
    z = np.asarray(logits, dtype=float)
    rows = np.arange(z.shape[0])
    return z[rows, first] - z[rows, second]


def margin(logits: np.ndarray) -> np.ndarray:
    """Return the top-1 minus top-2 logit, (N,) ≥ 0."""
    first, second = top_two(logits)
    return pair_margin(logits, first, second)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Return the softmax entropy in nats, (N,) in [0, log C]."""
    log_p = log_softmax(logits)
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def energy(logits: np.ndarray) -> np.ndarray:
    """Return the free energy −logsumexp(logits), (N,); higher means less confident."""
    return -_logsumexp(np.asarray(logits, dtype=float))


def boundary_log_distance(margin_values: np.ndarray, gradient_norm: np.ndarray) -> np.ndarray:
    """Return log(margin / ‖∇ₓ margin‖₂), the log of the first-order distance to the boundary.

    Both are clipped below at 1e-12, so a zero margin or a zero gradient stays finite.
    """
    floor = 1e-12
    return (np.log(np.maximum(np.asarray(margin_values, dtype=float), floor))
            - np.log(np.maximum(np.asarray(gradient_norm, dtype=float), floor)))


def margin_change(logits: np.ndarray, logits_after: np.ndarray, predicted: np.ndarray,
                  runner_up: np.ndarray) -> np.ndarray:
    """Return (z'_ŷ − z'₂) − (z_ŷ − z₂): how the margin over the runner-up moves, (N,)."""
    return (pair_margin(logits_after, predicted, runner_up)
            - pair_margin(logits, predicted, runner_up))


def flipped(logits_after: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Return 1.0 where the argmax of `logits_after` is no longer ŷ, else 0.0, (N,)."""
    return (np.asarray(logits_after).argmax(axis=-1) != predicted).astype(float)


def view_agreement(view_logits: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Return the share of views whose argmax is ŷ; `view_logits` is (V, N, C)."""
    return (np.asarray(view_logits).argmax(axis=-1) == predicted[None, :]).mean(axis=0)


def view_mean_log_prob(view_logits: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Return the mean over views of log p_ŷ; `view_logits` is (V, N, C)."""
    log_p = log_softmax(view_logits)
    rows = np.arange(log_p.shape[1])
    return log_p[:, rows, predicted].mean(axis=0)


# ---------------------------------------------------------------------------------------
# Families: what to compute, and the features it gives.

class MethodPair(BaseModel):
    """An attribution method and AX process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    ax_process: str


def co_feature_name(method: str, ax_process: str, labelled: bool = False) -> str:
    """Return the feature name of a CO score, e.g. "co:saliency:sum" or "co_labelled:…"."""
    return f"{'co_labelled' if labelled else 'co'}:{method}:{ax_process}"


class Family(BaseModel):
    """One evidence family with its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: FamilyName
    method: str | None = None
    """counterfactual: the attribution method of h and h₂."""
    epsilon: float | None = Field(default=None, gt=0, lt=1)
    """perturbation: the step ε in pixel space, in (0, 1)."""
    views: tuple[str, ...] = ()
    """views: the test-time views (see evidence.parse_view)."""
    pairs: tuple[MethodPair, ...] = ()
    """co: the method/AX-process pairs."""

    @property
    def key(self) -> str:
        """A short unique label, e.g. "counterfactual:saliency" or "perturbation:0.01"."""
        if self.name == "counterfactual":
            return f"counterfactual:{self.method}"
        if self.name == "perturbation":
            return f"perturbation:{self.epsilon:g}"
        return self.name

    def features(self) -> list[str]:
        """Return the names of the features this family gives, in a fixed order."""
        if self.name == "msp":
            return ["neg_log_1m_msp"]
        if self.name == "logit":
            return ["msp", "margin", "entropy", "energy"]
        if self.name == "boundary":
            return ["boundary_log_distance"]
        if self.name == "counterfactual":
            m = self.method
            return [f"runner_up_margin_change:{m}", f"runner_up_flip:{m}",
                    f"own_removed_margin_change:{m}"]
        if self.name == "perturbation":
            return [f"perturbed_neg_log_1m_msp:{self.epsilon:g}"]
        if self.name == "views":
            return ["view_agreement", "view_mean_log_prob"]
        return [co_feature_name(p.method, p.ax_process) for p in self.pairs]


_ERROR_SIGN = {"neg_log_1m_msp": -1.0, "msp": -1.0, "margin": -1.0, "entropy": 1.0,
               "energy": 1.0, "boundary_log_distance": -1.0, "runner_up_margin_change": -1.0,
               "runner_up_flip": 1.0, "own_removed_margin_change": 1.0,
               "perturbed_neg_log_1m_msp": -1.0, "view_agreement": -1.0,
               "view_mean_log_prob": -1.0, "co": -1.0, "co_labelled": -1.0, "risk": 1.0}


def error_sign(name: str) -> float:
    """Return +1 when larger values of feature `name` mean "more likely wrong", else −1.

    Fixed in advance, never flipped after looking at data. A larger drop of the margin
    when ŷ's own evidence is removed means the prediction rests on that evidence, which
    we take as more trustworthy: own_removed_margin_change is +1 (a smaller drop is more
    suspicious).
    """
    base = name.split(":", 1)[0]
    if base not in _ERROR_SIGN:
        raise KeyError(f"no orientation for feature {name!r}")
    return _ERROR_SIGN[base]


@dataclass
class Evidence:
    """What the engine's passes measured for a batch of N images, as numpy arrays.

    Only the entries that the requested families need are filled.
    """

    logits: np.ndarray
    """(N, C) raw logits of x."""
    margin_gradient_norm: np.ndarray | None = None
    """(N,) ‖∇ₓ(z_ŷ − z₂)‖₂ (boundary)."""
    runner_up_logits: dict[str, np.ndarray] = field(default_factory=dict)
    """method → (N, C) logits of x + h₂ (counterfactual)."""
    own_removed_logits: dict[str, np.ndarray] = field(default_factory=dict)
    """method → (N, C) logits of x − h (counterfactual)."""
    perturbed_logits: dict[float, np.ndarray] = field(default_factory=dict)
    """ε → (N, C) logits of x − ε·sign(∇ₓ(−log p_ŷ)) (perturbation)."""
    view_logits: np.ndarray | None = None
    """(V, N, C) logits of the configured views (views)."""
    co: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """(method, process) → (N,) label-free CO scores (co)."""

    def select(self, rows: np.ndarray) -> Evidence:
        """Return the evidence of some rows only."""
        return Evidence(
            logits=self.logits[rows],
            margin_gradient_norm=(None if self.margin_gradient_norm is None
                                  else self.margin_gradient_norm[rows]),
            runner_up_logits={k: v[rows] for k, v in self.runner_up_logits.items()},
            own_removed_logits={k: v[rows] for k, v in self.own_removed_logits.items()},
            perturbed_logits={k: v[rows] for k, v in self.perturbed_logits.items()},
            view_logits=None if self.view_logits is None else self.view_logits[:, rows],
            co={k: v[rows] for k, v in self.co.items()},
        )


def family_features(family: Family, evidence: Evidence,
                    top: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> dict[str, np.ndarray]:
    """Return the features of one family, each (N,) float64, from the batch's evidence.

    `top` is `top_two(evidence.logits)` when the caller has it already.
    """
    z = evidence.logits
    predicted, runner_up = top if top is not None else top_two(z)
    if family.name == "msp":
        return {"neg_log_1m_msp": neg_log_one_minus_msp(z)}
    if family.name == "logit":
        return {"msp": msp(z), "margin": margin(z), "entropy": entropy(z), "energy": energy(z)}
    if family.name == "boundary":
        assert evidence.margin_gradient_norm is not None
        return {"boundary_log_distance": boundary_log_distance(
            pair_margin(z, predicted, runner_up), evidence.margin_gradient_norm)}
    if family.name == "counterfactual":
        m = str(family.method)
        up, removed = evidence.runner_up_logits[m], evidence.own_removed_logits[m]
        return {f"runner_up_margin_change:{m}": margin_change(z, up, predicted, runner_up),
                f"runner_up_flip:{m}": flipped(up, predicted),
                f"own_removed_margin_change:{m}": margin_change(z, removed, predicted,
                                                                runner_up)}
    if family.name == "perturbation":
        return {family.features()[0]: neg_log_one_minus_msp(
            evidence.perturbed_logits[float(family.epsilon or 0)])}
    if family.name == "views":
        assert evidence.view_logits is not None
        return {"view_agreement": view_agreement(evidence.view_logits, predicted),
                "view_mean_log_prob": view_mean_log_prob(evidence.view_logits, predicted)}
    return {co_feature_name(p.method, p.ax_process):
            np.asarray(evidence.co[(p.method, p.ax_process)], dtype=float)
            for p in family.pairs}


def features_of(families: list[Family], evidence: Evidence) -> dict[str, np.ndarray]:
    """Return every feature of the given families."""
    out: dict[str, np.ndarray] = {}
    top = top_two(evidence.logits)
    for family in families:
        out.update(family_features(family, evidence, top))
    return out


# ---------------------------------------------------------------------------------------
# The risk model and the verdict.

class RiskModel(BaseModel):
    """risk = sigmoid(Σ coef_i · (x_i − mean_i) / scale_i + intercept), in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    regularisation_c: float


def predict_risk(model: RiskModel, features: dict[str, np.ndarray]) -> np.ndarray:
    """Return the risk of each prediction, (N,) float64 in [0, 1]."""
    x = np.column_stack([np.asarray(features[n], dtype=float) for n in model.features])
    z = (x - np.asarray(model.mean)) / np.asarray(model.scale) @ np.asarray(model.coef)
    z = np.clip(z + model.intercept, -700.0, 700.0)  # exp stays finite
    return 1.0 / (1.0 + np.exp(-z))


def flags(mode: str, threshold: float, risk: np.ndarray) -> np.ndarray:
    """Return the "likely wrong" flags: risk > t in false-alarm mode, risk ≥ t in
    error-recall mode (the order-statistic rules of calibration/thresholds.py)."""
    return risk > threshold if mode == "false_alarm" else risk >= threshold


class FlagModel(BaseModel):
    """What serving needs for the verdict: the families, the risk model, the threshold."""

    model_config = ConfigDict(extra="forbid")

    families: list[Family]
    """The families the risk model uses ("msp" first); the engine computes exactly these."""
    risk_model: RiskModel
    mode: Literal["false_alarm", "error_recall"]
    threshold: float
    """Flag when risk > threshold (false_alarm) or risk ≥ threshold (error_recall)."""

    def family(self, name: str) -> list[Family]:
        """Return the families called `name`."""
        return [f for f in self.families if f.name == name]

    def verdicts(self, evidence: Evidence) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Return (risk (N,), likely_wrong (N,) bool, the features used) for a batch."""
        features = features_of(self.families, evidence)
        risk = predict_risk(self.risk_model, features)
        return risk, flags(self.mode, self.threshold, risk), features


@dataclass(frozen=True)
class EvidencePlan:
    """The evidence a batch computes for the verdict, beyond the logits."""

    boundary: bool = False
    counterfactual: tuple[str, ...] = ()
    """Methods whose runner-up heatmap h₂ and own heatmap h feed counterfactual inputs."""
    epsilons: tuple[float, ...] = ()
    """Perturbation steps."""
    views: tuple[str, ...] = ()
    co_pairs: tuple[tuple[str, str], ...] = ()
    """(method, AX process) pairs whose label-free CO scores the verdict uses."""

    @classmethod
    def of(cls, families: Sequence[Family]) -> EvidencePlan:
        """Return the plan that computes exactly the given families."""
        return cls(
            boundary=any(f.name == "boundary" for f in families),
            counterfactual=tuple(dict.fromkeys(
                str(f.method) for f in families if f.name == "counterfactual")),
            epsilons=tuple(dict.fromkeys(
                float(f.epsilon or 0) for f in families if f.name == "perturbation")),
            views=tuple(dict.fromkeys(v for f in families if f.name == "views"
                                      for v in f.views)),
            co_pairs=tuple(dict.fromkeys((p.method, p.ax_process) for f in families
                                         if f.name == "co" for p in f.pairs)),
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """Every attribution method the plan needs."""
        return tuple(dict.fromkeys((*self.counterfactual, *(m for m, _ in self.co_pairs))))
