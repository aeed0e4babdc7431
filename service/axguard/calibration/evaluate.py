"""`axguard evaluate`: check the calibration's promise on separate labelled data, and
(`--compare OLD`) compare two calibrations of the served model on the same images."""

from __future__ import annotations

import numpy as np
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
    return scored_evaluation(engine, images, n_bootstrap=n_bootstrap, batch_size=batch_size,
                             seed=seed, progress=progress)[0]


def scored_evaluation(engine: Engine, images: LabelledImages, *, n_bootstrap: int = 1000,
                      batch_size: int = 64, seed: int = 0, progress: bool = True
                      ) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """Return (the evaluation, is_error per image, risk per image)."""
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
    paired = _paired(is_error, risk, -features["msp"], n_bootstrap, seed)
    return (Evaluation(
        calibration_id=artifact.calibration_id, data_source=images.source,
        n_images=len(is_error), n_errors=n_err, accuracy=n_ok / len(is_error),
        mode=t.mode, target=t.target, delta=t.delta, observed_rate=observed,
        observed_interval=(low, high), promise_held=held,
        false_alarm_rate=false_alarms / max(n_ok, 1),
        error_recall=caught / n_err if n_err else float("nan"),
        flagged_share=float(flagged.mean()), aurocs=aurocs,
        risk_vs_msp=PairedDifference(a="risk", b="msp", **paired),
        left_out=data.left_out,
    ), is_error, risk)


def _paired(is_error: np.ndarray, a: np.ndarray, b: np.ndarray, n_bootstrap: int,
            seed: int) -> dict[str, float]:
    """AUROC(a) − AUROC(b) with its paired bootstrap; NaN without both errors and correct
    predictions."""
    if is_error.any() and (~is_error).any():
        return m.paired_auroc_difference(is_error, a, b, n_resamples=n_bootstrap, seed=seed)
    return {"difference": float("nan"), "low": float("nan"), "high": float("nan"),
            "p_not_better": float("nan")}


class Comparison(BaseModel):
    """Two calibrations of one model scored on the same labelled images."""

    model_config = ConfigDict(extra="forbid")

    new: Evaluation
    old: Evaluation
    risk_new_vs_old: PairedDifference
    """AUROC(new risk) − AUROC(old risk) on the same predictions, paired bootstrap."""
    error_recall_change: float
    """New − old error recall (the share of errors flagged)."""
    false_alarm_rate_change: float
    """New − old false-alarm rate (the share of correct predictions flagged)."""


def compare(new: Engine, old: Engine, images: LabelledImages, *, n_bootstrap: int = 1000,
            batch_size: int = 64, seed: int = 0, progress: bool = True) -> Comparison:
    """Score both engines' calibrations on the same images (the same model: checked by
    the calibrations' fingerprints when the engines were built, and here by the images
    left out and the errors being the same) and compare them paired."""
    a, errors_a, risk_a = scored_evaluation(new, images, n_bootstrap=n_bootstrap,
                                            batch_size=batch_size, seed=seed,
                                            progress=progress)
    b, errors_b, risk_b = scored_evaluation(old, images, n_bootstrap=n_bootstrap,
                                            batch_size=batch_size, seed=seed,
                                            progress=progress)
    if a.left_out != b.left_out or not np.array_equal(errors_a, errors_b):
        raise ConfigError("the two calibrations' engines do not predict alike on these "
                          "images: compare calibrations of one model", field="compare")
    paired = _paired(errors_a, risk_a, risk_b, n_bootstrap, seed)
    return Comparison(new=a, old=b, risk_new_vs_old=PairedDifference(
        a=f"risk {a.calibration_id}", b=f"risk {b.calibration_id}", **paired),
        error_recall_change=a.error_recall - b.error_recall,
        false_alarm_rate_change=a.false_alarm_rate - b.false_alarm_rate)


def format_comparison(c: Comparison) -> str:
    """Return both evaluations and the paired comparison as plain text."""
    d = c.risk_new_vs_old
    rows = [("", "new", "old"), ("calibration", c.new.calibration_id, c.old.calibration_id),
            ("promise", "HELD" if c.new.promise_held else "BROKEN",
             "HELD" if c.old.promise_held else "BROKEN")]
    rows += [(name, f"{getattr(c.new, key):.4f}", f"{getattr(c.old, key):.4f}")
             for name, key in (("false-alarm rate", "false_alarm_rate"),
                               ("error recall", "error_recall"),
                               ("flagged share", "flagged_share"))]
    rows.append(("risk − MSP AUROC", f"{c.new.risk_vs_msp.difference:+.3f}",
                 f"{c.old.risk_vs_msp.difference:+.3f}"))
    lines = [f"on {c.new.data_source}: {c.new.n_images} images, {c.new.n_errors} wrong"]
    lines += [f"  {a:<18} {b:>18} {e:>18}" for a, b, e in rows]
    lines.append(f"error recall change {c.error_recall_change:+.4f}; false-alarm rate change "
                 f"{c.false_alarm_rate_change:+.4f}")
    lines.append(f"risk AUROC new − old: {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] "
                 f"(paired bootstrap; new not better in {d.p_not_better:.0%} of resamples)")
    return "\n\n".join([format_evaluation(c.new), "\n".join(lines)])


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

