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


def flags(artifact: CalibrationArtifact, risk: np.ndarray) -> np.ndarray:
    """Return the "likely wrong" flags for risks, by the artifact's threshold rule."""
    t = artifact.threshold.value
    return risk > t if artifact.threshold.mode == "false_alarm" else risk >= t


def verdicts(artifact: CalibrationArtifact, features: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Return (risk (N,), likely_wrong (N,) bool) for label-free features."""
    risk = predict_risk(artifact.risk_model, features)
    return risk, flags(artifact, risk)
