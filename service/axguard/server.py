"""The gRPC server: thin servicers over the engine, health, reflection, lifecycle.

Every RPC goes through `rpc_method`, which maps engine errors to status codes by one table
and turns anything unexpected into INTERNAL with a generic message (the detail goes to the
log with the request id).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from . import openinference
from .batching import DynamicBatcher
from .config import Settings
from .converters import (
    InputLimits,
    image_from_proto,
    model_info,
    prediction_message,
    request_to_item,
    result_to_response,
    tensor_to_proto,
)
from .engine import CheckItem, Engine
from .errors import (
    AxguardError,
    Busy,
    ConfigError,
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    NotReady,
)
from .live import LiveQuality
from .metrics import EngineCollector, LiveQualityCollector, Metrics
from .preprocess import decode_plan
from .rpc import rpc_method, rpc_stream_method, status_for
from .security import CertificateFiles, TokenFile, TokenInterceptor
from .threads import (
    ThreadChoice,
    candidate_threads,
    choose_threads,
    measure_threads,
    usable_cores,
)
from .transport_cost import transport_seconds_per_request
from .v1 import confidence_pb2 as pb
from .v1 import confidence_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConfidenceService"].full_name

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


class ConfidenceServicer(pb_grpc.ConfidenceServiceServicer):
    """axguard.v1.ConfidenceService: validate → convert → engine → convert back."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        b = settings.batching
        self.batcher = DynamicBatcher(engine, max_batch_size=b.max_batch_size,
                                      max_delay=b.max_delay_ms / 1e3, max_queue=b.max_queue)
        self.limits = input_limits(settings)
        self.max_batch_items = settings.server.max_batch_items
        self.gax = settings.gax
        self.draining = False
        """Set on SIGTERM: new requests get UNAVAILABLE while in-flight ones finish."""
        self._diagnoses = threading.BoundedSemaphore(settings.gax.max_concurrent)
        self.live = LiveQuality(settings, engine.bundle, engine.calibration, metrics)
        self.thread_choice = ThreadChoice(torch.get_num_threads(), "process")
        """Set by start_serving when it picks the threads; "process" = as found."""

    def _ensure_ready(self, *, warm: bool = True) -> None:
        """Raise NotReady while draining, or (if `warm`) before the warm-up finished."""
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if warm and not self.engine.ready:
            raise NotReady("the model is still warming up")

    @rpc_method
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext,
              request_id: str) -> pb.CheckResponse:
        start = time.perf_counter()
        self._ensure_ready()
        with self.batcher.arriving() as arrival:
            item = self.engine.resolve(request_to_item(request, self.engine.bundle,
                                                       self.limits))
            decoded = time.perf_counter()
            result = self.batcher.check([item], timeout=context.time_remaining(),
                                        arrival=arrival)[0]
        total = time.perf_counter() - start
        self.metrics.observe_check(result, result.timing.queue_ms, total)
        response = result_to_response(result, request_id, decode_ms=(decoded - start) * 1e3,
                                      total_ms=total * 1e3)
        response.receipt = self.live.observe([result], [request_id])[0]
        return response

    @rpc_method
    def CheckBatch(self, request: pb.CheckBatchRequest, context: grpc.ServicerContext,
                   request_id: str) -> pb.CheckBatchResponse:
        start = time.perf_counter()
        self._ensure_ready()
        count = len(request.requests)
        if count == 0:
            raise InvalidInput("is empty: send at least one CheckRequest", field="requests")
        if count > self.max_batch_items:
            raise InputTooLarge(f"has {count} items, limit {self.max_batch_items}",
                                field="requests")
        with self.batcher.arriving(count) as arrival:
            return self._check_batch(request, context, request_id, start, arrival)

    def _check_batch(self, request: pb.CheckBatchRequest, context: grpc.ServicerContext,
                     request_id: str, start: float, arrival: Any) -> pb.CheckBatchResponse:
        count = len(request.requests)
        responses: list[pb.CheckResponse | None] = [None] * count
        good: list[tuple[int, str, Any]] = []
        for i, sub in enumerate(request.requests):
            sub_id = sub.request_id or f"{request_id}-{i}"
            prefix = f"requests[{i}]."
            try:
                item = request_to_item(sub, self.engine.bundle, self.limits, prefix)
                try:
                    item = self.engine.resolve(item)
                except AxguardError as err:  # the engine names fields of one request
                    err.field = f"{prefix}{err.field}" if err.field else prefix[:-1]
                    raise
                good.append((i, sub_id, item))
            except AxguardError as err:
                responses[i] = pb.CheckResponse(
                    request_id=sub_id,
                    error=pb.ItemError(code=status_for(err).value[0], message=err.message),
                )
                log.info("batch_item_rejected", extra={"request_id": sub_id,
                                                       "reason": err.message})
        decoded = time.perf_counter()
        results = self.batcher.check([item for _, _, item in good],
                                     timeout=context.time_remaining(), arrival=arrival)
        total_ms = (time.perf_counter() - start) * 1e3
        for result in results:
            self.metrics.observe_check(result, result.timing.queue_ms, total_ms / 1e3)
        receipts = self.live.observe(results, [sub_id for _, sub_id, _ in good])
        for (i, sub_id, _), result, receipt in zip(good, results, receipts, strict=True):
            responses[i] = result_to_response(result, sub_id, decode_ms=(decoded - start) * 1e3,
                                              total_ms=total_ms)
            responses[i].receipt = receipt
        return pb.CheckBatchResponse(responses=responses)

    @rpc_method
    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext,
                 request_id: str) -> pb.FeedbackResponse:
        self._ensure_ready(warm=False)
        outcomes = self.live.count_labels([(i.receipt, i.label) for i in request.items])
        response = pb.FeedbackResponse()
        for i, o in enumerate(outcomes):
            result = response.results.add(counted=o.counted, duplicate=o.duplicate,
                                          request_id=o.request_id,
                                          prediction_correct=o.prediction_correct,
                                          flagged=o.flagged)
            if o.error is not None:
                result.error.code = status_for(o.error).value[0]
                result.error.message = o.error.message
                log.info("feedback_item_refused", extra={"request_id": request_id,
                                                         "item": i, "reason": o.reason})
        response.counted = sum(o.counted for o in outcomes)
        response.duplicates = sum(o.duplicate for o in outcomes)
        response.errors = sum(o.error is not None for o in outcomes)
        log.info("feedback", extra={"request_id": request_id, "counted": response.counted,
                                    "duplicates": response.duplicates,
                                    "errors": response.errors})
        return response

    @rpc_stream_method
    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext,
                 request_id: str) -> Iterator[pb.DiagnoseEvent]:
        self._ensure_ready()
        if not self._diagnoses.acquire(blocking=False):
            raise Busy(f"{self.gax.max_concurrent} diagnoses are already running; retry later",
                       field="diagnose")
        try:
            yield from self._diagnose(request, context, request_id)
        finally:
            self._diagnoses.release()

    def _diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext,
                  request_id: str) -> Iterator[pb.DiagnoseEvent]:
        engine = self.engine
        image = image_from_proto(request.image, engine.bundle, self.limits)
        options = engine.gax_options(
            image,
            target_class=request.target_class if request.HasField("target_class") else None,
            target_co=request.target_co if request.HasField("target_co") else None,
            max_steps=request.max_steps or 500,
            learning_rate=(request.learning_rate if request.HasField("learning_rate")
                           else 0.1),
            similarity_weight=(request.similarity_weight
                               if request.HasField("similarity_weight") else 100.0),
            step_cap=self.gax.max_steps_cap,
            fallback_target_co=self.gax.default_target_co,
        )
        if request.snapshot_every < 0:
            raise InvalidInput("must be >= 0", field="snapshot_every")
        every = request.snapshot_every
        if every:  # keep the stream bounded
            every = max(every, -(-options.max_steps // self.gax.max_snapshots))
        cancelled = threading.Event()
        context.add_callback(cancelled.set)

        def should_stop() -> bool:
            remaining = context.time_remaining()
            return cancelled.is_set() or (remaining is not None and remaining <= 0)

        last = None
        steps = engine.diagnose(image, options, should_stop)
        try:
            for step in steps:
                if not _finite_step(step):
                    raise InvalidInput(
                        f"the optimisation diverged at step {step.step} (non-finite loss or "
                        "heatmap); lower learning_rate or similarity_weight",
                        field="diagnose")
                last = step
                yield pb.DiagnoseEvent(progress=pb.DiagnoseProgress(
                    step=step.step, co_score=step.co_score, loss=step.loss,
                    similarity=step.similarity))
                if every and step.step % every == 0 and not step.final:
                    yield pb.DiagnoseEvent(snapshot=pb.DiagnoseSnapshot(
                        step=step.step, co_score=step.co_score,
                        heatmap=tensor_to_proto(step.heatmap)))
        except GeneratorExit:
            # gRPC closed the stream (client gone): no further step is computed.
            log.info("diagnose_cancelled", extra={"request_id": request_id,
                                                  "steps": last.step if last else 0})
            raise
        finally:
            steps.close()
        if last is None or not last.final:
            log.info("diagnose_cancelled", extra={"request_id": request_id,
                                                  "steps": last.step if last else 0})
            if cancelled.is_set():
                return  # the client is gone: nobody reads a status
            # The deadline passed: say so, never end a cut-off run with OK.
            raise DeadlineExceeded(
                f"the deadline passed after {last.step if last else 0} of "
                f"{options.max_steps} steps; allow more time or fewer max_steps",
                field="diagnose")
        logits = engine.predict(torch.stack([image, image + last.heatmap]))
        names = engine.bundle.class_names
        self.metrics.diagnose_duration.labels(self.metrics.model).observe(last.seconds)
        self.metrics.diagnose_steps.labels(self.metrics.model,
                                           str(last.reached_target).lower()).observe(last.step)
        log.info("diagnose_done", extra={"request_id": request_id, "steps": last.step,
                                         "reached_target": last.reached_target,
                                         "seconds": round(last.seconds, 3)})
        yield pb.DiagnoseEvent(result=pb.DiagnoseResult(
            reached_target=last.reached_target, steps=last.step, final_co=last.co_score,
            seconds=last.seconds, heatmap=tensor_to_proto(last.heatmap),
            prediction_before=prediction_message(logits[0], names),
            prediction_after=prediction_message(logits[1], names),
            target_class=options.target_class, target_co=options.target_co,
            image=tensor_to_proto(image)))

    @rpc_method
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext,
                     request_id: str) -> pb.ModelInfo:
        self._ensure_ready(warm=False)  # the description is valid before the warm-up
        info = model_info(self.engine.bundle, self.engine.default_methods,
                          self.engine.calibration)
        live = self.live
        info.torch_threads = self.thread_choice.threads
        info.torch_threads_choice = self.thread_choice.describe()
        info.feedback.CopyFrom(pb.FeedbackInfo(
            enabled=live.enabled, max_items=live.max_items,
            max_age_seconds=live.max_age_seconds,
            signing_key_id=live.book.keys.signing_key_id if live.book else ""))
        return info


def _finite_step(step: Any) -> bool:
    """Return True when every number a GAX step would stream is finite."""
    values = (step.co_score, step.loss, step.similarity)
    return all(map(math.isfinite, values)) and bool(torch.isfinite(step.heatmap).all())


@dataclass(frozen=True)
class _Unparsable:
    """Stands in for a request whose bytes are not a valid message."""

    message_type: str
    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so that bad bytes become `_Unparsable`, which the handler
    refuses with INVALID_ARGUMENT (grpc itself would answer INTERNAL)."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request message")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # noqa: BLE001  (client bytes)
            return _Unparsable(name, type(err).__name__)

    return parse


