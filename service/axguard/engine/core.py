"""The engine: a batch of images in, predictions, CO scores and verdicts out. No gRPC.

Per batch: one forward of x (recorded when any gradient is needed); every backward pass
the batch needs (heatmaps of ŷ per method, heatmaps of the runner-up class and input
gradients for the verdict's evidence) from that one recorded forward; the heatmaps are
normalised by their global max|h|; then every extra input (AX inputs of each requested
method/AX-process pair, the verdict's counterfactuals, perturbations and views) goes
through one batched forward. CO scores (paper eq. 5) are label-free (κ from ŷ) and, where a
label was given, also the paper's labelled score. The verdict computes exactly the evidence
families of the loaded calibration (verdict.py). An item whose logits, heatmap, CO score or
verdict is not finite comes back as CheckResult.failed (NonFiniteOutput): no NaN or Inf
ever leaves the engine, and the other items of the batch are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, InvalidInput, NonFiniteOutput, UnknownMethod
from ..flag.artifact import CalibrationArtifact, check_matches
from ..flag.verdict import Evidence, EvidencePlan
from . import attribution, evidence, scoring
from .model import ModelBundle
from .sharedpass import SharedPass, finish_heatmap, rule_of

log = logging.getLogger(__name__)

DEFAULT_AX_PROCESSES = ("sum",)
EXTRA_FORWARD_CHUNK = 256
"""Most images in one forward of the extra inputs (bounds peak memory)."""


@dataclass
class CheckItem:
    """One image to check. `image` is (C, H, W) float32 in [0, 1] at the model's input size."""

    image: torch.Tensor
    methods: Sequence[str] = ()
    """Attribution method names; empty = the engine's defaults."""
    ax_processes: Sequence[str] = ()
    """"sum" and/or "product"; empty = sum."""
    label: int | None = None
    """True class, when known: adds the paper's labelled CO score."""
    return_heatmaps: bool = False
    prediction_only: bool = False
    """Only the prediction: no heatmaps, scores or verdict."""
    verdict_only: bool = False
    """The prediction and the verdict: no CO scores or heatmaps beyond what it needs."""
    pairs: Sequence[tuple[str, str]] = ()
    """Explicit (method, AX process) pairs; when given, instead of methods × ax_processes."""
    image_checked: bool = False
    """The image came from a validating decoder (preprocess: shape, finite, [0, 1]), so
    resolve does not scan it again."""

    def asked_pairs(self) -> list[tuple[str, str]]:
        """Return the (method, process) pairs whose scores this item reports, in order."""
        if self.pairs:
            return list(self.pairs)
        return [(m, p) for m in self.methods for p in self.ax_processes]


@dataclass
class MethodScore:
    """The CO score of one method and AX process for one image."""

    method: str
    ax_process: str
    score: float
    """Label-free: κ from the predicted class."""
    labelled_score: float | None
    """The paper's: κ from the given label; None without a label."""
    zero_heatmap: bool


@dataclass
class Verdict:
    """The calibrated "likely wrong" flag; `calibrated` is False without a calibration."""

    calibrated: bool = False
    likely_wrong: bool = False
    risk: float = 0.0
    threshold: float = 0.0
    calibration_id: str = ""
    features: dict[str, float] = field(default_factory=dict)
    """The label-free features the risk model used."""


@dataclass
class StageTiming:
    """Milliseconds spent on each stage of the batch an item ran in."""

    forward_ms: float = 0.0
    attribution_ms: float = 0.0
    ax_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 1


class ResolvedItem(CheckItem):
    """A CheckItem that `Engine.resolve` validated and completed (methods, processes): the
    engine trusts it and does not validate it again."""


@dataclass
class CheckResult:
    """The engine's answer for one image."""

    class_index: int
    class_name: str
    probability: float
    logits: list[float]
    probabilities: list[float]
    scores: list[MethodScore]
    heatmaps: dict[str, torch.Tensor] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=Verdict)
    timing: StageTiming = field(default_factory=StageTiming)
    error: NonFiniteOutput | None = None
    """Set when the model's output for this image was not finite; every number above is
    then empty (never NaN or Inf) and the item must be answered with the error."""

    @classmethod
    def failed(cls, error: NonFiniteOutput, timing: StageTiming) -> CheckResult:
        """Return the result of an item whose outputs were not finite: no numbers."""
        return cls(class_index=-1, class_name="", probability=0.0, logits=[],
                   probabilities=[], scores=[], timing=timing, error=error)


