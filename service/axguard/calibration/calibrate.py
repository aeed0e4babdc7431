"""`axguard calibrate`: run the model over labelled images and fit the flag (version 3).

1. Every candidate evidence family is measured on every image (one engine pass per batch).
2. Every image serves the fit: one penalised logistic model over every offered family
   (risk.py, SHRINKAGE_RULE), msp alone only when that is worse than MSP out of fold
   beyond noise or there are too few errors; optionally within a cost bound (`max_cost`).
3. Out-of-fold risks come from K-fold cross-fitting; the threshold is the order-statistic
   bound (thresholds.py) over the out-of-fold risks of every correct prediction
   (false-alarm mode) or every wrong one (error-recall mode): no image is held back.
   For msp alone the bound is exact; for a fused model the fold models' risks stand in for
   the final model's, and the held-out benchmark (`make bench-flag`) checks the promise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..engine.attribution import available_methods, duplicate_methods, list_methods
from ..engine.core import CheckItem, Engine, EvidencePlan
from ..engine.scoring import AX_PROCESSES
from ..engine.sharedpass import SHARED_METHODS
from ..errors import ConfigError, InvalidInput
from ..flag.artifact import (
    CalibrationArtifact,
    DataInfo,
    FamilyReport,
    Interval,
    ModelRef,
    PairedDifference,
    RankEntry,
    Samples,
    ScoreMetrics,
    Selection,
    ThresholdInfo,
)
from ..flag.verdict import (
    DEFAULT_FAMILIES,
    EPSILON_GRID,
    OFFERED_FAMILIES,
    Evidence,
    Family,
    FlagModel,
    MethodPair,
    RiskModel,
    co_feature_name,
    error_sign,
    features_of,
    flags,
    predict_risk,
)
from . import metrics as m
from .datasets import LabelledImages
from .risk import (
    MIN_ERRORS_TO_FUSE,
    SHRINKAGE_RULE,
    Fusion,
    cross_fitted_risk,
    family_cost,
    fit_risk_model,
    fuse,
    names_of,
)
from .thresholds import GuaranteeUnavailable, error_recall_threshold, false_alarm_threshold

DEFAULT_PAIRS = (("saliency", "sum"), ("deconvolution", "sum"))
log = logging.getLogger(__name__)


def all_pairs() -> list[tuple[str, str]]:
    """Return every method with SUM and PRODUCT (`--methods all`)."""
    return [(spec.name, p) for spec in list_methods() for p in AX_PROCESSES]


def check_families(families: Sequence[str], epsilons: Sequence[float],
                   views: Sequence[str]) -> None:
    """Raise ConfigError naming the field for an empty or unknown family list, an ε outside
    (0, 1), or "views" without configured views."""
    if not families:
        raise ConfigError("name at least one family; valid: " + ", ".join(OFFERED_FAMILIES),
                          field="families")
    unknown = [f for f in families if f not in OFFERED_FAMILIES]
    if unknown:
        raise ConfigError(f"unknown families {unknown}; valid: {', '.join(OFFERED_FAMILIES)}",
                          field="families")
    if not epsilons:
        raise ConfigError("give at least one ε", field="epsilons")
    bad = [e for e in epsilons if not 0 < e < 1]
    if bad:
        raise ConfigError(f"{bad} outside (0, 1)", field="epsilons")
    if "views" in families and not views:
        raise ConfigError("the views family needs views in the model's settings "
                          "(e.g. --views hflip,shift:1:0)", field="model.views")


def check_distinct_methods(engine: Engine, pairs: Sequence[tuple[str, str]],
                           families: Sequence[str]) -> None:
    """Raise ConfigError naming the pairs whose methods are one method in effect on this
    model (e.g. Deconvolution on a network without rectifiers is Saliency): the risk model
    would get one feature twice."""
    offered = [m for m, _ in pairs] + (["saliency"] if "counterfactual" in families else [])
    duplicates = duplicate_methods(engine.method_report, offered)
    if duplicates:
        named = "; ".join(f"{method} is {same} on this model ({why})"
                          for method, same, why in duplicates)
        raise ConfigError(f"{named}: offer only one of each", field="pairs")


def candidate_families(engine: Engine, pairs: Sequence[tuple[str, str]],
                       families: Sequence[str], epsilons: Sequence[float],
                       views: Sequence[str]) -> list[Family]:
    """Return every candidate family (one per ε; counterfactual for Saliency and each
    calibrated method the shared pass gives on this model)."""
    usable = {spec.name for spec in available_methods(engine.bundle)} & set(SHARED_METHODS)
    methods = [mth for mth in dict.fromkeys(("saliency", *(p[0] for p in pairs)))
               if mth in usable]
    out: list[Family] = []
    for name in families:
        if name == "counterfactual":
            out += [Family(name="counterfactual", method=mth) for mth in methods]
        elif name == "perturbation":
            out += [Family(name="perturbation", epsilon=e) for e in epsilons]
        elif name == "views":
            if views:
                out.append(Family(name="views", views=tuple(views)))
        elif name == "co":
            out.append(Family(name="co", pairs=tuple(MethodPair(method=a, ax_process=b)
                                                     for a, b in pairs)))
        else:
            out.append(Family(name=name))  # type: ignore[arg-type]
    return out


@dataclass
class Collected:
    """What the model did on every calibration image whose outputs were finite."""

    names: list[str]
    labels: np.ndarray
    evidence: Evidence
    co_labelled: dict[tuple[str, str], np.ndarray]
    left_out: list[tuple[str, str]] = field(default_factory=list)
    """(image name, stage) of the images left out because the model's output for them was
    not finite (errors.OUTPUT_STAGES); averaging them in would make every statistic NaN."""

    @property
    def logits(self) -> np.ndarray:
        return self.evidence.logits

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def is_error(self) -> np.ndarray:
        return self.predictions != self.labels


def concat_evidence(parts: list[Evidence]) -> Evidence:
    """Return the evidence of several batches as one."""
    first = parts[0]

    def cat(getter):  # noqa: ANN001, ANN202
        return np.concatenate([getter(p) for p in parts])

    return Evidence(
        logits=cat(lambda p: p.logits),
        margin_gradient_norm=(None if first.margin_gradient_norm is None
                              else cat(lambda p: p.margin_gradient_norm)),
        runner_up_logits={k: cat(lambda p, k=k: p.runner_up_logits[k])
                          for k in first.runner_up_logits},
        own_removed_logits={k: cat(lambda p, k=k: p.own_removed_logits[k])
                            for k in first.own_removed_logits},
        perturbed_logits={k: cat(lambda p, k=k: p.perturbed_logits[k])
                          for k in first.perturbed_logits},
        view_logits=(None if first.view_logits is None
                     else np.concatenate([p.view_logits for p in parts], axis=1)),
        co={k: cat(lambda p, k=k: p.co[k]) for k in first.co},
    )


def collect(engine: Engine, images: LabelledImages, pairs: Sequence[tuple[str, str]],
            plan: EvidencePlan | None = None, *, batch_size: int = 64,
            progress: bool = True) -> Collected:
    """Run the engine over every image, with labels, in batches; return all evidence.

    `plan` names the evidence to measure (default: the engine's verdict plus the CO
    scores of `pairs`, whose labelled scores are always recorded too).
    """
    pairs = list(pairs)
    base = plan or engine.plan
    plan = EvidencePlan(base.boundary, base.counterfactual, base.epsilons, base.views,
                        tuple(dict.fromkeys((*base.co_pairs, *pairs))))
    parts, labels, names = [], [], []
    left_out: list[tuple[str, str]] = []
    co_labelled: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    batches = images.batches(engine.bundle.spec, batch_size)
    total = math.ceil(len(images) / batch_size)
    start = 0
    for x, batch_labels in tqdm(batches, total=total, desc="calibrating", unit="batch",
                                disable=not progress):
        results, batch = engine.check_with_evidence(
            [CheckItem(img, label=label, pairs=pairs)
             for img, label in zip(x, batch_labels, strict=True)], plan)
        assert batch is not None  # every item is judged: evidence rows = results
        batch_names = images.names[start:start + len(results)]
        start += len(results)
        kept = [k for k, r in enumerate(results) if r.error is None]
        left_out += [(batch_names[k], r.error.stage) for k, r in enumerate(results)
                     if r.error is not None]
        parts.append(batch if len(kept) == len(results) else batch.select(np.asarray(kept)))
        labels += [batch_labels[k] for k in kept]
        names += [batch_names[k] for k in kept]
        for k in kept:
            by_pair = {(s.method, s.ax_process): s for s in results[k].scores}
            for pair in pairs:
                co_labelled[pair].append(by_pair[pair].labelled_score)
    if left_out:
        log.warning("calibration_images_left_out", extra={
            "count": len(left_out), "first": [name for name, _ in left_out[:10]]})
    if not labels:
        raise InvalidInput(f"the model's output is not finite for every one of the "
                           f"{len(left_out)} images", field="data")
    return Collected(names, np.asarray(labels), concat_evidence(parts),
                     {p: np.asarray(v, dtype=float) for p, v in co_labelled.items()},
                     left_out)


def left_out_note(left_out: list[tuple[str, str]]) -> list[str]:
    """Return the note that names the images left out for non-finite outputs (none: [])."""
    if not left_out:
        return []
    shown = ", ".join(f"{name} ({stage})" for name, stage in left_out[:10])
    more = f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
    return [f"{len(left_out)} images were left out because the model's output for them was "
            f"not finite: {shown}{more}."]


@dataclass(frozen=True)
class CalibrateOptions:
    """What `calibrate` fits and how (`axguard calibrate`'s flags; defaults as documented)."""

    pairs: Sequence[tuple[str, str]] | None = None
    """(method, AX process) pairs whose CO scores are measured; None: DEFAULT_PAIRS."""
    families: Sequence[str] = DEFAULT_FAMILIES
    """Evidence families offered to the fit (msp is always there)."""
    epsilons: Sequence[float] = EPSILON_GRID
    """The perturbation family's step grid."""
    views: Sequence[str] = ()
    """Test-time views for the "views" family (offered when any is given)."""
    mode: str = "false_alarm"
    """"false_alarm" (at most `beta` of correct predictions flagged) or "error_recall"."""
    beta: float = 0.05
    recall: float = 0.9
    delta: float = 0.05
    """The promise holds with probability at least 1 − delta."""
    max_cost: float | None = None
    """Most serving cost the kept families may add, in plain forwards (a backward = 2)."""
    folds: int = 5
    repeats: int = 2
    seed: int = 0
    gax_percentile: float = 95.0
    n_bootstrap: int = 1000
    selection_resamples: int = 500
    batch_size: int = 64
    progress: bool = True

    def checked(self, engine: Engine) -> CalibrateOptions:
        """Return the options normalised (pairs filled in, families once each, "views"
        offered when views are given) after every check that needs no image."""
        pairs = list(self.pairs or DEFAULT_PAIRS)
        families = list(dict.fromkeys(self.families))
        if "views" not in families and self.views:
            families.append("views")
        check_families(families, self.epsilons, self.views)
        check_distinct_methods(engine, pairs, families)
        if self.mode not in ("false_alarm", "error_recall"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.max_cost is not None and not self.max_cost >= 0:
            raise ConfigError(f"{self.max_cost} must be a number of plain forwards ≥ 0",
                              field="max_cost")
        return dataclasses.replace(self, pairs=tuple(pairs), families=tuple(families))


def calibrate(engine: Engine, images: LabelledImages, options: CalibrateOptions | None = None,
              **overrides: Any) -> CalibrationArtifact:
    """Return a calibration artifact for the engine's model on labelled images: collect the
    evidence, fit the flag, choose its threshold, measure every score, assemble the artifact.
    `overrides` replace fields of `options` (calibrate(engine, images, mode="error_recall")).

    Raises ConfigError for bad settings (before any image is run), GuaranteeUnavailable
    when the data cannot support the requested promise, and InvalidInput when the images
    hold no wrong (or no correct) prediction.
    """
    options = dataclasses.replace(options or CalibrateOptions(), **overrides).checked(engine)
    pairs = list(options.pairs or ())
    candidates = candidate_families(engine, pairs, options.families, options.epsilons,
                                    options.views)
    data = collect(engine, images, pairs, EvidencePlan.of(candidates),
                   batch_size=options.batch_size, progress=options.progress)
    features, labelled = measured_features(data, pairs, candidates)
    fit = fit_flag(features, data.is_error, candidates, options)
    threshold = choose_threshold(fit.threshold_risk, data.is_error, options)
    scores, paired = score_everything(features, labelled, fit.out_of_fold, data.is_error,
                                      options)
    return assemble(engine, images, data, options, features, labelled, fit, threshold,
                    scores, paired)


MSP = Family(name="msp")


def measured_features(data: Collected, pairs: Sequence[tuple[str, str]],
                      candidates: Sequence[Family]
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return (label-free features, labelled CO scores) by name. The baselines every report
    compares against (MSP, margin, entropy, energy and the label-free CO scores) are
    measured whatever families are offered."""
    is_error = data.is_error
    if not is_error.any() or is_error.all():
        raise InvalidInput(
            f"the images hold {int(is_error.sum())} wrong predictions of {len(is_error)}: "
            "the risk model needs both wrong and correct ones; use more or harder labelled "
            "data", field="data")
    baselines = [Family(name="logit"), Family(name="co", pairs=tuple(
        MethodPair(method=a, ax_process=b) for a, b in pairs))]
    features = {**features_of(baselines, data.evidence),
                **features_of([MSP, *candidates], data.evidence)}
    labelled = {co_feature_name(meth, proc, labelled=True): v
                for (meth, proc), v in data.co_labelled.items()}
    return features, labelled


@dataclass
class FlagFit:
    """The fitted flag and the risks its threshold and report use."""

    candidates: list[Family]
    """The offered families after ε was chosen (one perturbation step at most)."""
    epsilon_aurocs: list[float]
    fusion: Fusion
    risk_model: RiskModel
    risk: np.ndarray
    """The final model's risk of every image (fitted on all of them)."""
    threshold_risk: np.ndarray
    """Risks of models that did not see the image, for the order-statistic threshold."""
    out_of_fold: np.ndarray
    folds: int


def fit_flag(features: dict[str, np.ndarray], is_error: np.ndarray,
             candidates: Sequence[Family], options: CalibrateOptions) -> FlagFit:
    """Choose ε, fuse the families (shrinkage, within the cost bound) and fit the risk model
    on every image."""
    n_errors = int(is_error.sum())
    folds = max(2, min(options.folds, n_errors, int((~is_error).sum())))
    candidates = list(candidates)
    epsilon_aurocs: list[float] = []
    perturbations = [f for f in candidates if f.name == "perturbation"]
    if len(perturbations) > 1 and n_errors >= MIN_ERRORS_TO_FUSE:
        # ε from its grid: the one whose msp + perturbation fit is best out of fold (the
        # steps are near-duplicates of one another; serving pays for each one kept).
        for family in perturbations:
            risk = cross_fitted_risk(features, is_error, names_of([MSP, family]),
                                     folds=folds, repeats=options.repeats, seed=options.seed)
            epsilon_aurocs.append(m.auroc(is_error, risk))
        best = perturbations[int(np.argmax(epsilon_aurocs))]
        candidates = [f for f in candidates if f.name != "perturbation" or f is best]
    fusion = fuse(features, is_error, MSP, candidates, folds=folds, repeats=options.repeats,
                  n_resamples=options.selection_resamples, seed=options.seed,
                  max_cost=options.max_cost)
    risk_model = fit_risk_model(features, is_error, names_of(fusion.families),
                                seed=options.seed)
    risk = predict_risk(risk_model, features)
    # msp alone ranks exactly as MSP: its full-data risk is a fixed monotone map of MSP, so
    # the order-statistic threshold over it is exact. A fused model's threshold comes from
    # risks of models that did not see the image (the first cross-fitting split: one model
    # per image, as served), and the held-out benchmark checks that the promise holds.
    return FlagFit(candidates, epsilon_aurocs, fusion, risk_model, risk,
                   risk if fusion.risks is None else fusion.risks[0],
                   risk if fusion.risk is None else fusion.risk, folds)


def choose_threshold(risk: np.ndarray, is_error: np.ndarray,
                     options: CalibrateOptions) -> ThresholdInfo:
    """The order-statistic threshold of the promise, and what it achieves on these images."""
    if options.mode == "false_alarm":
        rule = false_alarm_threshold(risk[~is_error], options.beta, options.delta)
        target = options.beta
    else:
        rule = error_recall_threshold(risk[is_error], options.recall, options.delta)
        target = options.recall
    flagged = flags(options.mode, rule.value, risk)
    return ThresholdInfo(
        mode=options.mode, target=target, delta=options.delta, value=rule.value,
        order_index=rule.order_index, n_used=rule.n,
        violation_probability=rule.violation_probability,
        achieved_false_alarm_rate=float(flagged[~is_error].mean()),
        achieved_error_recall=float(flagged[is_error].mean()),
        flagged_share=float(flagged.mean()))


def score_everything(features: dict[str, np.ndarray], labelled: dict[str, np.ndarray],
                     out_of_fold: np.ndarray, is_error: np.ndarray,
                     options: CalibrateOptions) -> tuple[list[ScoreMetrics], dict]:
    """Every score's metrics (label-free, labelled, the risk out of fold) and the paired
    AUROC difference of the risk over MSP."""
    kwargs = {"n_bootstrap": options.n_bootstrap, "seed": options.seed}
    scores = [score_metrics(k, v, is_error, label_free=True, evaluated_on="all", **kwargs)
              for k, v in features.items()]
    scores += [score_metrics(k, v, is_error, label_free=False, evaluated_on="all", **kwargs)
               for k, v in labelled.items()]
    scores += [
        score_metrics("risk", out_of_fold, is_error, label_free=True,
                      evaluated_on="out_of_fold", **kwargs),
        score_metrics("msp", features["msp"], is_error, label_free=True,
                      evaluated_on="out_of_fold", **kwargs),
    ]
    paired = m.paired_auroc_difference(is_error, out_of_fold, -features["msp"],
                                       n_resamples=options.n_bootstrap, seed=options.seed)
    return scores, paired


def rank_pairs(by_name: dict[str, ScoreMetrics],
               pairs: Sequence[tuple[str, str]]) -> list[RankEntry]:
    """The (method, AX process) pairs by label-free AUROC, with their labelled figures."""
    return sorted(
        (RankEntry(
            method=meth, ax_process=proc,
            auroc_label_free=by_name[co_feature_name(meth, proc)].auroc.value,
            auroc_labelled=by_name[co_feature_name(meth, proc, True)].auroc.value,
            median_gap_label_free=by_name[co_feature_name(meth, proc)].median_gap,
            median_gap_labelled=by_name[co_feature_name(meth, proc, True)].median_gap,
        ) for meth, proc in pairs),
        key=lambda r: r.auroc_label_free, reverse=True,
    )


def assemble(engine: Engine, images: LabelledImages, data: Collected,
             options: CalibrateOptions, features: dict[str, np.ndarray],
             labelled: dict[str, np.ndarray], fit: FlagFit, threshold: ThresholdInfo,
             scores: list[ScoreMetrics], paired: dict) -> CalibrationArtifact:
    """The calibration artifact of a fit: model, data, flag, selection report, threshold,
    metrics, ranking, notes and the per-image samples."""
    is_error, pairs, fusion = data.is_error, list(options.pairs or ()), fit.fusion
    kept = fusion.families
    by_name = {s.name: s for s in scores if s.evaluated_on == "all"}
    correct_co = np.concatenate([data.evidence.co[p][~is_error] for p in pairs])
    selection = Selection(
        rule=SHRINKAGE_RULE, folds=fit.folds, repeats=options.repeats,
        candidates=fit.candidates,
        epsilon_grid=[float(e) for e in options.epsilons] if fit.epsilon_aurocs else [],
        epsilon_aurocs=fit.epsilon_aurocs, steps=[], kept=[f.key for f in kept],
        skipped_reason=fusion.fallback,
        families=family_reports(fusion, fit.risk_model),
        fused_vs_msp=(None if math.isnan(fusion.fused_vs_msp["difference"]) else
                      PairedDifference(a="fused", b="msp", **fusion.fused_vs_msp)),
        max_cost=options.max_cost, cost=sum(family_cost(f) for f in kept))
    bundle = engine.bundle
    return CalibrationArtifact(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=ModelRef(name=bundle.name, version=bundle.version,
                       fingerprint=bundle.fingerprint, class_names=bundle.class_names),
        data=DataInfo(source=images.source, n_images=len(is_error),
                      n_correct=int((~is_error).sum()), n_errors=int(is_error.sum()),
                      accuracy=float((~is_error).mean()), split_seed=options.seed,
                      fit_fraction=1.0),
        pairs=[MethodPair(method=a, ax_process=b) for a, b in pairs],
        flag=FlagModel(families=kept, risk_model=fit.risk_model,
                       mode=options.mode,  # type: ignore[arg-type]
                       threshold=threshold.value),
        selection=selection,
        threshold=threshold,
        gax_target=float(np.percentile(correct_co, options.gax_percentile)),
        gax_target_percentile=options.gax_percentile,
        metrics=scores,
        risk_vs_msp=PairedDifference(a="risk", b="msp", **paired),
        ranking=rank_pairs(by_name, pairs),
        notes=left_out_note(data.left_out) + _notes(is_error, by_name, paired, fusion),
        samples=Samples(
            names=data.names, labels=data.labels.tolist(),
            predictions=data.predictions.tolist(), split=["fit"] * len(is_error),
            features={**{k: v.tolist() for k, v in features.items()},
                      **{k: v.tolist() for k, v in labelled.items()},
                      "risk": fit.risk.tolist(), "risk_out_of_fold": fit.out_of_fold.tolist()},
        ),
    )


def family_reports(fusion: Fusion, risk_model: RiskModel) -> list[FamilyReport]:
    """Return each offered family's served coefficients, drop-one effect and cost."""
    coef = dict(zip(risk_model.features, risk_model.coef, strict=True))
    kept = {f.key for f in fusion.families}
    return [FamilyReport(family=e.family.key, drop_one=e.drop_one, cost=e.cost,
                         kept=e.family.key in kept,
                         coefficients={n: coef.get(n, 0.0) for n in e.family.features()})
            for e in fusion.effects]


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


def _notes(is_error: np.ndarray, by_name: dict[str, ScoreMetrics],
           paired: dict[str, float], fusion: Fusion) -> list[str]:
    """Plain-language caveats a reader of the artifact must see."""
    notes = []
    n_err = int(is_error.sum())
    if n_err < 100:
        notes.append(f"Only {n_err} wrong predictions: AUROC intervals are wide "
                     "(about ±0.035 needs 100 errors, ±0.016 needs 500), and a family's "
                     "gain over MSP of +0.003 is far below what this set can prove; the "
                     "fused model keeps every offered family, shrunk, unless it is worse "
                     "than MSP beyond noise.")
    notes.append(f"Risk and MSP are compared out of fold on all {len(is_error)} images "
                 f"({n_err} wrong): each image scored by a model fitted without it. "
                 "`axguard evaluate` on other labelled data is the honest check.")
    if fusion.fallback:
        notes.append(f"The risk model is msp alone: {fusion.fallback}.")
    else:
        notes.append("Families fused: " + ", ".join(f.key for f in fusion.families) + ".")
    best_free = max((s for name, s in by_name.items() if name.startswith("co:")),
                    key=lambda s: s.auroc.value, default=None)
    if best_free is not None:
        msp = by_name["msp"].auroc.value
        word = "above" if best_free.auroc.value > msp else "below"
        notes.append(f"The best label-free CO score ({best_free.name}, AUROC "
                     f"{best_free.auroc.value:.3f}) is {word} MSP ({msp:.3f}) on its own.")
    notes.append(f"Risk minus MSP AUROC (out of fold): {paired['difference']:+.3f} "
                 f"[{paired['low']:+.3f}, {paired['high']:+.3f}].")
    return notes


__all__ = ["GuaranteeUnavailable", "all_pairs", "calibrate", "collect"]
