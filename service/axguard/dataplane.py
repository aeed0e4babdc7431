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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from .batching import Arrival, DynamicBatcher
from .config import Settings
from .diagnoser import Diagnoser
from .engine import CheckItem, CheckResult, Engine
from .errors import ConfigError, DeadlineExceeded, InvalidInput, NonFiniteOutput, NotReady
from .gax import GaxOptions, GaxStep
from .live import LabelOutcome, LiveQuality
from .metrics import Metrics
from .preprocess import InputLimits, decode_plan
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

    def arriving(self, count: int = 1) -> AbstractContextManager[Arrival]:
        """Announce `count` items to the batcher while the caller decodes them."""
        return self.batcher.arriving(count)

    def resolve(self, item: CheckItem) -> CheckItem:
        """The engine's validation of one item (defaults filled in; InvalidInput names the
        field)."""
        return self.engine.resolve(item)

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
        yield DiagnoseEvent("result", last, options, logits[0], logits[1])

    def close(self) -> None:
        """Stop the batcher after what is queued."""
        self.batcher.close()