def _refuse_unparsable(request: Any, method: str, context: grpc.ServicerContext) -> None:
    if isinstance(request, _Unparsable):
        log.info("rpc_rejected", extra={"rpc": method, "code": "INVALID_ARGUMENT",
                                        "reason": f"unparsable {request.message_type}"})
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request: the bytes are not a valid {request.message_type} "
                      f"({request.error})")


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and status code, times it, and tracks in-flight RPCs."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._active = 0
        self._lock = threading.Lock()
        self.last_start = 0.0
        """time.monotonic() when the latest RPC began."""

    @property
    def active(self) -> int:
        """RPCs being handled right now."""
        return self._active

    def _enter(self) -> None:
        with self._lock:
            self._active += 1
            self.last_start = time.monotonic()
        self.metrics.inflight.labels(self.metrics.model).inc()

    def _record(self, method: str, context: grpc.ServicerContext, start: float,
                failed: bool, cancelled: bool = False) -> None:
        # A call the client cancelled, or whose deadline passed, is no longer active.
        ended = cancelled or not context.is_active()
        remaining = context.time_remaining()
        if ended and remaining is not None and remaining <= 0:
            fallback = grpc.StatusCode.DEADLINE_EXCEEDED
        elif ended:
            fallback = grpc.StatusCode.CANCELLED
        else:
            fallback = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        code = context.code() or fallback
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        self.metrics.rpcs.labels(method, code.name).inc()
        self.metrics.rpc_duration.labels(method).observe(time.perf_counter() - start)
        self.metrics.inflight.labels(self.metrics.model).dec()
        with self._lock:
            self._active -= 1

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        parse = _tolerant(handler.request_deserializer)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start, failed = time.perf_counter(), True
                self._enter()
                try:
                    _refuse_unparsable(request, method, context)
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    self._record(method, context, start, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=parse,
                response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            start, failed, cancelled = time.perf_counter(), True, False
            self._enter()
            try:
                _refuse_unparsable(request, method, context)
                yield from inner_stream(request, context)
                failed = False
            except GeneratorExit:  # the call ended (client cancelled or deadline)
                cancelled = True
                raise
            finally:
                self._record(method, context, start, failed, cancelled)

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=parse,
            response_serializer=handler.response_serializer)


