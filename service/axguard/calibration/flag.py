"""From one prediction's logits and CO scores to the verdict: the only implementation.

Calibration, evaluation and the serving engine all call `features_of` and `verdicts`.
"""

from __future__ import annotations

import numpy as np

from .artifact import CalibrationArtifact
from .features import co_feature_name, logit_features
from .risk import predict_risk


def features_of(logits: np.ndarray, co_scores: dict[tuple[str, str], np.ndarray]
                ) -> dict[str, np.ndarray]:
    """Return label-free features: logit features plus one "co:method:process" per score.

    `logits` is (N, C); each CO array is (N,) label-free scores.
    """
    features = logit_features(np.asarray(logits, dtype=float))
    for (method, process), values in co_scores.items():
        features[co_feature_name(method, process)] = np.asarray(values, dtype=float)
    return features


def flags(mode: str, threshold: float, risk: np.ndarray) -> np.ndarray:
    """Return the "likely wrong" flags: risk > t in false-alarm mode, risk ≥ t in
    error-recall mode (the order-statistic rules of calibration/thresholds.py)."""
    return risk > threshold if mode == "false_alarm" else risk >= threshold


def verdicts(artifact: CalibrationArtifact, features: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Return (risk (N,), likely_wrong (N,) bool) for label-free features."""
    risk = predict_risk(artifact.risk_model, features)
    return risk, flags(artifact.threshold.mode, artifact.threshold.value, risk)
