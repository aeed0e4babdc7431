"""The data plane: what every transport (axguard.v1, the Open Inference Protocol) does
between "request decoded" and "answer converted", with no gRPC in it (MLServer's
`handlers/dataplane.py` is the model): readiness and draining, the dynamic batcher, the
metrics of answered checks, receipts and drift, label feedback, and served diagnoses
(limits, snapshot pacing, the before/after predictions). Servicers convert, call one
method here, and convert back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import Settings
from ..engine.core import CheckItem, CheckResult, Engine
from ..engine.gax import GaxOptions, GaxStep
from ..engine.model import ModelBundle
from ..engine.preprocess import InputLimits, decode_plan
from ..errors import (
    AxguardError,
    ConfigError,
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    NonFiniteOutput,
    NotFound,
    NotReady,
)
from ..flag.artifact import CalibrationArtifact
from .batching import Arrival, DynamicBatcher
from .diagnoser import Diagnoser
from .metrics import Metrics
from .quality import LabelOutcome, LiveQuality
from .threads import ThreadChoice

log = logging.getLogger("axguard.server")


def input_limits(settings: Settings) -> InputLimits:
    """Return the decoding limits that follow from the memory budget (see decode_plan)."""
    srv = settings.server
    try:
        decodes, pixels = decode_plan(srv.memory_budget_mib * 2**20, srv.max_workers,
                                      srv.max_image_bytes)
    except ValueError as err:
        raise ConfigError(f"{err}: raise it, or lower server.max_image_bytes or "
                          "server.max_workers", field="server.memory_budget_mib") from err
    if srv.max_image_pixels is not None and srv.max_image_pixels > pixels:
        raise ConfigError(
            f"{srv.max_image_pixels} pixels do not fit the memory budget of "
            f"{srv.memory_budget_mib} MiB with {decodes} concurrent decodes (at most "
            f"{pixels}); raise server.memory_budget_mib", field="server.max_image_pixels")
    log.info("decode_limits", extra={"concurrent_decodes": decodes,
                                     "max_image_pixels": srv.max_image_pixels or pixels})
    return InputLimits(srv.max_image_bytes, srv.max_image_pixels or pixels,
                       threading.BoundedSemaphore(decodes))


@dataclass(frozen=True)
class DiagnoseAsk:
    """What a caller asks of a diagnosis; None = the default."""

    target_class: int | None = None
    target_co: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    similarity_weight: float | None = None
    snapshot_every: int = 0


@dataclass(frozen=True)
class DiagnoseEvent:
    """One event of a diagnosis stream: a step's progress, a heatmap snapshot, or the
    result (`kind` "progress", "snapshot" or "result")."""

    kind: str
    step: GaxStep
    options: GaxOptions | None = None
    logits_before: torch.Tensor | None = None
    """Result only: logits of the image and of image + heatmap."""
    logits_after: torch.Tensor | None = None
    image: torch.Tensor | None = None
    """Result only: the diagnosed image."""


FieldNames = Callable[[int, "str | None"], str]
"""(item index, a field name as the engine or decoder gave it) → the request's name for it."""


@dataclass(frozen=True)
class Answer:
    """One item of a check request: its result and receipt, or the error it failed with
    (only when the request answers items separately)."""

    request_id: str
    result: CheckResult | None = None
    receipt: str = ""
    error: AxguardError | None = None


@dataclass(frozen=True)
class Answers:
    """A check request's answers in order, with the time spent decoding and in all."""

    items: list[Answer]
    decode_ms: float
    total_ms: float


@dataclass(frozen=True)
class FeedbackDescription:
    """How this server takes labels back (ModelInfo.feedback)."""

    enabled: bool
    max_items: int
    max_age_seconds: float
    signing_key_id: str