@dataclass
class _Heatmaps:
    """Normalised heatmaps of one method for some rows of the batch."""

    rows: list[int]
    normalised: torch.Tensor
    zero: torch.Tensor

    def of(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (normalised, zero) for a subset of this object's rows."""
        if rows == self.rows:  # the common case: no index tensor, no host-to-device copy
            return self.normalised, self.zero
        index = [self.rows.index(i) for i in rows]
        return self.normalised[index], self.zero[index]


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Return x's `rows`; x itself when they are all of its rows in order (on a GPU an index
    list is a host-to-device copy and a kernel)."""
    if len(rows) == len(x) and rows == list(range(len(x))):
        return x
    return x[rows]


class _Failures:
    """Rows of a batch whose outputs are not finite, each with the first stage (errors.
    OUTPUT_STAGES) where one was not. One host copy per checked tensor."""

    def __init__(self) -> None:
        self.stage: dict[int, str] = {}

    def mark(self, rows: Sequence[int], finite: torch.Tensor | np.ndarray, stage: str) -> None:
        """Record the rows whose `finite` entry (one per row) is False."""
        ok = finite.cpu().numpy() if isinstance(finite, torch.Tensor) else np.asarray(finite)
        if not ok.all():
            for k in np.flatnonzero(~ok):
                self.stage.setdefault(rows[int(k)], stage)


def finite_rows(values: torch.Tensor) -> torch.Tensor:
    """Return (N,) bool: True where every value of row n of an (N, ...) tensor is finite."""
    return torch.isfinite(values.reshape(len(values), -1)).all(dim=1)


@dataclass
class _BatchPlan:
    """Which rows of a batch need what (the first stage of a check)."""

    plan: EvidencePlan
    """The verdict's evidence (empty when no row is judged)."""
    judged: list[int]
    """Rows that get a verdict (not prediction-only)."""
    own_rows: dict[str, list[int]]
    """Method → rows that need its heatmap of the predicted class."""
    pair_rows: dict[tuple[str, str], list[int]]
    """(method, process) → rows that need its CO score."""


def plan_batch(requested: Sequence[CheckItem], plan: EvidencePlan) -> _BatchPlan:
    """Return which rows need which heatmaps and scores: what each item asked for plus
    what the verdict needs."""
    judged = [i for i, item in enumerate(requested) if not item.prediction_only]
    if not judged:
        plan = EvidencePlan()
    own_rows: dict[str, list[int]] = {}
    pair_rows: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(requested):
        extra = [] if item.prediction_only else list(plan.co_pairs)
        pairs = list(dict.fromkeys((*item.asked_pairs(), *extra)))
        for method in dict.fromkeys(m for m, _ in pairs):
            own_rows.setdefault(method, []).append(i)
        for pair in pairs:
            pair_rows.setdefault(pair, []).append(i)
    for method in plan.counterfactual:
        own_rows[method] = sorted(set(own_rows.get(method, [])) | set(judged))
    return _BatchPlan(plan, judged, own_rows, pair_rows)


@dataclass
class _Forward:
    """The batch's forward pass: the recorded graph (None when no backward pass needs
    it; dropped after the backward passes), float logits, top two classes."""

    leaf: torch.Tensor | None
    graph_logits: torch.Tensor | None
    logits: torch.Tensor
    predicted: torch.Tensor
    runner_up: torch.Tensor


