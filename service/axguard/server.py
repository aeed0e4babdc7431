"""The gRPC server: thin servicers over the data plane, health, reflection, lifecycle.

Each RPC method converts its request (converters.py), calls one data-plane method
(dataplane.py) and converts the answer back. Every RPC goes through `rpc_method` (rpc.py):
engine errors become status codes by one table, anything unexpected INTERNAL with a generic
message (the detail goes to the log with the request id).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from . import openinference
from .config import Settings
from .converters import (
    image_from_proto,
    model_info,
    prediction_message,
    request_to_item,
    result_to_response,
    tensor_to_proto,
)
from .dataplane import DataPlane, DiagnoseAsk, input_limits
from .engine import Engine
from .errors import AxguardError, ConfigError, InputTooLarge, InvalidInput
from .interceptors import MetricsInterceptor
from .metrics import EngineCollector, LiveQualityCollector, Metrics
from .rpc import rpc_method, rpc_stream_method, status_for
from .security import CertificateFiles, TokenFile, TokenInterceptor
from .startup import choose_torch_threads, configure_torch
from .threads import ThreadChoice
from .v1 import confidence_pb2 as pb
from .v1 import confidence_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConfidenceService"].full_name

__all__ = ["SERVICE_NAME", "ConfidenceServicer", "ServerParts", "build_server", "drain",
           "input_limits", "serve", "start_serving"]


def failed_item(request_id: str, error: AxguardError) -> pb.CheckResponse:
    """Return a CheckBatch entry for an item that failed: its status code and message."""
    return pb.CheckResponse(request_id=request_id, error=pb.ItemError(
        code=status_for(error).value[0], message=error.message))


class ConfidenceServicer(pb_grpc.ConfidenceServiceServicer):
    """axguard.v1.ConfidenceService: convert → data plane → convert back."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.engine = plane.engine

    @rpc_method
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext,
              request_id: str) -> pb.CheckResponse:
        start = time.perf_counter()
        plane = self.plane
        plane.ensure_ready()
        with plane.arriving() as arrival:
            item = plane.resolve(request_to_item(request, self.engine.bundle, plane.limits))
            decoded = time.perf_counter()
            (result,), (receipt,) = plane.check([item], [request_id],
                                                timeout=context.time_remaining(),
                                                arrival=arrival, started=start)
        if result.error is not None:
            raise result.error
        response = result_to_response(result, request_id, decode_ms=(decoded - start) * 1e3,
                                      total_ms=(time.perf_counter() - start) * 1e3)
        response.receipt = receipt
        return response

    @rpc_method
    def CheckBatch(self, request: pb.CheckBatchRequest, context: grpc.ServicerContext,
                   request_id: str) -> pb.CheckBatchResponse:
        start = time.perf_counter()
        plane = self.plane
        plane.ensure_ready()
        count = len(request.requests)
        if count == 0:
            raise InvalidInput("is empty: send at least one CheckRequest", field="requests")
        if count > plane.max_batch_items:
            raise InputTooLarge(f"has {count} items, limit {plane.max_batch_items}",
                                field="requests")
        responses: list[pb.CheckResponse | None] = [None] * count
        good: list[tuple[int, str, object]] = []
        with plane.arriving(count) as arrival:
            for i, sub in enumerate(request.requests):
                sub_id = sub.request_id or f"{request_id}-{i}"
                prefix = f"requests[{i}]."
                try:
                    item = request_to_item(sub, self.engine.bundle, plane.limits, prefix)
                    try:
                        item = plane.resolve(item)
                    except AxguardError as err:  # the engine names fields of one request
                        err.field = f"{prefix}{err.field}" if err.field else prefix[:-1]
                        raise
                    good.append((i, sub_id, item))
                except AxguardError as err:
                    responses[i] = failed_item(sub_id, err)
                    log.info("batch_item_rejected", extra={"request_id": sub_id,
                                                           "reason": err.message})
            decoded = time.perf_counter()
            results, receipts = plane.check([item for _, _, item in good],
                                            [sub_id for _, sub_id, _ in good],
                                            timeout=context.time_remaining(),
                                            arrival=arrival, started=start)
        total_ms = (time.perf_counter() - start) * 1e3
        for (i, sub_id, _), result, receipt in zip(good, results, receipts, strict=True):
            if result.error is not None:
                result.error.field = f"requests[{i}].{result.error.field}"
                responses[i] = failed_item(sub_id, result.error)
                continue
            responses[i] = result_to_response(result, sub_id, decode_ms=(decoded - start) * 1e3,
                                              total_ms=total_ms)
            responses[i].receipt = receipt
        return pb.CheckBatchResponse(responses=responses)

    @rpc_method
    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext,
                 request_id: str) -> pb.FeedbackResponse:
        outcomes = self.plane.feedback([(i.receipt, i.label) for i in request.items],
                                       request_id)
        response = pb.FeedbackResponse()
        for o in outcomes:
            result = response.results.add(counted=o.counted, duplicate=o.duplicate,
                                          request_id=o.request_id,
                                          prediction_correct=o.prediction_correct,
                                          flagged=o.flagged)
            if o.error is not None:
                result.error.code = status_for(o.error).value[0]
                result.error.message = o.error.message
        response.counted = sum(o.counted for o in outcomes)
        response.duplicates = sum(o.duplicate for o in outcomes)
        response.errors = sum(o.error is not None for o in outcomes)
        return response

    @rpc_stream_method
    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext,
                 request_id: str) -> Iterator[pb.DiagnoseEvent]:
        plane = self.plane
        with plane.diagnosis():
            image = image_from_proto(request.image, self.engine.bundle, plane.limits)
            ask = DiagnoseAsk(
                target_class=request.target_class if request.HasField("target_class")
                else None,
                target_co=request.target_co if request.HasField("target_co") else None,
                max_steps=request.max_steps or None,
                learning_rate=(request.learning_rate if request.HasField("learning_rate")
                               else None),
                similarity_weight=(request.similarity_weight
                                   if request.HasField("similarity_weight") else None),
                snapshot_every=request.snapshot_every)
            cancelled = threading.Event()
            context.add_callback(cancelled.set)

            def should_stop() -> bool:
                remaining = context.time_remaining()
                return cancelled.is_set() or (remaining is not None and remaining <= 0)

            names = self.engine.bundle.class_names
            for event in plane.diagnose(image, ask, request_id, should_stop=should_stop,
                                        cancelled=cancelled.is_set):
                step = event.step
                if event.kind == "progress":
                    yield pb.DiagnoseEvent(progress=pb.DiagnoseProgress(
                        step=step.step, co_score=step.co_score, loss=step.loss,
                        similarity=step.similarity))
                elif event.kind == "snapshot":
                    yield pb.DiagnoseEvent(snapshot=pb.DiagnoseSnapshot(
                        step=step.step, co_score=step.co_score,
                        heatmap=tensor_to_proto(step.heatmap)))
                else:
                    assert event.options is not None
                    yield pb.DiagnoseEvent(result=pb.DiagnoseResult(
                        reached_target=step.reached_target, steps=step.step,
                        final_co=step.co_score, seconds=step.seconds,
                        heatmap=tensor_to_proto(step.heatmap),
                        prediction_before=prediction_message(event.logits_before, names),
                        prediction_after=prediction_message(event.logits_after, names),
                        target_class=event.options.target_class,
                        target_co=event.options.target_co, image=tensor_to_proto(image)))

    @rpc_method
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext,
                     request_id: str) -> pb.ModelInfo:
        plane = self.plane
        plane.ensure_ready(warm=False)  # the description is valid before the warm-up
        info = model_info(self.engine.bundle, self.engine.default_methods,
                          self.engine.calibration, self.engine.method_report)
        live = plane.live
        info.torch_threads = plane.thread_choice.threads
        info.torch_threads_choice = plane.thread_choice.describe()
        info.max_batch_items = plane.max_batch_items
        info.max_message_bytes = plane.max_message_bytes
        info.feedback.CopyFrom(pb.FeedbackInfo(
            enabled=live.enabled, max_items=live.max_items,
            max_age_seconds=live.max_age_seconds,
            signing_key_id=live.book.keys.signing_key_id if live.book else ""))
        return info


