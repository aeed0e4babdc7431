"""The calibration artifact: a versioned pydantic schema, stored as JSON.

It binds the flag to one model (by the sha256 fingerprint of its weights) and records the
scores of every calibration image, the metrics, the risk model and the threshold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from .verdict import EvidencePlan, Family, FlagModel, MethodPair

SCHEMA_VERSION = 2
"""Version 2 (axguard 0.2): evidence families, cross-fitted selection, FlagModel."""


class _Strict(BaseModel):
    # NaN (an undefined rate) is written as NaN, which the JSON reader accepts back.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


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
    evaluated_on: Literal["all", "out_of_fold"]
    """"all": the raw feature over every calibration image; "out_of_fold": cross-fitted
    predictions on the fit split (each image scored by a model fitted without it)."""
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
    """Share of correct predictions flagged (out of fold; version 2: on the threshold split
    in false-alarm mode)."""
    achieved_error_recall: float
    """Share of wrong predictions flagged (out of fold; version 2: on the threshold split in
    error-recall mode)."""
    flagged_share: float
    """Expected share of all predictions flagged, from the two rates above."""


class SelectionStep(_Strict):
    """One candidate family tried at one step of the forward selection."""

    step: int
    family: str
    """The family's key, e.g. "boundary" or "counterfactual:saliency"."""
    features: list[str]
    auroc: float
    """Out-of-fold AUROC of the current set plus this family (fit split)."""
    gain: float
    """auroc minus the out-of-fold AUROC of the current set."""
    gain_low: float
    """One-sided 95% paired-bootstrap lower bound of the gain."""
    accepted: bool


class FamilyReport(_Strict):
    """One offered family in the fused risk model (schema 2, version 3 of the flag)."""

    family: str
    """The family's key, e.g. "boundary" or "counterfactual:saliency"."""
    coefficients: dict[str, float]
    """Standardised coefficient of each of its features in the served risk model (0 when
    the family is not served: a fallback or the cost bound left it out)."""
    drop_one: float
    """Out-of-fold AUROC with every offered family minus that without this one (held-out
    folds; noise of about ±0.004 with 60–160 errors)."""
    cost: float
    """What it adds to a verdict, in plain forwards (a backward counts 2; an upper bound)."""
    kept: bool


class Selection(_Strict):
    """How the risk model's families were chosen, and the evidence for each choice."""

    rule: str
    """The rule in words."""
    folds: int
    repeats: int
    candidates: list[Family]
    """Every family offered (after ε was picked from its grid)."""
    epsilon_grid: list[float]
    epsilon_aurocs: list[float]
    """Out-of-fold AUROC of msp + perturbation at each ε of the grid (empty if not offered)."""
    steps: list[SelectionStep]
    """Forward-selection steps (flags of version 2; empty for the fused model)."""
    kept: list[str]
    """Keys of the kept families, "msp" first."""
    skipped_reason: str = ""
    """Why the model is msp alone although more was offered (too few errors, worse than
    MSP beyond noise, nothing within the cost bound); "" otherwise."""
    families: list[FamilyReport] = Field(default_factory=list)
    """Every offered family's coefficients, drop-one effect and cost (version 3)."""
    fused_vs_msp: PairedDifference | None = None
    """Out-of-fold AUROC of the fused model minus MSP's, the guard's evidence."""
    max_cost: float | None = None
    """The cost bound given to calibrate, in plain forwards (None: no bound)."""
    cost: float = 0.0
    """What the served verdict adds to a prediction, in plain forwards (upper bound)."""


LATER_SELECTION_FIELDS = {"families": [], "fused_vs_msp": None, "max_cost": None, "cost": 0.0}
"""Selection fields of the flag's version 3, with the defaults a version-2 artifact reads."""


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
    """Every candidate feature, the labelled CO scores, "risk" (final model, all images)
    and "risk_out_of_fold" (fit split only; NaN on the threshold split)."""


class CalibrationArtifact(_Strict):
    """Everything the server needs for the verdict, and everything a report shows."""

    schema_version: Literal[2] = SCHEMA_VERSION
    calibration_id: str = ""
    created_at: str
    model: ModelRef
    data: DataInfo
    pairs: list[MethodPair]
    """The method/AX-process pairs whose CO scores were measured (and offered as "co")."""
    flag: FlagModel
    """What serving needs: the kept families, the risk model and the threshold."""
    selection: Selection
    threshold: ThresholdInfo
    gax_target: float
    gax_target_percentile: float
    metrics: list[ScoreMetrics]
    risk_vs_msp: PairedDifference
    ranking: list[RankEntry]
    notes: list[str] = Field(default_factory=list)
    samples: Samples

    @model_validator(mode="after")
    def _one_threshold(self) -> CalibrationArtifact:
        if (self.flag.threshold, self.flag.mode) != (self.threshold.value, self.threshold.mode):
            raise ValueError("flag.threshold/mode and threshold.value/mode differ")
        return self

    def with_threshold(self, value: float) -> CalibrationArtifact:
        """Return a copy with another threshold (both places that hold it)."""
        return self.model_copy(update={
            "threshold": self.threshold.model_copy(update={"value": value}),
            "flag": self.flag.model_copy(update={"threshold": value})})

    def metric(self, name: str, evaluated_on: str = "all") -> ScoreMetrics:
        """Return the metrics of one score."""
        for m in self.metrics:
            if m.name == name and m.evaluated_on == evaluated_on:
                return m
        raise KeyError(name)

    def content_id(self) -> str:
        """Return "cal-" + the first 12 hex digits of the sha256 of the content without id.

        Fields added to schema 2 later count only when they differ from their defaults, so
        an artifact written before them keeps its id (receipts and metrics carry it).
        """
        body = self.model_dump(mode="json", exclude={"calibration_id"})
        for name, default in LATER_SELECTION_FIELDS.items():
            if body["selection"].get(name, default) == default:
                body["selection"].pop(name, None)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return f"cal-{digest[:12]}"


def save_artifact(artifact: CalibrationArtifact, path: Path) -> CalibrationArtifact:
    """Write the artifact as JSON with its content id filled in; return it.

    Written to a temporary file and renamed into place, so a failure never leaves a
    half-written artifact behind.
    """
    artifact = artifact.model_copy(update={"calibration_id": artifact.content_id()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(artifact.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return artifact


def load_artifact(path: Path) -> CalibrationArtifact:
    """Read and validate an artifact; ConfigError when it is unreadable, invalid or of an
    older schema version (with the command that makes a new one)."""
    try:
        text = Path(path).read_text()
        version = json.loads(text).get("schema_version")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"cannot load calibration {path}: {err}", field="calibration") from err
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has schema version {version}, this axguard reads version "
            f"{SCHEMA_VERSION} (evidence families, cross-fitted selection); recalibrate with "
            "`axguard calibrate --data DIR --out FILE` and the model options you serve with",
            field="calibration")
    try:
        return CalibrationArtifact.model_validate_json(text)
    except ValueError as err:
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
    needed = EvidencePlan.of(artifact.flag.families).methods
    missing = sorted(set(needed) - set(available_methods))
    if missing:
        raise ConfigError(
            f"calibration {artifact.calibration_id} needs methods {missing}, which this model "
            f"does not offer (available: {', '.join(available_methods)})",
            field="calibration",
        )
