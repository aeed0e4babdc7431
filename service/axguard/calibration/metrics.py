"""How well an error score separates wrong from correct predictions (errors are positives).

`is_error` is (N,) bool; `error_score` is (N,) float, higher = more likely wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

Metric = Callable[[np.ndarray, np.ndarray], float]


def auroc(is_error: np.ndarray, error_score: np.ndarray) -> float:
    """Return the area under the ROC curve with errors as positives (0.5 = chance)."""
    return float(roc_auc_score(is_error, error_score))


def aupr_error(is_error: np.ndarray, error_score: np.ndarray) -> float:
    """Return the average precision of finding errors (chance = the error rate)."""
    return float(average_precision_score(is_error, error_score))


def fpr_at_95_correct_kept(is_error: np.ndarray, error_score: np.ndarray) -> float:
    """Return the share of errors still accepted when 95% of correct predictions are kept.

    The acceptance threshold is the smallest error score that keeps at least 95% of the
    correct predictions (score ≤ threshold is kept).
    """
    correct = np.sort(error_score[~is_error])
    keep = int(np.ceil(0.95 * len(correct)))
    threshold = correct[keep - 1]
    return float(np.mean(error_score[is_error] <= threshold))


def risk_coverage(is_error: np.ndarray, error_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (coverage, selective risk) when accepting predictions by ascending error score.

    Point k keeps the k least suspicious predictions: coverage k/N, risk = errors among them / k.
    Ties are broken by keeping errors last (the score cannot tell them apart anyway... the
    stable order of a sort on (score, is_error) makes the curve deterministic).
    """
    order = np.lexsort((is_error, error_score))
    errors = np.cumsum(is_error[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), errors / k


def aurc(is_error: np.ndarray, error_score: np.ndarray) -> float:
    """Return the area under the risk–coverage curve (mean selective risk over k)."""
    return float(np.mean(risk_coverage(is_error, error_score)[1]))


def eaurc(is_error: np.ndarray, error_score: np.ndarray) -> float:
    """Return AURC minus the AURC of a perfect score on the same predictions."""
    oracle = aurc(is_error, is_error.astype(float))
    return aurc(is_error, error_score) - oracle


METRICS: dict[str, Metric] = {
    "auroc": auroc,
    "aupr_error": aupr_error,
    "fpr_at_95_correct_kept": fpr_at_95_correct_kept,
    "aurc": aurc,
    "eaurc": eaurc,
}


def resamples(is_error: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield bootstrap index arrays over the predictions, skipping resamples that hold no
    error or no correct prediction (every metric here is undefined there). The same seed
    gives the same resamples, so intervals of different scores are paired."""
    rng = np.random.default_rng(seed)
    n = len(is_error)
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        sample = is_error[idx]
        if sample.any() and not sample.all():
            yield idx


def percentile_interval(values: list[float], level: float) -> tuple[float, float]:
    """Return the central `level` percentile interval of bootstrap values (NaN if none)."""
    if not values:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    is_error: np.ndarray, error_score: np.ndarray, *, n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Return the percentile bootstrap interval of every metric in METRICS."""
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for idx in resamples(is_error, n_resamples, seed):
        for name, metric in METRICS.items():
            values[name].append(metric(is_error[idx], error_score[idx]))
    return {name: percentile_interval(vals, level) for name, vals in values.items()}


def bootstrap_interval(
    metric: Metric, is_error: np.ndarray, error_score: np.ndarray, *,
    n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Return the percentile bootstrap interval of one metric (resampling predictions)."""
    values = [metric(is_error[idx], error_score[idx])
              for idx in resamples(is_error, n_resamples, seed)]
    return percentile_interval(values, level)


def paired_auroc_difference(
    is_error: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *,
    n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, float]:
    """Return AUROC(a) − AUROC(b) on the same predictions with a paired bootstrap interval.

    `p_not_better` is the share of resamples where a does not beat b.
    """
    diffs = [auroc(is_error[idx], score_a[idx]) - auroc(is_error[idx], score_b[idx])
             for idx in resamples(is_error, n_resamples, seed)]
    low, high = percentile_interval(diffs, level)
    return {
        "difference": auroc(is_error, score_a) - auroc(is_error, score_b),
        "low": low, "high": high,
        "p_not_better": float(np.mean(np.asarray(diffs) <= 0)) if diffs else float("nan"),
    }


def separation(correct: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    """Return the median gap (correct − wrong) and a two-sided Mann–Whitney U test."""
    if len(correct) == 0 or len(wrong) == 0:
        return {"median_gap": float("nan"), "mann_whitney_u": float("nan"),
                "mann_whitney_p": float("nan")}
    test = stats.mannwhitneyu(correct, wrong, alternative="two-sided")
    return {"median_gap": float(np.median(correct) - np.median(wrong)),
            "mann_whitney_u": float(test.statistic), "mann_whitney_p": float(test.pvalue)}


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Return the exact (Clopper–Pearson) interval of a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    ci = stats.binomtest(successes, trials).proportion_ci(confidence_level=level,
                                                         method="exact")
    return float(ci.low), float(ci.high)
