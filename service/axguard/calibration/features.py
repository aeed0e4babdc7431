"""Label-free features of one prediction: logit features and CO scores, as pure functions.

Every feature has a fixed orientation: `ERROR_SIGN[name] * value` is its error score
(higher = more likely wrong). Confidence-like features (MSP, margin, CO) get -1.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

LOGIT_FEATURES = ("msp", "margin", "entropy", "energy")


def msp(logits: np.ndarray) -> np.ndarray:
    """Return the maximum softmax probability, (N,) in [1/C, 1]."""
    return softmax(logits, axis=1).max(axis=1)


def margin(logits: np.ndarray) -> np.ndarray:
    """Return the top-1 minus top-2 logit, (N,) ≥ 0."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(logits: np.ndarray) -> np.ndarray:
    """Return the softmax entropy in nats, (N,) in [0, log C]."""
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    return -(np.exp(log_p) * log_p).sum(axis=1)


def energy(logits: np.ndarray) -> np.ndarray:
    """Return the free energy −logsumexp(logits), (N,); higher means less confident."""
    return -logsumexp(logits, axis=1)


def logit_features(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Return every logit feature of (N, C) logits."""
    return {"msp": msp(logits), "margin": margin(logits), "entropy": entropy(logits),
            "energy": energy(logits)}


def co_feature_name(method: str, ax_process: str, labelled: bool = False) -> str:
    """Return the feature name of a CO score, e.g. "co:saliency:sum" or "co_labelled:…"."""
    return f"{'co_labelled' if labelled else 'co'}:{method}:{ax_process}"


def error_sign(name: str) -> float:
    """Return +1 when larger values mean "more likely wrong", else −1."""
    if name in ("entropy", "energy", "risk"):
        return 1.0
    if name in ("msp", "margin") or name.startswith(("co:", "co_labelled:")):
        return -1.0
    raise KeyError(f"no orientation for feature {name!r}")