class Engine:
    """Runs confidence checks on one model bundle; safe to call from many threads.

    All passes through the model run under one lock: hook-based attribution methods
    change the model's modules while they run (see attribution.py).
    """

    def __init__(self, bundle: ModelBundle,
                 default_methods: Sequence[str] = attribution.DEFAULT_METHODS,
                 calibration: CalibrationArtifact | None = None, *,
                 shared_pass: bool = True) -> None:
        self.bundle = bundle
        self._heatmap_fns: dict[str, attribution.HeatmapFn] = {}
        self._lock = threading.Lock()
        self.method_report = self._probed(attribution.method_report(bundle))
        """What each method is on this model (exact, reduced, unavailable, and why)."""
        self._unavailable = {s.method: s.reason for s in self.method_report
                             if s.state == "unavailable"}
        self.available = [m.name for m in attribution.available_methods(bundle)
                          if m.name not in self._unavailable]
        for name in default_methods:
            spec = attribution.get_method(name)  # UnknownMethod: no such method at all
            try:
                attribution.check_available(spec, bundle)
                self._require_usable(name)
            except InvalidInput as err:
                raise ConfigError(err.args[0], field="attribution.default_methods") from err
        if not default_methods:
            raise ConfigError("at least one default method is needed",
                              field="attribution.default_methods")
        self.default_methods = tuple(default_methods)
        self.ready = False
        self.captum_calls: dict[str, int] = {}
        """Images whose heatmap came from Captum itself, by method: DeepLift and Grad-CAM
        always, the shared-pass methods only where the shared path is off or impossible
        (TorchScript)."""
        # One recorded forward serves every backward pass; TorchScript has only the
        # ordinary gradient rule (no ReLU modules to switch).
        self._pass = SharedPass(bundle.network, switchable=bundle.hookable)
        self._shared_heatmaps = shared_pass
        self.zero_heatmaps: dict[str, int] = {}
        """All-zero heatmaps seen so far, by method (their scores were set to 0)."""
        self.nonfinite_outputs: dict[str, int] = {}
        """Items failed because an output was not finite, by the first such stage
        (errors.OUTPUT_STAGES)."""
        self.backward_passes = 0
        """Backward passes run so far (a plan without gradient evidence adds none)."""
        self.calibration: CalibrationArtifact | None = None
        self.plan = EvidencePlan()
        """What the verdict needs; empty without a calibration."""
        self._views: dict[str, evidence.ViewSpec] = {}
        # Build the needed methods and views now so configuration errors surface at start-up.
        for name in self.default_methods:
            self._heatmap_fn(name)
        if calibration is not None:
            self.calibration, self.plan = calibration, self._prepare(calibration)

    def _prepare(self, calibration: CalibrationArtifact) -> EvidencePlan:
        """Check that the calibration belongs to this model and that the methods it needs
        are available here (ConfigError otherwise), build those methods and views, and
        return its plan."""
        check_matches(calibration, self.bundle.fingerprint, self.available)
        plan = EvidencePlan.of(calibration.flag.families)
        for name in plan.methods:
            self._heatmap_fn(name)
        for text in plan.views:
            self._view(text)
        return plan

    def use_calibration(self, calibration: CalibrationArtifact) -> None:
        """Judge every later batch with `calibration` (validated first: ConfigError, and the
        old one stays). A batch that is running finishes with the old one: the swap waits
        for the engine's lock."""
        with self._lock:
            self.calibration, self.plan = calibration, self._prepare(calibration)

    def _probed(self, report: list[attribution.MethodStatus]) -> list[attribution.MethodStatus]:
        """Run Captum's own methods (DeepLift, Grad-CAM) once on a grey image: one that
        fails on this network (a hooked module fed a constant, as in Swin v2's position
        bias MLP; no Conv2d for Grad-CAM) is reported unavailable with Captum's error,
        instead of failing every request that names it."""
        probe = torch.full((1, *self.bundle.spec.shape), 0.5, device=self.bundle.device)
        out = []
        for status in report:
            if (status.state != "unavailable"
                    and attribution.get_method(status.method).backward_rule is None):
                try:
                    with self._lock:
                        self._heatmap_fn(status.method)(probe, torch.zeros(
                            1, dtype=torch.long, device=probe.device))
                except Exception as err:  # noqa: BLE001  (Captum and torch raise many types)
                    self._heatmap_fns.pop(status.method, None)
                    first = str(err).splitlines()[0] if str(err) else ""
                    status = attribution.MethodStatus(
                        status.method, "unavailable",
                        f"Captum's {status.method} fails on this network "
                        f"({type(err).__name__}: {first})")
            out.append(status)
        return out

    def _require_usable(self, name: str) -> None:
        """Raise UnknownMethod for a method the report marks unavailable on this model."""
        if name in self._unavailable:
            raise UnknownMethod(f"{name} is unavailable on this model: "
                                f"{self._unavailable[name]}", field="methods")

    def _heatmap_fn(self, name: str) -> attribution.HeatmapFn:
        if name not in self._heatmap_fns:  # names were validated (resolve, __init__)
            self._heatmap_fns[name] = attribution.get_method(name).build(self.bundle)
        return self._heatmap_fns[name]

    def _view(self, text: str) -> evidence.ViewSpec:
        if text not in self._views:
            self._views[text] = evidence.parse_view(text)
        return self._views[text]

    @property
    def default_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (method, AX process) pairs an item with no options gets from `resolve`."""
        return tuple((m, p) for m in self.default_methods for p in DEFAULT_AX_PROCESSES)

    def resolve(self, item: CheckItem) -> ResolvedItem:
        """Return the item with defaults filled in and every option validated (an item
        resolved before is returned as it is).

        Raises InvalidInput naming the field: image shape or values, unknown or unavailable
        method, unknown AX process, label out of range.
        """
        if isinstance(item, ResolvedItem):
            return item
        spec = self.bundle.spec
        image = item.image
        if not item.image_checked:
            if tuple(image.shape) != spec.shape:
                raise InvalidInput(f"shape {list(image.shape)} must be {list(spec.shape)}",
                                   field="image")
            if not torch.isfinite(image).all():
                raise InvalidInput("contains NaN or Inf", field="image")
        if item.label is not None and not 0 <= item.label < self.bundle.num_classes:
            raise InvalidInput(
                f"{item.label} is out of range [0, {self.bundle.num_classes - 1}]",
                field="label",
            )
        if item.prediction_only:
            return ResolvedItem(image, (), (), item.label, False, True)
        if item.verdict_only:
            return ResolvedItem(image, (), (), item.label, False, False, True)
        pairs = tuple(dict.fromkeys(item.pairs))
        methods = (tuple(dict.fromkeys(m for m, _ in pairs)) or tuple(dict.fromkeys(item.methods))
                   or self.default_methods)
        for name in methods:
            attribution.require(name, self.bundle)
            self._require_usable(name)
        processes = (tuple(dict.fromkeys(p for _, p in pairs))
                     or tuple(dict.fromkeys(item.ax_processes)) or DEFAULT_AX_PROCESSES)
        for process in processes:
            scoring.require_process(process)
        return ResolvedItem(image, methods, processes, item.label, item.return_heatmaps,
                            pairs=pairs)

    def check(self, items: Sequence[CheckItem]) -> list[CheckResult]:
        """Return one CheckResult per item, in order. Items not resolved yet (ResolvedItem)
        are validated first."""
        return self.check_with_evidence(items)[0]

    def check_with_evidence(self, items: Sequence[CheckItem],
                            plan: EvidencePlan | None = None
                            ) -> tuple[list[CheckResult], Evidence | None]:
        """Return the results and the raw evidence of the items that are not
        prediction-only (in order), computed for `plan` (default: the verdict's)."""
        if not items:
            return [], None
        items = [self.resolve(item) for item in items]  # resolved items pass as they are
        with self._lock:
            return self._check_locked(list(items), plan or self.plan)

    def _use_shared(self, method: str) -> bool:
        return self._shared_heatmaps and self._pass.supports(method)

    def _check_locked(self, requested: list[CheckItem], plan: EvidencePlan
                      ) -> tuple[list[CheckResult], Evidence | None]:
        """One batch: plan → forward → heatmaps → AX forward → scores → verdict."""
        x = torch.stack([item.image for item in requested]).to(self.bundle.device,
                                                                 torch.float32)
        batch = plan_batch(requested, plan)
        failures = _Failures()
        start = time.perf_counter()
        fwd = self._forward(x, batch)
        after_forward = time.perf_counter()
        own, second, plain = self._backward(x, batch, fwd)
        self._check_logits_and_heatmaps(fwd, own, failures)
        fwd.leaf = fwd.graph_logits = None  # free the graph before the extra forwards
        after_attribution = time.perf_counter()
        extra = self._extra_forward(x, batch, own, second, plain)
        scores, co = self._scores(requested, batch, own, extra, fwd, failures)
        batch_evidence = self._evidence(batch, fwd, plain, extra, co, len(requested))
        verdicts = self._verdicts(len(requested), batch.judged, batch_evidence, failures)
        timing = StageTiming(forward_ms=(after_forward - start) * 1e3,
                             attribution_ms=(after_attribution - after_forward) * 1e3,
                             ax_ms=(time.perf_counter() - after_attribution) * 1e3,
                             batch_size=len(requested))
        return (self._results(requested, fwd, own, scores, verdicts, timing, failures),
                batch_evidence)

    def _forward(self, x: torch.Tensor, batch: _BatchPlan) -> _Forward:
        """The batch's one forward: recorded when any backward pass will need it."""
        plan = batch.plan
        needs_graph = (plan.boundary or bool(plan.epsilons) or bool(plan.counterfactual)
                       or any(self._use_shared(m) for m in batch.own_rows))
        leaf = graph_logits = None
        if needs_graph:
            leaf, graph_logits = self._pass.forward(x)
            logits = graph_logits.detach().float()
        else:
            with torch.inference_mode():
                logits = self.bundle.network(x).float()
        predicted, runner_up = evidence.top_two(logits)
        return _Forward(leaf, graph_logits, logits, predicted, runner_up)

    def _extra_forward(self, x: torch.Tensor, batch: _BatchPlan, own: dict[str, _Heatmaps],
                       second: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]
                       ) -> dict[tuple, torch.Tensor]:
        """Every extra input (AX inputs, counterfactuals, perturbations, views) through one
        batched forward (chunked to bound memory); returns logits by input key."""
        plan, judged = batch.plan, batch.judged
        chunks: list[tuple[tuple, torch.Tensor]] = []
        for (method, process), rows in batch.pair_rows.items():
            h, _ = own[method].of(rows)
            chunks.append((("ax", method, process),
                           scoring.AX_PROCESSES[process](_take(x, rows), h)))
        x_judged = _take(x, judged)
        for method in plan.counterfactual:
            h_own, _ = own[method].of(judged)
            chunks.append((("runner_up", method), x_judged + second[method]))
            chunks.append((("own_removed", method), x_judged - h_own))
        for epsilon in plan.epsilons:
            chunks.append((("perturbed", epsilon),
                           evidence.perturb(x_judged, _take(plain["nll"], judged), epsilon)))
        for text in plan.views:
            chunks.append((("view", text), self._view(text).transform(x_judged)))
        outputs = self._forward_chunks([c[1] for c in chunks])
        return {key: out for (key, _), out in zip(chunks, outputs, strict=True)}

    def _scores(self, requested: list[CheckItem], batch: _BatchPlan,
                own: dict[str, _Heatmaps], extra: dict[tuple, torch.Tensor], fwd: _Forward,
                failures: _Failures
                ) -> tuple[list[list[MethodScore]], dict[tuple[str, str], np.ndarray]]:
        """Each item's CO scores in the order it asked for them, and the verdict's CO
        features of the judged rows; rows with a non-finite score go to `failures`.

        Every pair's scores are computed as tensors, joined, and copied to the host once
        (one copy each for the label-free scores, the zero masks and the labelled scores);
        κ is built once per batch."""
        num_classes = self.bundle.num_classes
        labels = [item.label for item in requested]
        free_kappa = scoring.kappa(fwd.predicted, num_classes)
        labelled_kappa = None
        if any(label is not None for label in labels):
            targets = torch.tensor([0 if label is None else label for label in labels],
                                   device=fwd.logits.device)
            labelled_kappa = scoring.kappa(targets, num_classes)
        free_parts, labelled_parts, zero_parts = [], [], []
        where: dict[tuple[str, str], tuple[int, dict[int, int] | None]] = {}
        """(method, process) → (offset of its rows in the joined scores, row → position,
        None when the pair covers every row in order)."""
        offset, count = 0, len(requested)
        for pair, rows in batch.pair_rows.items():
            _, zero = own[pair[0]].of(rows)
            chunk, base = extra[("ax", *pair)], _take(fwd.logits, rows)
            free_parts.append(scoring.co_score(chunk, base, _take(free_kappa, rows)))
            if labelled_kappa is not None:
                labelled_parts.append(scoring.co_score(chunk, base, _take(labelled_kappa, rows)))
            zero_parts.append(zero)
            every = len(rows) == count and rows == list(range(count))
            where[pair] = (offset, None if every else {i: k for k, i in enumerate(rows)})
            offset += len(rows)
        if not free_parts:
            return [[] for _ in requested], {}
        zero = torch.cat(zero_parts)
        # An all-zero heatmap scores 0 by definition (DESIGN 1.3), even for PRODUCT.
        free = torch.cat(free_parts).masked_fill(zero, 0.0).cpu().numpy()
        zero_host = zero.cpu().numpy()
        labelled = (torch.cat(labelled_parts).masked_fill(zero, 0.0).cpu().numpy()
                    if labelled_parts else None)
        finite = np.isfinite(free)
        if labelled is not None:
            finite &= np.isfinite(labelled)
        all_rows = [i for rows in batch.pair_rows.values() for i in rows]
        failures.mark(all_rows, finite, "co_score")
        co: dict[tuple[str, str], np.ndarray] = {}
        for pair in batch.plan.co_pairs:
            start, position = where[pair]
            co[pair] = free[[start + (i if position is None else position[i])
                             for i in batch.judged]]
        free_rows, zero_rows = free.tolist(), zero_host.tolist()
        labelled_rows = labelled.tolist() if labelled is not None else None
        scores: list[list[MethodScore]] = []
        for i, item in enumerate(requested):
            mine = []
            for method, process in item.asked_pairs():
                start, position = where[(method, process)]
                k = start + (i if position is None else position[i])
                mine.append(MethodScore(
                    method, process, free_rows[k],
                    labelled_rows[k] if labelled_rows is not None and labels[i] is not None
                    else None, zero_rows[k]))
            scores.append(mine)
        return scores, co

    @staticmethod
    def _evidence(batch: _BatchPlan, fwd: _Forward, plain: dict[str, torch.Tensor],
                  extra: dict[tuple, torch.Tensor], co: dict[tuple[str, str], np.ndarray],
                  count: int) -> Evidence | None:
        """The verdict's raw evidence for the judged rows (None when there are none)."""
        judged, plan = batch.judged, batch.plan
        if not judged:
            return None
        rows = judged if len(judged) < count else slice(None)  # no copy when all are
        return Evidence(
            logits=fwd.logits[rows].cpu().double().numpy(),
            margin_gradient_norm=(evidence.gradient_norms(_take(plain["margin"], judged))
                                  .cpu().double().numpy() if plan.boundary else None),
            runner_up_logits={m: extra[("runner_up", m)].cpu().double().numpy()
                              for m in plan.counterfactual},
            own_removed_logits={m: extra[("own_removed", m)].cpu().double().numpy()
                                for m in plan.counterfactual},
            perturbed_logits={e: extra[("perturbed", e)].cpu().double().numpy()
                              for e in plan.epsilons},
            view_logits=(torch.stack([extra[("view", v)] for v in plan.views])
                         .cpu().double().numpy() if plan.views else None),
            co=co,
        )

    def _results(self, requested: list[CheckItem], fwd: _Forward, own: dict[str, _Heatmaps],
                 scores: list[list[MethodScore]], verdicts: list[Verdict],
                 timing: StageTiming, failures: _Failures) -> list[CheckResult]:
        """One CheckResult per item (host copies made once per tensor); an item with a
        non-finite output gets CheckResult.failed instead of numbers."""
        probabilities = torch.softmax(fwd.logits, dim=1)
        logits_rows, probs_rows = fwd.logits.cpu().tolist(), probabilities.cpu().tolist()
        classes = fwd.predicted.cpu().tolist()
        copied: dict[str, torch.Tensor] = {}

        def host_heatmaps(method: str) -> torch.Tensor:
            """The method's heatmaps on the host in NCHW order: one copy per batch."""
            if method not in copied:
                copied[method] = own[method].normalised.cpu().contiguous()
            return copied[method]

        results = []
        for stage in failures.stage.values():
            self.nonfinite_outputs[stage] = self.nonfinite_outputs.get(stage, 0) + 1
        if failures.stage:
            log.warning("nonfinite_output", extra={"count": len(failures.stage),
                                                   "stages": sorted(set(failures.stage.values()))})
        for i, item in enumerate(requested):
            if i in failures.stage:
                results.append(CheckResult.failed(
                    NonFiniteOutput(failures.stage[i]),
                    StageTiming(timing.forward_ms, timing.attribution_ms, timing.ax_ms, 0.0,
                                timing.batch_size)))
                continue
            cls = classes[i]
            maps = {}
            if item.return_heatmaps:
                for name in item.methods:  # finite: checked above
                    maps[name] = host_heatmaps(name)[own[name].rows.index(i)]
            results.append(CheckResult(
                class_index=cls,
                class_name=self.bundle.class_names[cls],
                probability=probs_rows[i][cls],
                logits=logits_rows[i],
                probabilities=probs_rows[i],
                scores=scores[i],
                heatmaps=maps,
                verdict=verdicts[i],
                # Each result gets its own copy: the batcher adds its queue time.
                timing=StageTiming(timing.forward_ms, timing.attribution_ms, timing.ax_ms,
                                   0.0, timing.batch_size),
            ))
        return results

    def _gradient_requests(self, batch: _BatchPlan, fwd: _Forward
                           ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, str]], bool]:
        """The shared pass's (rule, coefficients) requests of a batch, their keys ("own" or
        "second" + method, "plain" + "margin"/"nll"), and whether the margin gradient comes
        free from the two saliency gradients."""
        num_classes = fwd.logits.shape[1]
        requests: list[tuple[str, torch.Tensor]] = []
        keys: list[tuple[str, str]] = []
        for method in batch.own_rows:
            if self._use_shared(method):
                requests.append((rule_of(method), evidence.one_hot(fwd.predicted, num_classes)))
                keys.append(("own", method))
        for method in batch.plan.counterfactual:
            if self._use_shared(method):
                requests.append((rule_of(method), evidence.one_hot(fwd.runner_up, num_classes)))
                keys.append(("second", method))
        # ∇(z_ŷ − z₂) = saliency(ŷ) − saliency(z₂) when both are computed anyway.
        margin_free = {("own", "saliency"), ("second", "saliency")} <= set(keys)
        if batch.plan.boundary and not margin_free:
            requests.append(("plain", evidence.margin_coefficients(
                fwd.predicted, fwd.runner_up, num_classes)))
            keys.append(("plain", "margin"))
        if batch.plan.epsilons:
            requests.append(("plain", evidence.nll_coefficients(fwd.logits, fwd.predicted)))
            keys.append(("plain", "nll"))
        return requests, keys, margin_free

    def _backward(self, x: torch.Tensor, batch: _BatchPlan, fwd: _Forward
                  ) -> tuple[dict[str, _Heatmaps], dict[str, torch.Tensor],
                             dict[str, torch.Tensor]]:
        """Return (ŷ's heatmaps per method, normalised runner-up heatmaps h₂ of the judged
        rows per counterfactual method, plain input gradients: "margin" ∇ₓ(z_ŷ − z₂) and
        "nll" ∇ₓ(−log p_ŷ) over the whole batch, as the plan needs them)."""
        requests, keys, margin_free = self._gradient_requests(batch, fwd)
        leaf = fwd.leaf
        grads: dict[tuple[str, str], torch.Tensor] = {}
        if requests:
            assert leaf is not None and fwd.graph_logits is not None
            grads = dict(zip(keys, self._pass.gradients(leaf, fwd.graph_logits, requests),
                             strict=True))
            self.backward_passes += len(requests)

        def heatmaps(method: str, rows: list[int], targets: torch.Tensor, kind: str
                     ) -> torch.Tensor:
            if (kind, method) in grads:
                assert leaf is not None
                return _take(finish_heatmap(method, leaf, grads[(kind, method)]), rows)
            index = torch.tensor(rows, device=x.device)
            with torch.enable_grad():
                raw = self._heatmap_fn(method)(x[index], targets[index])
            self.captum_calls[method] = self.captum_calls.get(method, 0) + len(rows)
            return raw

        own: dict[str, _Heatmaps] = {}
        for method, rows in batch.own_rows.items():
            raw = heatmaps(method, rows, fwd.predicted, "own")
            normalised, zero = scoring.normalise_heatmaps(raw.float())
            own[method] = _Heatmaps(rows, normalised, zero)
        second = {method: scoring.normalise_heatmaps(
            heatmaps(method, batch.judged, fwd.runner_up, "second").float())[0]
            for method in batch.plan.counterfactual}
        plain: dict[str, torch.Tensor] = {}
        if batch.plan.boundary:
            plain["margin"] = (grads[("own", "saliency")] - grads[("second", "saliency")]
                               if margin_free else grads[("plain", "margin")])
        if batch.plan.epsilons:
            plain["nll"] = grads[("plain", "nll")]
        return own, second, plain

    def _check_logits_and_heatmaps(self, fwd: _Forward, own: dict[str, _Heatmaps],
                                   failures: _Failures) -> None:
        """Mark rows whose logits or a heatmap are not finite and count all-zero heatmaps,
        with one host copy for all of them."""
        count = len(fwd.logits)
        parts = [finite_rows(fwd.logits)]
        for heatmaps in own.values():
            parts += [finite_rows(heatmaps.normalised), heatmaps.zero]
        host = torch.cat(parts).cpu().numpy()
        failures.mark(range(count), host[:count], "logits")
        start = count
        for method, heatmaps in own.items():
            size = len(heatmaps.rows)
            failures.mark(heatmaps.rows, host[start:start + size], "heatmap")
            zero = int(host[start + size:start + 2 * size].sum())
            start += 2 * size
            if zero:
                self.zero_heatmaps[method] = self.zero_heatmaps.get(method, 0) + zero
                log.warning("zero_heatmap", extra={"method": method, "count": zero})

    def _forward_chunks(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the float logits of each input batch, run as few batched forwards."""
        if not inputs:
            return []
        sizes = [len(t) for t in inputs]
        joined = torch.cat(inputs)
        with torch.inference_mode():
            out = torch.cat([self.bundle.network(part).float()
                             for part in joined.split(EXTRA_FORWARD_CHUNK)])
        return list(out.split(sizes))

    def _verdicts(self, count: int, judged: list[int], batch: Evidence | None,
                  failures: _Failures) -> list[Verdict]:
        """Return each item's verdict from the calibration (uncalibrated without one); rows
        whose risk or a feature is not finite go to `failures`."""
        verdicts = [Verdict() for _ in range(count)]
        artifact = self.calibration
        if artifact is None or batch is None:
            return verdicts
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # A non-finite row is found just below and fails alone; numpy need not warn.
            risk, wrong, features = artifact.flag.verdicts(batch)
        names = list(features)
        finite = np.isfinite(risk)
        for values in features.values():
            finite &= np.isfinite(values)
        failures.mark(judged, finite, "verdict")
        rows = zip(*(features[n].tolist() for n in names), strict=True)  # one list per feature
        threshold, calibration_id = artifact.flag.threshold, artifact.calibration_id
        for i, r, w, values in zip(judged, risk.tolist(), wrong.tolist(), rows, strict=True):
            verdicts[i] = Verdict(True, w, r, threshold, calibration_id,
                                  dict(zip(names, values, strict=True)))
        return verdicts

    def warm_up(self, *, ready: bool = True) -> CheckResult:
        """Run one check with the default methods on a mid-grey image and return it; then
        mark the engine ready (unless `ready` is False: more start-up work follows)."""
        image = torch.full(self.bundle.spec.shape, 0.5)
        result = self.check([CheckItem(image)])[0]
        self.ready = ready
        return result