@dataclass
class ServerParts:
    """A built (not yet started) server and what the lifecycle and tests reach for."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    plane: DataPlane
    metrics: Metrics
    interceptor: MetricsInterceptor
    certificates: CertificateFiles | None = None
    """TLS certificate files (reloaded when they change); None without TLS."""


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Return the grpc server's channel arguments: message limits, connection age."""
    server = settings.server
    options = [("grpc.max_receive_message_length", server.max_message_bytes),
               ("grpc.max_send_message_length", server.max_message_bytes)]
    if server.max_connection_age_seconds > 0:
        options += [("grpc.max_connection_age_ms",
                     max(1, round(server.max_connection_age_seconds * 1000))),
                    ("grpc.max_connection_age_grace_ms",
                     round(server.max_connection_age_grace_seconds * 1000))]
    return options


def build_server(settings: Settings, engine: Engine,
                 registry: CollectorRegistry | None = None) -> ServerParts:
    """Return the server's parts, bound to its port and not started yet.

    Health starts NOT_SERVING; `start_serving` flips it after the warm-up. Metrics go to
    `registry` (a fresh one when None).
    """
    registry = registry if registry is not None else CollectorRegistry()
    bundle = engine.bundle
    metrics = Metrics(registry, model=bundle.name, class_names=bundle.class_names,
                      max_class_labels=settings.metrics.max_class_labels)
    calibration_id = engine.calibration.calibration_id if engine.calibration else ""
    metrics.set_model(bundle.version, bundle.fingerprint, calibration_id)
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
        options=server_options(settings),
    )
    plane = DataPlane(engine, settings, metrics)
    registry.register(EngineCollector(engine, plane.batcher, bundle.name))
    registry.register(LiveQualityCollector(plane.live, bundle.name))
    pb_grpc.add_ConfidenceServiceServicer_to_server(ConfidenceServicer(plane), server)
    openinference.add_to_server(plane, server)  # the Open Inference Protocol, same port
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
    certificates = None
    if tls.enabled:
        assert tls.cert_file is not None and tls.key_file is not None
        certificates = CertificateFiles(tls.cert_file, tls.key_file, tls.client_ca_file)
        port = server.add_secure_port(address, certificates.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind {address}", field="server.port")
    return ServerParts(server, port, health_servicer, plane, metrics, interceptor,
                       certificates)


def start_serving(parts: ServerParts, settings: Settings | None = None,
                  choice: ThreadChoice | None = None) -> None:
    """Start the server, warm the engine up, pick the torch threads (when `settings` are
    given; see startup.py), then report SERVING. A `choice` made before (the engine warmed
    up before the port was bound) skips the warm-up."""
    engine = parts.plane.engine
    parts.server.start()
    if choice is None:
        warm = engine.warm_up(ready=settings is None)
        if settings is not None:
            choice = choose_torch_threads(settings, engine, warm)
    if choice is not None:
        parts.plane.thread_choice = choice
        parts.metrics.torch_threads.labels(parts.metrics.model, choice.source).set(
            choice.threads)
        engine.ready = True
    for name in ("", SERVICE_NAME):
        parts.health.set(name, health_pb2.HealthCheckResponse.SERVING)


QUIET_SECONDS = 0.5


def drain(parts: ServerParts, grace: float) -> None:
    """Shut down gracefully: NOT_SERVING at once, new RPCs UNAVAILABLE, in-flight RPCs get
    up to `grace` seconds to finish, then the server stops (cancelling what is left)."""
    log.info("draining", extra={"grace_seconds": grace})
    parts.health.enter_graceful_shutdown()
    parts.plane.draining = True
    interceptor = parts.interceptor
    deadline = time.monotonic() + grace
    # Stop only once nothing runs and no RPC arrived for QUIET_SECONDS: RPCs that reach the
    # transport while it closes would get CANCELLED instead of our UNAVAILABLE.
    while time.monotonic() < deadline and (
            interceptor.active or time.monotonic() - interceptor.last_start < QUIET_SECONDS):
        time.sleep(0.02)
    parts.server.stop(max(deadline - time.monotonic(), 1.0)).wait()


def serve(settings: Settings, on_ready: Callable[[int], None] | None = None,
          warm_first: bool = False) -> int:
    """Run one server process until SIGTERM or SIGINT; return the exit code (several
    processes: workers.launch chooses, and its workers call this). `on_ready(metrics port)`
    is called once the server is SERVING. `warm_first` warms the engine up and picks its
    threads before binding the port (a worker sharing the port must not receive
    connections it cannot answer yet)."""
    from .app import build_engine

    configure_torch(settings)
    engine = build_engine(settings)
    choice = None
    if warm_first:
        choice = choose_torch_threads(settings, engine, engine.warm_up(ready=False))
    parts = build_server(settings, engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics_http = None
    if settings.metrics.enabled:
        metrics_http, _ = start_http_server(settings.metrics.port, settings.metrics.host,
                                            registry=parts.metrics.registry)
        log.info("metrics", extra={"address": f"{settings.metrics.host}:"
                                              f"{metrics_http.server_port}"})
    start_serving(parts, settings, choice)
    log.info("serving", extra={"address": f"{settings.server.host}:{parts.port}",
                               "model": engine.bundle.name})
    if on_ready is not None:
        on_ready(metrics_http.server_port if metrics_http is not None else 0)
    stop.wait()
    drain(parts, settings.server.grace_seconds)
    parts.plane.close()
    if metrics_http is not None:  # last, so the drain itself is visible to Prometheus
        metrics_http.shutdown()
        metrics_http.server_close()
    log.info("stopped")
    return 0