@dataclass(frozen=True)
class ModelDescription:
    """What every API says about the served model (GetModelInfo, ModelMetadata,
    ModelReady): read from the engine once per call, so the servicers hold no engine."""

    bundle: ModelBundle
    default_methods: tuple[str, ...]
    default_pairs: tuple[tuple[str, str], ...]
    """The (method, AX process) pairs a request with no options gets."""
    available: tuple[str, ...]
    method_report: tuple
    calibration: CalibrationArtifact | None
    ready: bool
    thread_choice: ThreadChoice
    max_batch_items: int
    max_message_bytes: int
    feedback: FeedbackDescription


def finite_step(step: GaxStep) -> bool:
    """Return True when every number a GAX step would stream is finite."""
    values = (step.co_score, step.loss, step.similarity)
    return all(map(math.isfinite, values)) and bool(torch.isfinite(step.heatmap).all())


class DataPlane:
    """The served model's request handling, shared by every API."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        b = settings.batching
        self.batcher = DynamicBatcher(engine, max_batch_size=b.max_batch_size,
                                      max_delay=b.max_delay_ms / 1e3, max_queue=b.max_queue)
        self.limits = input_limits(settings)
        self.max_batch_items = settings.server.max_batch_items
        self.max_message_bytes = settings.server.max_message_bytes
        self.diagnoser = Diagnoser(engine.bundle, settings.gax, engine.calibration)
        self.live = LiveQuality(settings, engine.bundle, engine.calibration, metrics)
        self.draining = False
        """Set on SIGTERM: new requests get UNAVAILABLE while in-flight ones finish."""
        self.thread_choice = ThreadChoice(torch.get_num_threads(), "process")
        """Set by start_serving when it picks the threads; "process" = as found."""

    @property
    def ready(self) -> bool:
        """Warmed up and not draining: what grpc.health.v1 reports as SERVING."""
        return self.engine.ready and not self.draining

    def ensure_ready(self, *, warm: bool = True) -> None:
        """Raise NotReady while draining, or (if `warm`) before the warm-up finished."""
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if warm and not self.engine.ready:
            raise NotReady("the model is still warming up")

    @property
    def bundle(self) -> ModelBundle:
        """The served model's description (input spec, class names): what decoders need."""
        return self.engine.bundle

    def require_model(self, name: str, version: str = "",
                      field_prefix: str = "") -> ModelBundle:
        """Return the served bundle; raise NotFound unless (name, version) is the served
        model ("" = any version). Errors name `field_prefix` + "name" / "version"."""
        bundle = self.engine.bundle
        if name != bundle.name:
            raise NotFound(f"model {name!r} is not served here; this server serves "
                           f"{bundle.name!r}", field=f"{field_prefix}name")
        if version and version != bundle.version:
            raise NotFound(f"version {version!r} of {name!r} is not served; served: "
                           f"{bundle.version!r}", field=f"{field_prefix}version")
        return bundle

    def describe(self, name: str | None = None, version: str = "") -> ModelDescription:
        """Describe the served model (with `name`, after require_model)."""
        if name is not None:
            self.require_model(name, version)
        engine, bundle = self.engine, self.engine.bundle
        live = self.live
        return ModelDescription(
            bundle=bundle, default_methods=tuple(engine.default_methods),
            default_pairs=engine.default_pairs,
            available=tuple(engine.available), method_report=tuple(engine.method_report),
            calibration=engine.calibration, ready=self.ready,
            thread_choice=self.thread_choice, max_batch_items=self.max_batch_items,
            max_message_bytes=self.max_message_bytes,
            feedback=FeedbackDescription(
                live.enabled, live.max_items, live.max_age_seconds,
                live.book.keys.signing_key_id if live.book else ""))

    def check_request(self, count: int, decode: Callable[[int], CheckItem],
                      request_ids: Sequence[str], *, timeout: float | None,
                      field_names: FieldNames | None = None, items_field: str = "requests",
                      separate: bool = False) -> Answers:
        """The one request path of a check, for every API: readiness, the item count's
        limits, decoding while the batcher knows the items are coming (`decode(i)`, item i
        of `count`), the engine's validation, the batcher, metrics, receipts, drift.

        `field_names` renames the fields of item i's errors (none: kept as they are).
        `separate`: an item that fails is answered with its error and the others are still
        checked (CheckBatch); otherwise the first failure is raised (Check, ModelInfer).
        """
        started = time.perf_counter()
        self.ensure_ready()
        if count < 1:
            raise InvalidInput("is empty: send at least one item", field=items_field)
        if count > self.max_batch_items:
            raise InputTooLarge(f"has {count} items, limit {self.max_batch_items}",
                                field=items_field)

        def named(i: int, err: AxguardError) -> AxguardError:
            if field_names is not None:
                err.field = field_names(i, err.field)
            return err

        answers: list[Answer | None] = [None] * count
        good: list[tuple[int, CheckItem]] = []
        # The batcher waits for announced items while they decode.
        with self.batcher.arriving(count) as arrival:
            for i in range(count):
                try:
                    good.append((i, self.engine.resolve(decode(i))))
                except AxguardError as err:
                    if not separate:
                        raise named(i, err) from None
                    answers[i] = Answer(request_ids[i], error=named(i, err))
                    log.info("batch_item_rejected", extra={"request_id": request_ids[i],
                                                           "reason": err.message})
            decoded = time.perf_counter()
            try:
                results, receipts = self.check(
                    [item for _, item in good], [request_ids[i] for i, _ in good],
                    timeout=timeout, arrival=arrival, started=started,
                    all_or_none=not separate)
            except NonFiniteOutput as err:
                raise named(good[err.index][0], err) from None
        for (i, _), result, receipt in zip(good, results, receipts, strict=True):
            answers[i] = (Answer(request_ids[i], error=named(i, result.error))
                          if result.error is not None
                          else Answer(request_ids[i], result, receipt))
        done = time.perf_counter()
        return Answers([a for a in answers if a is not None], (decoded - started) * 1e3,
                       (done - started) * 1e3)

    def check(self, items: list[CheckItem], request_ids: list[str], *,
              timeout: float | None, arrival: Arrival | None, started: float,
              all_or_none: bool = False) -> tuple[list[CheckResult], list[str]]:
        """Run resolved items through the batcher; record the metrics and drift of the
        answered ones; return (results, receipts) in order. `started`: time.perf_counter()
        at the request's start.

        An item whose model output was not finite comes back as a result with `error` set
        (its receipt ""), logged with its request id and counted by the engine
        (axguard_nonfinite_outputs_total); nothing of it reaches metrics or drift. With
        `all_or_none` (an API with no per-item errors) the first such error is raised
        instead, before anything is recorded.
        """
        results = self.batcher.check(items, timeout=timeout, arrival=arrival)
        total = time.perf_counter() - started
        answered: list[CheckResult] = []
        answered_ids: list[str] = []
        for result, request_id in zip(results, request_ids, strict=True):
            if result.error is not None:
                log.warning("check_output_not_finite", extra={
                    "request_id": request_id, "stage": result.error.stage})
            else:
                answered.append(result)
                answered_ids.append(request_id)
        if all_or_none and len(answered) < len(results):
            index, failed = next((i, r.error) for i, r in enumerate(results)
                                 if r.error is not None)
            failed.index = index
            raise failed
        for result in answered:
            self.metrics.observe_check(result, result.timing.queue_ms, total)
        signed = iter(self.live.observe(answered, answered_ids))
        return results, ["" if r.error is not None else next(signed) for r in results]

    def use_calibration(self, calibration: CalibrationArtifact) -> None:
        """Serve `calibration` from the next batch on (validated by the engine first:
        ConfigError, and nothing changes): the verdicts, receipts, metrics and the drift
        window's reference follow it. Checks already running finish with the old one."""
        self.engine.use_calibration(calibration)
        self.diagnoser.calibration = calibration
        self.live.use_calibration(calibration)
        bundle = self.engine.bundle
        self.metrics.set_model(bundle.version, bundle.fingerprint, calibration.calibration_id)

    def feedback(self, items: list[tuple[str, int]], request_id: str) -> list[LabelOutcome]:
        """Verify and count (receipt, label) pairs; log refusals and the totals."""
        self.ensure_ready(warm=False)
        outcomes = self.live.count_labels(items)
        for i, o in enumerate(outcomes):
            if o.error is not None:
                log.info("feedback_item_refused", extra={"request_id": request_id,
                                                         "item": i, "reason": o.reason})
        log.info("feedback", extra={"request_id": request_id,
                                    "counted": sum(o.counted for o in outcomes),
                                    "duplicates": sum(o.duplicate for o in outcomes),
                                    "errors": sum(o.error is not None for o in outcomes)})
        return outcomes

    @contextmanager
    def diagnosis(self) -> Iterator[None]:
        """Hold a diagnosis slot (ready first; Busy when settings.gax.max_concurrent run)."""
        self.ensure_ready()
        with self.diagnoser.slot():
            yield

    def diagnose_request(self, decode: Callable[[], tuple[torch.Tensor, DiagnoseAsk]],
                         request_id: str, *, should_stop: Callable[[], bool],
                         cancelled: Callable[[], bool]) -> Iterator[DiagnoseEvent]:
        """The request path of a diagnosis: hold a slot (readiness first, Busy when full),
        decode the image and the ask inside it, then stream `diagnose`'s events."""
        with self.diagnosis():
            image, ask = decode()
            yield from self.diagnose(image, ask, request_id, should_stop=should_stop,
                                     cancelled=cancelled)

    def diagnose(self, image: torch.Tensor, ask: DiagnoseAsk, request_id: str, *,
                 should_stop: Callable[[], bool], cancelled: Callable[[], bool]
                 ) -> Iterator[DiagnoseEvent]:
        """Yield a diagnosis of one (C, H, W) image: progress every step, snapshots at the
        paced period, then the result. Call inside `diagnosis()`. A run stopped by its
        deadline raises DeadlineExceeded (never ends as if complete); one the caller
        cancelled just ends."""
        diagnoser = self.diagnoser
        options = diagnoser.options(image, target_class=ask.target_class,
                                    target_co=ask.target_co, max_steps=ask.max_steps,
                                    learning_rate=ask.learning_rate,
                                    similarity_weight=ask.similarity_weight)
        every = diagnoser.snapshot_every(ask.snapshot_every, options)
        last = None
        steps = diagnoser.run(image, options, should_stop)
        try:
            for step in steps:
                if not finite_step(step):
                    raise InvalidInput(
                        f"the optimisation diverged at step {step.step} (non-finite loss or "
                        "heatmap); lower learning_rate or similarity_weight",
                        field="diagnose")
                last = step
                yield DiagnoseEvent("progress", step)
                if every and step.step % every == 0 and not step.final:
                    yield DiagnoseEvent("snapshot", step)
        except GeneratorExit:
            # The transport closed the stream (client gone): no further step is computed.
            log.info("diagnose_cancelled", extra={"request_id": request_id,
                                                  "steps": last.step if last else 0})
            raise
        finally:
            steps.close()
        if last is None or not last.final:
            log.info("diagnose_cancelled", extra={"request_id": request_id,
                                                  "steps": last.step if last else 0})
            if cancelled():
                return  # the client is gone: nobody reads a status
            raise DeadlineExceeded(
                f"the deadline passed after {last.step if last else 0} of "
                f"{options.max_steps} steps; allow more time or fewer max_steps",
                field="diagnose")
        logits = diagnoser.predict(torch.stack([image, image + last.heatmap]))
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput("logits")
        metrics = self.metrics
        metrics.diagnose_duration.labels(metrics.model).observe(last.seconds)
        metrics.diagnose_steps.labels(metrics.model,
                                      str(last.reached_target).lower()).observe(last.step)
        log.info("diagnose_done", extra={"request_id": request_id, "steps": last.step,
                                         "reached_target": last.reached_target,
                                         "seconds": round(last.seconds, 3)})
        yield DiagnoseEvent("result", last, options, logits[0], logits[1], image)

    def close(self) -> None:
        """Stop the batcher after what is queued."""
        self.batcher.close()
