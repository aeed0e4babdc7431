"""`axguard evaluate`: check the calibration's promise on separate labelled data."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..engine.core import Engine
from ..errors import ConfigError
from ..flag.artifact import Interval, PairedDifference
from ..flag.verdict import Family, co_feature_name, error_sign, features_of
from . import metrics as m
from .calibrate import collect, left_out_note
from .datasets import LabelledImages


class ScoreAuroc(BaseModel):
    """AUROC (errors as positives) of one score with its bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    name: str
    label_free: bool
    auroc: Interval


class Evaluation(BaseModel):
    """The promise checked on held-out data."""

    model_config = ConfigDict(extra="forbid")

    calibration_id: str
    data_source: str
    n_images: int
    n_errors: int
    accuracy: float
    mode: str
    target: float
    delta: float
    observed_rate: float
    """False-alarm rate (flagged share of correct predictions) or error recall."""
    observed_interval: tuple[float, float]
    """Exact binomial 95% interval of the observed rate."""
    promise_held: bool
    """False only when the whole interval lies on the wrong side of the target."""
    false_alarm_rate: float
    error_recall: float
    flagged_share: float
    aurocs: list[ScoreAuroc]
    risk_vs_msp: PairedDifference
    left_out: list[tuple[str, str]] = []
    """(image, stage) of images left out: the model's output for them was not finite."""


def evaluate(engine: Engine, images: LabelledImages, *, n_bootstrap: int = 1000,
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> Evaluation:
    """Return the evaluation of the engine's calibration on labelled images."""
    artifact = engine.calibration
    if artifact is None:
        raise ConfigError("evaluation needs a calibration", field="calibration")
    pairs = [(p.method, p.ax_process) for p in artifact.pairs]
    data = collect(engine, images, pairs, batch_size=batch_size, progress=progress)
    is_error = data.is_error
    risk, flagged, used = artifact.flag.verdicts(data.evidence)
    extra = [Family(name="logit")] + [Family(name="co", pairs=tuple(artifact.pairs))]
    features = {**features_of(extra, data.evidence), **used}
    n_err, n_ok = int(is_error.sum()), int((~is_error).sum())
    false_alarms = int(flagged[~is_error].sum())
    caught = int(flagged[is_error].sum())
    t = artifact.threshold
    if t.mode == "false_alarm":
        observed, hits, trials = false_alarms / max(n_ok, 1), false_alarms, n_ok
        low, high = m.binomial_interval(hits, trials)
        held = not low > t.target
    else:
        observed, hits, trials = caught / max(n_err, 1), caught, n_err
        low, high = m.binomial_interval(hits, trials)
        held = not high < t.target

    scores = {"risk": risk, **features}
    scores.update({co_feature_name(a, b, labelled=True): v
                   for (a, b), v in data.co_labelled.items()})
    aurocs = []
    if n_err and n_ok:
        for name, values in scores.items():
            error_score = error_sign(name) * values
            lo, hi = m.bootstrap_interval(m.auroc, is_error, error_score,
                                          n_resamples=n_bootstrap, seed=seed)
            aurocs.append(ScoreAuroc(name=name, label_free=not name.startswith("co_labelled"),
                                     auroc=Interval(value=m.auroc(is_error, error_score),
                                                    low=lo, high=hi)))
        paired = m.paired_auroc_difference(is_error, risk, -features["msp"],
                                           n_resamples=n_bootstrap, seed=seed)
    else:
        paired = {"difference": float("nan"), "low": float("nan"), "high": float("nan"),
                  "p_not_better": float("nan")}
    return Evaluation(
        calibration_id=artifact.calibration_id, data_source=images.source,
        n_images=len(is_error), n_errors=n_err, accuracy=n_ok / len(is_error),
        mode=t.mode, target=t.target, delta=t.delta, observed_rate=observed,
        observed_interval=(low, high), promise_held=held,
        false_alarm_rate=false_alarms / max(n_ok, 1),
        error_recall=caught / n_err if n_err else float("nan"),
        flagged_share=float(flagged.mean()), aurocs=aurocs,
        risk_vs_msp=PairedDifference(a="risk", b="msp", **paired),
        left_out=data.left_out,
    )


def format_evaluation(ev: Evaluation) -> str:
    """Return a plain-text summary of an evaluation."""
    what = "false-alarm rate" if ev.mode == "false_alarm" else "error recall"
    side = "≤" if ev.mode == "false_alarm" else "≥"
    lines = [
        f"calibration {ev.calibration_id} on {ev.data_source}: {ev.n_images} images, "
        f"{ev.n_errors} wrong (accuracy {ev.accuracy:.4f})",
        f"promise: {what} {side} {ev.target} with probability ≥ {1 - ev.delta:.2f}",
        f"observed {what}: {ev.observed_rate:.4f} "
        f"[{ev.observed_interval[0]:.4f}, {ev.observed_interval[1]:.4f}] → "
        f"{'HELD' if ev.promise_held else 'BROKEN'}",
        f"flagged share {ev.flagged_share:.4f}; false-alarm rate {ev.false_alarm_rate:.4f}; "
        f"error recall {ev.error_recall:.4f}",
        *left_out_note(ev.left_out),
        "AUROC (errors as positives), bootstrap 95% interval:",
    ]
    for a in sorted(ev.aurocs, key=lambda a: -a.auroc.value):
        tag = "" if a.label_free else "   (needs the true label)"
        lines.append(f"  {a.name:<34} {a.auroc.value:.3f} [{a.auroc.low:.3f}, "
                     f"{a.auroc.high:.3f}]{tag}")
    d = ev.risk_vs_msp
    lines.append(f"risk − MSP AUROC: {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
    return "\n".join(lines)

