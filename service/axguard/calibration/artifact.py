"""The calibration artifact: a versioned pydantic schema, stored as JSON.

It binds the flag to one model (by the sha256 fingerprint of its weights) and records the
scores of every calibration image, the metrics, the risk model and the threshold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .risk import CandidateScore, RiskModel

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Interval(_Strict):
    """A value with its bootstrap 95% interval."""

    value: float
    low: float
    high: float


class ScoreMetrics(_Strict):
    """How one score separates wrong from correct predictions (errors are positives)."""

    name: str
    """Feature name: "msp", "co:saliency:sum", "co_labelled:saliency:sum", "risk", …"""
    label_free: bool
    """False for the paper's labelled CO score, which needs the true label."""
    orientation: float
    """+1 if larger means more likely wrong, −1 if larger means more likely correct."""
    evaluated_on: Literal["all", "threshold_split"]
    auroc: Interval
    aupr_error: Interval
    fpr_at_95_correct_kept: Interval
    aurc: Interval
    eaurc: Interval
    median_gap: float
    """median(correct) − median(wrong) of the raw score."""
    mann_whitney_u: float
    mann_whitney_p: float


class PairedDifference(_Strict):
    """AUROC(a) − AUROC(b) on the same predictions, paired bootstrap 95% interval."""

    a: str
    b: str
    difference: float
    low: float
    high: float
    p_not_better: float


class ThresholdInfo(_Strict):
    """The flag's threshold and its promise."""

    mode: Literal["false_alarm", "error_recall"]
    target: float
    """β (most share of correct predictions flagged) or the least error recall."""
    delta: float
    """The promise holds with probability ≥ 1 − δ."""
    value: float
    """Flag when risk > value (false_alarm) or risk ≥ value (error_recall)."""
    order_index: int
    n_used: int
    violation_probability: float
    achieved_false_alarm_rate: float
    """On the threshold split: share of correct predictions flagged."""
    achieved_error_recall: float
    """On the threshold split: share of wrong predictions flagged."""
    flagged_share: float


class MethodPair(_Strict):
    """An attribution method and AX process."""

    method: str
    ax_process: str


class RankEntry(_Strict):
    """One method's separation, for the paper's advice to pick the best method."""

    method: str
    ax_process: str
    auroc_label_free: float
    auroc_labelled: float
    median_gap_label_free: float
    median_gap_labelled: float


class ModelRef(_Strict):
    """The model the artifact belongs to."""

    name: str
    version: str
    fingerprint: str
    class_names: list[str]


class DataInfo(_Strict):
    """The calibration data."""

    source: str
    n_images: int
    n_correct: int
    n_errors: int
    accuracy: float
    split_seed: int
    fit_fraction: float


class Samples(_Strict):
    """Every calibration image: its label, prediction, split and feature values."""

    names: list[str]
    labels: list[int]
    predictions: list[int]
    split: list[Literal["fit", "threshold"]]
    features: dict[str, list[float]]


class CalibrationArtifact(_Strict):
    """Everything the server needs for the verdict, and everything a report shows."""

    schema_version: Literal[1] = SCHEMA_VERSION
    calibration_id: str = ""
    created_at: str
    model: ModelRef
    data: DataInfo
    pairs: list[MethodPair]
    risk_model: RiskModel
    risk_candidates: list[CandidateScore]
    """Cross-validated AUROC of each candidate feature set on the fit split."""
    threshold: ThresholdInfo
    gax_target: float
    gax_target_percentile: float
    metrics: list[ScoreMetrics]
    risk_vs_msp: PairedDifference
    ranking: list[RankEntry]
    notes: list[str] = Field(default_factory=list)
    samples: Samples

    def metric(self, name: str, evaluated_on: str = "all") -> ScoreMetrics:
        """Return the metrics of one score."""
        for m in self.metrics:
            if m.name == name and m.evaluated_on == evaluated_on:
                return m
        raise KeyError(name)

    def content_id(self) -> str:
        """Return "cal-" + the first 12 hex digits of the sha256 of the content without id."""
        body = self.model_dump(mode="json", exclude={"calibration_id"})
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return f"cal-{digest[:12]}"


def save_artifact(artifact: CalibrationArtifact, path: Path) -> CalibrationArtifact:
    """Write the artifact as JSON with its content id filled in; return it."""
    artifact = artifact.model_copy(update={"calibration_id": artifact.content_id()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(artifact.model_dump_json(indent=1) + "\n")
    return artifact


def load_artifact(path: Path) -> CalibrationArtifact:
    """Read and validate an artifact; ConfigError when it is unreadable or invalid."""
    try:
        return CalibrationArtifact.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load calibration {path}: {err}", field="calibration") from err


def check_matches(artifact: CalibrationArtifact, fingerprint: str,
                  available_methods: list[str]) -> None:
    """Raise ConfigError unless the artifact belongs to this model and its methods exist."""
    if artifact.model.fingerprint != fingerprint:
        raise ConfigError(
            f"calibration {artifact.calibration_id} was made for model "
            f"{artifact.model.name} with fingerprint {artifact.model.fingerprint[:16]}…, but "
            f"the served model's fingerprint is {fingerprint[:16]}…; recalibrate",
            field="calibration",
        )
    missing = sorted({p.method for p in artifact.pairs} - set(available_methods))
    if missing:
        raise ConfigError(
            f"calibration {artifact.calibration_id} needs methods {missing}, which this model "
            f"does not offer (available: {', '.join(available_methods)})",
            field="calibration",
        )
