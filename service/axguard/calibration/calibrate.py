"""`axguard calibrate`: run the model over labelled images and fit the flag.

The risk model is fitted on one part of the data (the fit split) and the threshold chosen
on the other (the threshold split), stratified by correct/wrong with a fixed seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from ..attribution import list_methods
from ..engine import CheckItem, Engine
from ..errors import InvalidInput
from ..scoring import AX_PROCESSES
from . import metrics as m
from .artifact import (
    CalibrationArtifact,
    DataInfo,
    Interval,
    MethodPair,
    ModelRef,
    PairedDifference,
    RankEntry,
    Samples,
    ScoreMetrics,
    ThresholdInfo,
)
from .datasets import LabelledImages
from .features import LOGIT_FEATURES, co_feature_name, error_sign
from .flag import features_of, flags
from .risk import MIN_ERRORS_FOR_SELECTION, predict_risk, select_risk_model
from .thresholds import GuaranteeUnavailable, error_recall_threshold, false_alarm_threshold

DEFAULT_PAIRS = (("saliency", "sum"), ("deconvolution", "sum"))


def all_pairs() -> list[tuple[str, str]]:
    """Return every method with SUM and PRODUCT (`--methods all`)."""
    return [(spec.name, p) for spec in list_methods() for p in AX_PROCESSES]


@dataclass
class Collected:
    """What the model did on every calibration image."""

    names: list[str]
    labels: np.ndarray
    logits: np.ndarray
    co: dict[tuple[str, str], np.ndarray]
    co_labelled: dict[tuple[str, str], np.ndarray]

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def is_error(self) -> np.ndarray:
        return self.predictions != self.labels


def collect(engine: Engine, images: LabelledImages, pairs: list[tuple[str, str]], *,
            batch_size: int = 64, progress: bool = True) -> Collected:
    """Run the engine over every image, with labels, in batches; return all scores."""
    methods = list(dict.fromkeys(p[0] for p in pairs))
    processes = list(dict.fromkeys(p[1] for p in pairs))
    logits, labels = [], []
    co: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    co_labelled: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    batches = images.batches(engine.bundle.spec, batch_size)
    total = math.ceil(len(images) / batch_size)
    for x, batch_labels in tqdm(batches, total=total, desc="calibrating", unit="batch",
                                disable=not progress):
        results = engine.check([CheckItem(img, methods, processes, label)
                                for img, label in zip(x, batch_labels, strict=True)])
        for result, label in zip(results, batch_labels, strict=True):
            logits.append(result.logits)
            labels.append(label)
            by_pair = {(s.method, s.ax_process): s for s in result.scores}
            for pair in pairs:
                co[pair].append(by_pair[pair].score)
                co_labelled[pair].append(by_pair[pair].labelled_score)
    return Collected(images.names, np.asarray(labels), np.asarray(logits, dtype=float),
                     {p: np.asarray(v) for p, v in co.items()},
                     {p: np.asarray(v) for p, v in co_labelled.items()})


def score_metrics(name: str, values: np.ndarray, is_error: np.ndarray, *, label_free: bool,
                  evaluated_on: str, n_bootstrap: int, seed: int) -> ScoreMetrics:
    """Return every metric of one score with bootstrap intervals, errors as positives."""
    sign = error_sign(name)
    error_score = sign * values
    intervals = m.bootstrap_intervals(is_error, error_score, n_resamples=n_bootstrap, seed=seed)
    point = {k: f(is_error, error_score) for k, f in m.METRICS.items()}
    sep = m.separation(values[~is_error], values[is_error])
    return ScoreMetrics(
        name=name, label_free=label_free, orientation=sign, evaluated_on=evaluated_on,
        **{k: Interval(value=point[k], low=intervals[k][0], high=intervals[k][1])
           for k in m.METRICS},
        median_gap=sep["median_gap"], mann_whitney_u=sep["mann_whitney_u"],
        mann_whitney_p=sep["mann_whitney_p"],
    )


def split_fit_threshold(is_error: np.ndarray, fit_fraction: float, seed: int) -> np.ndarray:
    """Return (N,) bool, True for the fit split; stratified by correct/wrong."""
    index = np.arange(len(is_error))
    stratify = is_error if min(is_error.sum(), (~is_error).sum()) >= 2 else None
    fit, _ = train_test_split(index, train_size=fit_fraction, random_state=seed,
                              stratify=stratify)
    mask = np.zeros(len(is_error), dtype=bool)
    mask[fit] = True
    return mask


def calibrate(
    engine: Engine,
    images: LabelledImages,
    *,
    pairs: list[tuple[str, str]] | None = None,
    mode: str = "false_alarm",
    beta: float = 0.05,
    recall: float = 0.9,
    delta: float = 0.05,
    fit_fraction: float = 0.5,
    seed: int = 0,
    gax_percentile: float = 95.0,
    n_bootstrap: int = 1000,
    batch_size: int = 64,
    progress: bool = True,
) -> CalibrationArtifact:
    """Return a calibration artifact for the engine's model on labelled images.

    Raises GuaranteeUnavailable when the data cannot support the requested promise, and
    InvalidInput when the fit split holds no wrong (or no correct) prediction.
    """
    pairs = list(pairs or DEFAULT_PAIRS)
    data = collect(engine, images, pairs, batch_size=batch_size, progress=progress)
    is_error = data.is_error
    features = features_of(data.logits, data.co)
    labelled = {co_feature_name(meth, proc, labelled=True): v
                for (meth, proc), v in data.co_labelled.items()}

    fit_mask = split_fit_threshold(is_error, fit_fraction, seed)
    if not is_error[fit_mask].any() or is_error[fit_mask].all():
        raise InvalidInput(
            f"the fit split holds {int(is_error[fit_mask].sum())} wrong predictions of "
            f"{int(fit_mask.sum())}: the risk model needs both wrong and correct ones; use "
            "more or harder labelled data", field="data")
    co_names = [co_feature_name(meth, proc) for meth, proc in pairs]
    candidates = [["msp"], list(LOGIT_FEATURES), [*LOGIT_FEATURES, *co_names]]
    risk_model, candidate_scores = select_risk_model(
        {k: v[fit_mask] for k, v in features.items()}, is_error[fit_mask], candidates,
        seed=seed)
    risk = predict_risk(risk_model, features)

    held = ~fit_mask
    held_error = is_error[held]
    if mode == "false_alarm":
        rule = false_alarm_threshold(risk[held][~held_error], beta, delta)
        target = beta
    elif mode == "error_recall":
        rule = error_recall_threshold(risk[held][held_error], recall, delta)
        target = recall
    else:
        raise ValueError(f"unknown mode {mode!r}")
    flagged = flags(mode, rule.value, risk)
    threshold = ThresholdInfo(
        mode=mode, target=target, delta=delta, value=rule.value, order_index=rule.order_index,
        n_used=rule.n, violation_probability=rule.violation_probability,
        achieved_false_alarm_rate=float(flagged[held][~held_error].mean()),
        achieved_error_recall=(float(flagged[held][held_error].mean())
                               if held_error.any() else float("nan")),
        flagged_share=float(flagged[held].mean()),
    )

    kwargs = {"n_bootstrap": n_bootstrap, "seed": seed}
    scores = [score_metrics(k, v, is_error, label_free=True, evaluated_on="all", **kwargs)
              for k, v in features.items()]
    scores += [score_metrics(k, v, is_error, label_free=False, evaluated_on="all", **kwargs)
               for k, v in labelled.items()]
    scores += [
        score_metrics("risk", risk[held], held_error, label_free=True,
                      evaluated_on="threshold_split", **kwargs),
        score_metrics("msp", features["msp"][held], held_error, label_free=True,
                      evaluated_on="threshold_split", **kwargs),
    ]
    paired = m.paired_auroc_difference(held_error, risk[held], -features["msp"][held],
                                       n_resamples=n_bootstrap, seed=seed)

    by_name = {s.name: s for s in scores if s.evaluated_on == "all"}
    ranking = sorted(
        (RankEntry(
            method=meth, ax_process=proc,
            auroc_label_free=by_name[co_feature_name(meth, proc)].auroc.value,
            auroc_labelled=by_name[co_feature_name(meth, proc, True)].auroc.value,
            median_gap_label_free=by_name[co_feature_name(meth, proc)].median_gap,
            median_gap_labelled=by_name[co_feature_name(meth, proc, True)].median_gap,
        ) for meth, proc in pairs),
        key=lambda r: r.auroc_label_free, reverse=True,
    )
    correct_co = np.concatenate([v[~is_error] for v in data.co.values()])
    notes = _notes(is_error, fit_mask, by_name, scores, paired)
    if not candidate_scores:
        notes.append(f"Only {int(is_error[fit_mask].sum())} wrong predictions in the fit "
                     f"split (fewer than {MIN_ERRORS_FOR_SELECTION}): feature selection would "
                     "be noise, so the risk model is MSP alone.")
    elif risk_model.features != candidates[-1]:
        notes.append(f"Cross-validation on the fit split kept {risk_model.features}: adding "
                     "the label-free CO scores did not raise the out-of-fold AUROC.")
    bundle = engine.bundle
    return CalibrationArtifact(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=ModelRef(name=bundle.name, version=bundle.version,
                       fingerprint=bundle.fingerprint, class_names=bundle.class_names),
        data=DataInfo(source=images.source, n_images=len(is_error),
                      n_correct=int((~is_error).sum()), n_errors=int(is_error.sum()),
                      accuracy=float((~is_error).mean()), split_seed=seed,
                      fit_fraction=fit_fraction),
        pairs=[MethodPair(method=a, ax_process=b) for a, b in pairs],
        risk_model=risk_model,
        risk_candidates=candidate_scores,
        threshold=threshold,
        gax_target=float(np.percentile(correct_co, gax_percentile)),
        gax_target_percentile=gax_percentile,
        metrics=scores,
        risk_vs_msp=PairedDifference(a="risk", b="msp", **paired),
        ranking=ranking,
        notes=notes,
        samples=Samples(
            names=data.names, labels=data.labels.tolist(),
            predictions=data.predictions.tolist(),
            split=["fit" if f else "threshold" for f in fit_mask],
            features={**{k: v.tolist() for k, v in features.items()},
                      **{k: v.tolist() for k, v in labelled.items()}, "risk": risk.tolist()},
        ),
    )


def _notes(is_error, fit_mask, by_name, scores, paired) -> list[str]:
    """Plain-language caveats a reader of the artifact must see."""
    notes = []
    n_err = int(is_error.sum())
    if n_err < 100:
        notes.append(f"Only {n_err} wrong predictions: AUROC intervals are wide "
                     "(about ±0.035 needs 100 errors, ±0.016 needs 500).")
    held_errors = int(is_error[~fit_mask].sum())
    notes.append(f"Risk and its MSP comparison are measured on the threshold split "
                 f"({int((~fit_mask).sum())} images, {held_errors} wrong), which the risk "
                 "model never saw.")
    best_free = max((s for s in scores if s.name.startswith("co:")),
                    key=lambda s: s.auroc.value, default=None)
    if best_free is not None:
        msp = by_name["msp"].auroc.value
        word = "above" if best_free.auroc.value > msp else "below"
        notes.append(f"The best label-free CO score ({best_free.name}, AUROC "
                     f"{best_free.auroc.value:.3f}) is {word} MSP ({msp:.3f}) on its own.")
    notes.append(f"Risk minus MSP AUROC: {paired['difference']:+.3f} "
                 f"[{paired['low']:+.3f}, {paired['high']:+.3f}].")
    return notes


__all__ = ["GuaranteeUnavailable", "all_pairs", "calibrate", "collect"]
