"""Thresholds on the risk with finite-sample guarantees (DESIGN section 4).

Calibration and deployment predictions are assumed exchangeable. With n calibration risks
sorted ascending r(1) ≤ … ≤ r(n) and U = F(R) uniform, the share of new risks above r(k) is
Beta(n−k+1, k) distributed, so P(false-alarm rate > β) = P(Binomial(n, 1−β) ≥ k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


class GuaranteeUnavailable(ValueError):
    """Too few calibration predictions for the requested guarantee."""


@dataclass(frozen=True)
class Threshold:
    """A risk threshold: the flag fires when risk > value (false alarm) or ≥ (recall)."""

    value: float
    order_index: int
    """k, 1-based, of the order statistic used."""
    n: int
    """Calibration predictions the rule used (correct ones, or wrong ones)."""
    violation_probability: float
    """P(promise broken) under exchangeability; ≤ δ."""


def minimum_count(rate: float, delta: float) -> int:
    """Return ⌈log δ / log(1 − rate)⌉, the fewest samples any order-statistic rule needs."""
    return math.ceil(math.log(delta) / math.log(1.0 - rate))


def false_alarm_threshold(correct_risks: np.ndarray, beta: float, delta: float) -> Threshold:
    """Return t with P(share of correct predictions with risk > t exceeds β) ≤ δ.

    t is the smallest order statistic r(k) with P(Binomial(n, 1−β) ≥ k) ≤ δ.
    Raises GuaranteeUnavailable when even r(n) is not enough (n < minimum_count(β, δ)).
    """
    risks = np.sort(np.asarray(correct_risks, dtype=float))
    n = len(risks)
    ks = np.arange(1, n + 1)
    violation = stats.binom.sf(ks - 1, n, 1.0 - beta)  # P(Binomial ≥ k)
    ok = np.nonzero(violation <= delta)[0]
    if len(ok) == 0:
        raise GuaranteeUnavailable(
            f"{n} correct predictions cannot bound the false-alarm rate at {beta} with "
            f"confidence {1 - delta}: at least {minimum_count(beta, delta)} are needed"
        )
    k = int(ks[ok[0]])
    return Threshold(float(risks[k - 1]), k, n, float(violation[ok[0]]))


def error_recall_threshold(error_risks: np.ndarray, recall: float, delta: float) -> Threshold:
    """Return t with P(share of wrong predictions with risk ≥ t below `recall`) ≤ δ.

    With α = 1 − recall, t is the largest order statistic e(j) of the errors' risks with
    P(Binomial(m, α) ≤ j − 1) ≤ δ. Raises GuaranteeUnavailable when m < minimum_count(α, δ).
    """
    alpha = 1.0 - recall
    risks = np.sort(np.asarray(error_risks, dtype=float))
    m = len(risks)
    js = np.arange(1, m + 1)
    violation = stats.binom.cdf(js - 1, m, alpha)  # P(Binomial ≤ j − 1)
    ok = np.nonzero(violation <= delta)[0]
    if len(ok) == 0:
        raise GuaranteeUnavailable(
            f"{m} wrong predictions cannot promise error recall {recall} with confidence "
            f"{1 - delta}: at least {minimum_count(alpha, delta)} are needed; calibrate on "
            "more (or harder) labelled data, or use the false-alarm mode"
        )
    j = int(js[ok[-1]])
    return Threshold(float(risks[j - 1]), j, m, float(violation[ok[-1]]))
