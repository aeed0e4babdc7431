"""The engine: a batch of images in, predictions and CO scores out. Knows nothing of gRPC.

Per batch: one forward of x; per method one attribution call for the images that asked for
it (target = the predicted class); the heatmaps are normalised by their global max|h|; then
every AX input (for every method and AX process) goes through one batched forward, and the
CO score (paper eq. 5) is computed label-free (κ from ŷ) and, where a label was given, with
the paper's labelled κ.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import attribution, gax, scoring
from .calibration import flag
from .calibration.artifact import CalibrationArtifact, check_matches
from .errors import ConfigError, InvalidInput
from .gax import GaxOptions, GaxStep
from .model import ModelBundle, shared_copy
from .sharedpass import SHARED_METHODS, SharedPass

log = logging.getLogger(__name__)

AX_PROCESS_NAMES = tuple(scoring.AX_PROCESSES)
DEFAULT_AX_PROCESSES = ("sum",)


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


@dataclass
class StageTiming:
    """Milliseconds spent on each stage of the batch an item ran in."""

    forward_ms: float = 0.0
    attribution_ms: float = 0.0
    ax_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 1


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
        self.available = [m.name for m in attribution.available_methods(bundle)]
        for name in default_methods:
            spec = attribution.get_method(name)
            try:
                attribution.check_available(spec, bundle)
            except InvalidInput as err:
                raise ConfigError(err.args[0], field="attribution.default_methods") from err
        if not default_methods:
            raise ConfigError("at least one default method is needed",
                              field="attribution.default_methods")
        self.default_methods = tuple(default_methods)
        self._heatmap_fns: dict[str, attribution.HeatmapFn] = {}
        self._lock = threading.Lock()
        self.ready = False
        self._gax_copy: torch.nn.Module | None = None
        self.captum_calls: dict[str, int] = {}
        """Images whose heatmap came from Captum itself, by method: DeepLift and Grad-CAM
        always, the shared-pass methods only where the shared path is off or impossible
        (TorchScript)."""
        self._shared = (SharedPass(bundle.network)
                        if shared_pass and not bundle.torchscript else None)
        self.zero_heatmaps: dict[str, int] = {}
        """All-zero heatmaps seen so far, by method (their scores were set to 0)."""
        self.calibration = calibration
        # The verdict needs the calibration's scores whatever a request asks for.
        self._calibration_methods: tuple[str, ...] = ()
        self._calibration_processes: tuple[str, ...] = ()
        if calibration is not None:
            check_matches(calibration, bundle.fingerprint, self.available)
            self._calibration_methods = tuple(dict.fromkeys(p.method for p in calibration.pairs))
            self._calibration_processes = tuple(
                dict.fromkeys(p.ax_process for p in calibration.pairs))
        # Build the needed methods now so configuration errors surface at start-up.
        for name in (*self.default_methods, *self._calibration_methods):
            self._heatmap_fn(name)

    def _heatmap_fn(self, name: str) -> attribution.HeatmapFn:
        if name not in self._heatmap_fns:
            spec = attribution.get_method(name)
            attribution.check_available(spec, self.bundle)
            self._heatmap_fns[name] = spec.build(self.bundle)
        return self._heatmap_fns[name]

    def resolve(self, item: CheckItem) -> CheckItem:
        """Return the item with defaults filled in and every option validated.

        Raises InvalidInput naming the field: image shape or values, unknown or unavailable
        method, unknown AX process, label out of range.
        """
        spec = self.bundle.spec
        image = item.image
        if tuple(image.shape) != spec.shape:
            raise InvalidInput(f"shape {list(image.shape)} must be {list(spec.shape)}",
                               field="image")
        if not torch.isfinite(image).all():
            raise InvalidInput("contains NaN or Inf", field="image")
        if item.prediction_only:
            return CheckItem(image, (), (), None, False, True)
        methods = tuple(dict.fromkeys(item.methods)) or self.default_methods
        for name in methods:
            attribution.check_available(attribution.get_method(name), self.bundle)
        processes = tuple(dict.fromkeys(item.ax_processes)) or DEFAULT_AX_PROCESSES
        for process in processes:
            if process not in scoring.AX_PROCESSES:
                raise InvalidInput(
                    f"unknown AX process {process!r}; valid: {', '.join(AX_PROCESS_NAMES)}",
                    field="ax_processes",
                )
        if item.label is not None and not 0 <= item.label < self.bundle.num_classes:
            raise InvalidInput(
                f"{item.label} is out of range [0, {self.bundle.num_classes - 1}]",
                field="label",
            )
        return CheckItem(image, methods, processes, item.label, item.return_heatmaps)

    def check(self, items: Sequence[CheckItem]) -> list[CheckResult]:
        """Return one CheckResult per item, in order. Items are validated first (resolve)."""
        if not items:
            return []
        resolved = [self.resolve(item) for item in items]
        with self._lock:
            return self._check_locked(resolved)

    def _check_locked(self, requested: list[CheckItem]) -> list[CheckResult]:
        bundle = self.bundle
        # Work on what was asked plus what the verdict needs; report only what was asked.
        items = [
            item if item.prediction_only else
            CheckItem(item.image,
                      tuple(dict.fromkeys((*item.methods, *self._calibration_methods))),
                      tuple(dict.fromkeys((*item.ax_processes, *self._calibration_processes))),
                      item.label, item.return_heatmaps)
            for item in requested
        ]
        x = torch.stack([item.image for item in items]).to(bundle.device, torch.float32)
        count = len(items)

        needed = list(dict.fromkeys(m for item in items for m in item.methods))
        shared = [m for m in needed if self._shared is not None and m in SHARED_METHODS]

        start = time.perf_counter()
        if shared:
            # One recorded forward gives the logits and serves every shared method.
            leaf, graph_logits = self._shared.forward(x)
            logits = graph_logits.detach().float()
        else:
            with torch.inference_mode():
                logits = bundle.network(x).float()
        predicted = logits.argmax(dim=1)
        probabilities = torch.softmax(logits, dim=1)
        after_forward = time.perf_counter()

        raw_shared = (self._shared.heatmaps(leaf, graph_logits, predicted, shared)
                      if shared and self._shared is not None else {})
        if shared:
            del leaf, graph_logits  # free the graph before the AX forward
        # One attribution call per method, for the images that asked for it.
        heatmaps: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        for name in needed:
            rows = [i for i, item in enumerate(items) if name in item.methods]
            index = torch.tensor(rows, device=x.device)
            if name in raw_shared:
                raw = raw_shared[name][index]
            else:
                with torch.enable_grad():
                    raw = self._heatmap_fn(name)(x[index], predicted[index])
                self.captum_calls[name] = self.captum_calls.get(name, 0) + len(rows)
            normalised, zero = scoring.normalise_heatmaps(raw.float())
            heatmaps[name] = (rows, normalised, zero)
            if zero.any():
                count_zero = int(zero.sum())
                self.zero_heatmaps[name] = self.zero_heatmaps.get(name, 0) + count_zero
                log.warning("zero_heatmap", extra={"method": name, "count": count_zero})
        after_attribution = time.perf_counter()

        # Every AX input of every (method, process) pair in one batched forward.
        pairs: list[tuple[str, str, list[int], torch.Tensor]] = []
        ax_inputs = []
        for name, (rows, normalised, zero) in heatmaps.items():
            processes = dict.fromkeys(p for i in rows for p in items[i].ax_processes)
            for process in processes:
                keep = [k for k, i in enumerate(rows) if process in items[i].ax_processes]
                sub_rows = [rows[k] for k in keep]
                ax = scoring.AX_PROCESSES[process](x[sub_rows], normalised[keep])
                pairs.append((name, process, sub_rows, zero[keep]))
                ax_inputs.append(ax)
        if ax_inputs:
            with torch.inference_mode():
                ax_logits = bundle.network(torch.cat(ax_inputs)).float()

        scores: list[list[MethodScore]] = [[] for _ in range(count)]
        offset = 0
        labels = [item.label for item in items]
        for name, process, rows, zero in pairs:
            chunk = ax_logits[offset : offset + len(rows)]
            offset += len(rows)
            base = logits[rows]
            free = scoring.co_score(chunk, base, scoring.kappa(predicted[rows], bundle.num_classes))
            # An all-zero heatmap scores 0 by definition (DESIGN 1.3), even for PRODUCT.
            free = torch.where(zero, torch.zeros_like(free), free)
            labelled: torch.Tensor | None = None
            if any(labels[i] is not None for i in rows):
                targets = torch.tensor(
                    [labels[i] if labels[i] is not None else 0 for i in rows], device=x.device
                )
                labelled = scoring.co_score(chunk, base, scoring.kappa(targets, bundle.num_classes))
                labelled = torch.where(zero, torch.zeros_like(labelled), labelled)
            for k, i in enumerate(rows):
                scores[i].append(MethodScore(
                    method=name,
                    ax_process=process,
                    score=float(free[k]),
                    labelled_score=(
                        float(labelled[k]) if labelled is not None and labels[i] is not None
                        else None
                    ),
                    zero_heatmap=bool(zero[k]),
                ))
        verdicts = self._verdicts(logits, scores)
        # Each item lists the scores it asked for, in the order it asked for them.
        for i, item in enumerate(requested):
            scores[i] = sorted(
                (s for s in scores[i]
                 if s.method in item.methods and s.ax_process in item.ax_processes),
                key=lambda s, it=item: (it.methods.index(s.method),
                                        it.ax_processes.index(s.ax_process)))
        end = time.perf_counter()

        timing = StageTiming(
            forward_ms=(after_forward - start) * 1e3,
            attribution_ms=(after_attribution - after_forward) * 1e3,
            ax_ms=(end - after_attribution) * 1e3,
            batch_size=count,
        )
        results = []
        logits_cpu, probs_cpu, pred_cpu = logits.cpu(), probabilities.cpu(), predicted.cpu()
        for i, item in enumerate(requested):
            cls = int(pred_cpu[i])
            maps = {}
            if item.return_heatmaps:
                for name, (rows, normalised, _zero) in heatmaps.items():
                    if i in rows and name in item.methods:
                        maps[name] = normalised[rows.index(i)].cpu()
            results.append(CheckResult(
                class_index=cls,
                class_name=bundle.class_names[cls],
                probability=float(probs_cpu[i, cls]),
                logits=logits_cpu[i].tolist(),
                probabilities=probs_cpu[i].tolist(),
                scores=scores[i],
                heatmaps=maps,
                verdict=verdicts[i],
                timing=dataclasses.replace(timing),  # each result may add its queue time
            ))
        return results

    def _verdicts(self, logits: torch.Tensor, scores: list[list[MethodScore]]) -> list[Verdict]:
        """Return each item's verdict from the calibration (uncalibrated without one)."""
        artifact = self.calibration
        verdicts = [Verdict() for _ in scores]
        rows = [i for i, row in enumerate(scores) if row]  # prediction-only items have none
        if artifact is None or not rows:
            return verdicts
        by_pair = [{(s.method, s.ax_process): s.score for s in scores[i]} for i in rows]
        co = {(p.method, p.ax_process): np.array([row[(p.method, p.ax_process)]
                                                  for row in by_pair])
              for p in artifact.pairs}
        risk, wrong = flag.verdicts(artifact, flag.features_of(logits[rows].cpu().numpy(), co))
        for i, r, w in zip(rows, risk, wrong, strict=True):
            verdicts[i] = Verdict(True, bool(w), float(r), artifact.threshold.value,
                                  artifact.calibration_id)
        return verdicts

    def gax_options(
        self, image: torch.Tensor, *, target_class: int | None, target_co: float | None,
        max_steps: int, learning_rate: float, similarity_weight: float, step_cap: int,
        fallback_target_co: float,
    ) -> GaxOptions:
        """Return validated GAX options with defaults filled in (see gax.py).

        Defaults: the predicted class; the calibration's GAX target, else `fallback_target_co`.
        """
        self.resolve(CheckItem(image, self.default_methods[:1]))
        if target_class is None:
            target_class = int(self.predict(image[None]).argmax(dim=1)[0])
        elif not 0 <= target_class < self.bundle.num_classes:
            raise InvalidInput(
                f"{target_class} is out of range [0, {self.bundle.num_classes - 1}]",
                field="target_class")
        if target_co is None:
            target_co = (self.calibration.gax_target if self.calibration is not None
                         else fallback_target_co)
        if not np.isfinite(target_co):
            raise InvalidInput("must be finite", field="target_co")
        if not 1 <= max_steps <= step_cap:
            raise InvalidInput(f"{max_steps} is outside [1, {step_cap}]", field="max_steps")
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise InvalidInput("must be a positive number", field="learning_rate")
        if not (np.isfinite(similarity_weight) and similarity_weight >= 0):
            raise InvalidInput("must be a non-negative number", field="similarity_weight")
        return GaxOptions(target_class, float(target_co), max_steps, learning_rate,
                          similarity_weight)

    @property
    def _gax_network(self) -> torch.nn.Module:
        """A copy of the network (sharing its weights) that no hook ever touches, so GAX
        needs no lock."""
        if self._gax_copy is None:
            with self._lock:
                if self._gax_copy is None:
                    self._gax_copy = (self.bundle.network if self.bundle.torchscript
                                      else shared_copy(self.bundle.network))
        return self._gax_copy

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (N, classes) of (N, C, H, W) pixels, without attribution."""
        network = self._gax_network  # copied outside inference mode: GAX needs autograd on it
        with torch.inference_mode():
            return network(x.to(self.bundle.device)).float().cpu()

    def diagnose(self, image: torch.Tensor, options: GaxOptions,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[GaxStep]:
        """Yield the GAX steps for one (C, H, W) image (see gax.diagnose)."""
        yield from gax.diagnose(self._gax_network, image.to(self.bundle.device), options,
                                should_stop=should_stop)

    def warm_up(self) -> None:
        """Run one check with the default methods on a mid-grey image, then mark ready."""
        image = torch.full(self.bundle.spec.shape, 0.5)
        self.check([CheckItem(image)])
        self.ready = True