def build_server(
    settings: Settings, engine: Engine, registry: CollectorRegistry | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Return (server, bound port, health servicer); the server is not started yet.

    Health starts NOT_SERVING; `start_serving` flips it after the warm-up. Metrics go to
    `registry` (a fresh one when None); the server carries them as `axguard_metrics`.
    """
    registry = registry if registry is not None else CollectorRegistry()
    bundle = engine.bundle
    metrics = Metrics(registry, model=bundle.name, class_names=bundle.class_names,
                      max_class_labels=settings.metrics.max_class_labels)
    calibration_id = engine.calibration.calibration_id if engine.calibration else ""
    metrics.set_model(bundle.version, bundle.fingerprint, calibration_id)
    limit = settings.server.max_message_bytes
    interceptor = MetricsInterceptor(metrics)
    interceptors: list[grpc.ServerInterceptor] = [interceptor]  # outermost: counts refusals
    auth = settings.server.auth
    if auth.token_file is not None:
        tokens = TokenFile(auth.token_file)
        interceptors.append(TokenInterceptor(
            tokens, lambda rpc: metrics.auth_refused.labels(rpc).inc()))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.server.max_workers,
                                   thread_name_prefix="axguard-rpc"),
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit)],
    )
    servicer = ConfidenceServicer(engine, settings, metrics)
    registry.register(EngineCollector(engine, servicer.batcher, bundle.name))
    registry.register(LiveQualityCollector(servicer.live, bundle.name))
    server.axguard_metrics = metrics  # type: ignore[attr-defined]
    server.axguard_interceptor = interceptor  # type: ignore[attr-defined]
    pb_grpc.add_ConfidenceServiceServicer_to_server(servicer, server)
    server.axguard_servicer = servicer  # type: ignore[attr-defined]  # for shutdown and tests
    openinference.add_to_server(servicer, server)  # the Open Inference Protocol, same port
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, openinference.SERVICE_NAME,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.server.host}:{settings.server.port}"
    tls = settings.server.tls
    if tls.enabled:
        assert tls.cert_file is not None and tls.key_file is not None
        certificates = CertificateFiles(tls.cert_file, tls.key_file, tls.client_ca_file)
        server.axguard_certificates = certificates  # type: ignore[attr-defined]
        port = server.add_secure_port(address, certificates.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}", field="server.port")
    return server, port, health_servicer


def start_serving(
    server: grpc.Server, engine: Engine, health_servicer: health.HealthServicer,
    settings: Settings | None = None, choice: ThreadChoice | None = None,
) -> None:
    """Start the server, warm the engine up, pick the torch threads (when `settings` are
    given; see threads.py), then report SERVING. A `choice` made before (the engine warmed
    up before the port was bound) skips the warm-up."""
    server.start()
    if choice is None:
        warm = engine.warm_up(ready=settings is None)
        if settings is not None:
            choice = choose_torch_threads(settings, engine, warm)
    if choice is not None:
        servicer = server.axguard_servicer
        servicer.thread_choice = choice
        servicer.metrics.torch_threads.labels(servicer.metrics.model, choice.source).set(
            choice.threads)
        engine.ready = True
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def choose_torch_threads(settings: Settings, engine: Engine, warm: Any) -> ThreadChoice:
    """Set torch's intra-op threads: `model.torch_threads` when configured, else the count
    with the shortest measured batch cycle (threads.choose_threads), timing a batch of
    min(max_batch_size, max_workers) images (the largest batch single Checks can form) and
    a loopback round trip of the transport. GPU models keep cores − 1."""
    cores = usable_cores()
    if settings.model.torch_threads:
        choice = ThreadChoice(settings.model.torch_threads, "configured")
    elif engine.bundle.device.type != "cpu":
        choice = ThreadChoice(max(1, cores - 1), "device")
    else:
        batch = min(settings.batching.max_batch_size, settings.server.max_workers)
        images = torch.rand(batch, *engine.bundle.spec.shape,
                            generator=torch.Generator().manual_seed(0))
        items = [CheckItem(image) for image in images]
        timings = measure_threads(lambda: engine.check(items), candidate_threads(cores))
        transport = transport_seconds_per_request(engine.bundle, images[0], warm)
        choice = ThreadChoice(choose_threads(timings, transport, batch, cores), "measured",
                              batch, timings, transport)
    torch.set_num_threads(choice.threads)
    log.info("torch_threads", extra={"threads": choice.threads, "source": choice.source,
                                     "choice": choice.describe()})
    return choice


QUIET_SECONDS = 0.5


def drain(server: grpc.Server, health_servicer: health.HealthServicer, grace: float) -> None:
    """Shut down gracefully: NOT_SERVING at once, new RPCs UNAVAILABLE, in-flight RPCs get
    up to `grace` seconds to finish, then the server stops (cancelling what is left)."""
    log.info("draining", extra={"grace_seconds": grace})
    health_servicer.enter_graceful_shutdown()
    server.axguard_servicer.draining = True
    interceptor = server.axguard_interceptor
    deadline = time.monotonic() + grace
    # Stop only once nothing runs and no RPC arrived for QUIET_SECONDS: RPCs that reach the
    # transport while it closes would get CANCELLED instead of our UNAVAILABLE.
    while time.monotonic() < deadline and (
            interceptor.active or time.monotonic() - interceptor.last_start < QUIET_SECONDS):
        time.sleep(0.02)
    server.stop(max(deadline - time.monotonic(), 1.0)).wait()


def configure_torch(settings: Settings) -> None:
    """Set torch's intra-op threads before the model loads: `model.torch_threads`, else
    one less than the usable cores (at least 1) until the warm-up measures the best count
    (`start_serving`)."""
    torch.set_num_threads(settings.model.torch_threads or max(1, usable_cores() - 1))


def serve(settings: Settings, on_ready: Callable[[int], None] | None = None,
          warm_first: bool = False) -> int:
    """Run the server until SIGTERM or SIGINT; return the exit code. With
    `server.processes` > 1, run that many worker processes instead (workers.py);
    `on_ready(metrics port)` is called once the server is SERVING. `warm_first` warms the
    engine up and picks its threads before binding the port (a worker sharing the port must
    not receive connections it cannot answer yet)."""
    if settings.server.processes > 1:
        from .workers import serve_processes

        return serve_processes(settings)
    from .app import build_engine

    configure_torch(settings)
    engine = build_engine(settings)
    choice = None
    if warm_first:
        choice = choose_torch_threads(settings, engine, engine.warm_up(ready=False))
    server, port, health_servicer = build_server(settings, engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics_http = None
    if settings.metrics.enabled:
        metrics_http, _ = start_http_server(settings.metrics.port, settings.metrics.host,
                                            registry=server.axguard_metrics.registry)
        log.info("metrics", extra={"address": f"{settings.metrics.host}:"
                                              f"{metrics_http.server_port}"})
    start_serving(server, engine, health_servicer, settings, choice)
    log.info("serving", extra={"address": f"{settings.server.host}:{port}",
                               "model": engine.bundle.name})
    if on_ready is not None:
        on_ready(metrics_http.server_port if metrics_http is not None else 0)
    stop.wait()
    drain(server, health_servicer, settings.server.grace_seconds)
    server.axguard_servicer.batcher.close()
    if metrics_http is not None:  # last, so the drain itself is visible to Prometheus
        metrics_http.shutdown()
        metrics_http.server_close()
    log.info("stopped")
    return 0
