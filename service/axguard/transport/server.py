"""The gRPC server: both protocols' servicers over one data plane, health, reflection, and
the lifecycle (build, warm up and start serving, drain, serve one process).

Each RPC method converts its request (v1/converters.py, oip/converters.py), calls one
data-plane method (serving/dataplane.py) and converts the answer back. Every RPC goes
through `rpc_method` (status.py): engine errors become status codes by one table, anything
unexpected INTERNAL with a generic message (the detail goes to the log with the request id).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from ..config import Settings
from ..engine.core import Engine
from ..errors import ConfigError
from ..flag.artifact import CalibrationArtifact
from ..serving.dataplane import DataPlane
from ..serving.metrics import EngineCollector, LiveQualityCollector, Metrics
from ..serving.reload import CalibrationWatcher
from ..serving.threads import ThreadChoice, usable_cores
from .engines import (
    EngineProcesses,
    ProcessChoice,
    available_memory_bytes,
    engine_process_count,
    engine_threads,
    model_bytes,
    resident_bytes,
)
from .interceptors import MetricsInterceptor
from .oip import servicer as openinference
from .security import CertificateFiles, TokenFile, TokenInterceptor
from .torch_threads import choose_torch_threads, configure_torch
from .v1 import confidence_pb2_grpc as pb_grpc
from .v1.servicer import SERVICE_NAME, ConfidenceServicer

log = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "ConfidenceServicer", "HealthServicer", "ServerParts",
           "build_server", "drain", "serve", "start_serving", "watch_calibration"]


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 (Check and a non-blocking Watch) whose stream close callbacks never
    wait for a lock that is held while sending.

    grpcio-health-checking 1.85's servicer sends every Watch response (the first one and
    each status change) under its one lock, and a send waits for gRPC's completion thread;
    that thread runs the close callback of a stream whose client just left, which takes the
    same lock. A client arriving while another leaves, or two watchers leaving on
    NOT_SERVING during a drain, deadlocked the health service for good: new health-checking
    clients never became ready and SIGTERM hung until SIGKILL
    (tests/transport/test_server.py reproduces both). Here `_status_lock` orders status
    changes and their sends (a watcher never ends on a stale status), and the close
    callback takes only `_watchers_lock`, which no send is made under. A stream that ended
    before its close callback was registered is forgotten at once (the stock servicer kept
    sending to it forever).
    """

    def __init__(self) -> None:
        self._status_lock = threading.RLock()
        self._watchers_lock = threading.Lock()
        self._status = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[Callable]] = {}
        self._shutting_down = False

    def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self._status_lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
              context: grpc.ServicerContext,
              send_response_callback: Callable | None = None) -> None:
        assert send_response_callback is not None, "Watch runs non-blocking"
        service = request.service
        with self._status_lock:
            status = self._status.get(service,
                                      health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            send_response_callback(health_pb2.HealthCheckResponse(status=status))
            with self._watchers_lock:
                self._watchers.setdefault(service, set()).add(send_response_callback)

        def closed() -> None:  # on gRPC's completion thread: never the status lock
            with self._watchers_lock:
                self._watchers.get(service, set()).discard(send_response_callback)

        if not context.add_callback(closed):
            closed()  # the client left before the callback was set: gRPC will not call it

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]
    Watch.experimental_thread_pool = None  # type: ignore[attr-defined]

    def watcher_count(self, service: str = "") -> int:
        """How many Watch streams are open for `service`."""
        with self._watchers_lock:
            return len(self._watchers.get(service, ()))

    def set(self, service: str, status: int) -> None:
        """Set a service's status and send it to its watchers (ignored once shutting down)."""
        with self._status_lock:
            if self._shutting_down:
                return
            self._set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """Set every service NOT_SERVING for good (later `set` calls are ignored)."""
        with self._status_lock:
            if self._shutting_down:
                return
            for service in list(self._status):
                self._set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._shutting_down = True

    def _set(self, service: str, status: int) -> None:
        self._status[service] = status
        with self._watchers_lock:
            watchers = list(self._watchers.get(service, ()))
        response = health_pb2.HealthCheckResponse(status=status)
        for send in watchers:
            send(response)


@dataclass
class ServerParts:
    """A built (not yet started) server and what the lifecycle and tests reach for."""

    server: grpc.Server
    port: int
    health: HealthServicer
    plane: DataPlane
    metrics: Metrics
    interceptor: MetricsInterceptor
    engine_collector: EngineCollector
    certificates: CertificateFiles | None = None
    """TLS certificate files (reloaded when they change); None without TLS."""
    engines: EngineProcesses | None = None
    """Extra engine processes taking batches from the batcher (start_serving)."""
    process_choice: ProcessChoice | None = None


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
    engine_collector = EngineCollector(engine, plane.batcher, bundle.name)
    registry.register(engine_collector)
    registry.register(LiveQualityCollector(plane.live, bundle.name))
    pb_grpc.add_ConfidenceServiceServicer_to_server(ConfidenceServicer(plane), server)
    openinference.add_to_server(plane, server)  # the Open Inference Protocol, same port
    health_servicer = HealthServicer()
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
                       engine_collector, certificates)


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
    if settings is not None and choice is not None:
        start_engine_processes(parts, settings, choice)
    if choice is not None:
        engine.ready = True
    for name in ("", SERVICE_NAME):
        parts.health.set(name, health_pb2.HealthCheckResponse.SERVING)


def start_engine_processes(parts: ServerParts, settings: Settings,
                           choice: ThreadChoice) -> None:
    """Decide how many engine processes serve beside this one (server.engine_processes,
    else engines.engine_process_count) and start them: their runners take every batch, and
    this process's own engine only takes over if they all end."""
    engine = parts.plane.engine
    device = engine.bundle.device
    configured = settings.server.engine_processes
    cores = usable_cores()
    if configured is not None:
        decided = ProcessChoice(configured, "configured")
    else:
        gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        free = available_memory_bytes()
        if free is not None:  # request images may take the memory budget under load
            free = max(0, free - settings.server.memory_budget_mib * 2**20)
        count, why = engine_process_count(cores, choice, device.type, model_bytes(engine),
                                          free, gpu_free, resident_bytes())
        decided = ProcessChoice(count, "measured", why)
    parts.process_choice = decided
    parts.metrics.engine_processes.labels(parts.metrics.model, decided.source).set(
        decided.processes)
    log.info("engine_processes", extra={"processes": decided.processes,
                                        "source": decided.source,
                                        "choice": decided.describe()})
    if decided.processes == 0:
        return
    parts.engines = EngineProcesses(
        settings, decided.processes,
        engine_threads(cores, choice, device.type, decided.processes),
        engine.bundle.memory_format)
    batcher = parts.plane.batcher
    for run in parts.engines.runners():
        batcher.add_runner(run)
    batcher.retire_first_runner()  # this process's engine: only when every other one ended
    parts.engine_collector.remote = parts.engines.counters


def watch_calibration(parts: ServerParts, settings: Settings) -> CalibrationWatcher | None:
    """Watch the served calibration file (serving/reload.py): a valid new one is served by
    this process's engine and, from their next batch, by the engine processes. None when
    no calibration file is served."""
    from ..builder import calibration_path

    path = calibration_path(settings)
    calibration = parts.plane.engine.calibration
    if path is None or calibration is None:
        return None

    def apply(artifact: CalibrationArtifact) -> None:
        parts.plane.use_calibration(artifact)  # validates first (ConfigError)
        if parts.engines is not None:
            parts.engines.use_calibration(artifact)

    return CalibrationWatcher(path, apply, parts.metrics, calibration.calibration_id,
                              settings.calibration_poll_seconds)


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
    processes: launch.launch chooses, and its workers call this). `on_ready(metrics port)`
    is called once the server is SERVING. `warm_first` warms the engine up and picks its
    threads before binding the port (a worker sharing the port must not receive
    connections it cannot answer yet)."""
    from ..builder import build_engine

    configure_torch(settings)
    engine = build_engine(settings)
    choice = None
    if warm_first:
        choice = choose_torch_threads(settings, engine, engine.warm_up(ready=False))
    parts = build_server(settings, engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    watching: list[CalibrationWatcher | None] = [None]

    def hangup(*_: object) -> None:
        """SIGHUP: read the calibration file again at once (installed early: the default
        action would end the server)."""
        if watching[0] is None:
            log.info("sighup_ignored", extra={"reason": "no calibration file is watched yet"})
            return
        threading.Thread(target=watching[0].reload, args=("sighup",), daemon=True).start()

    signal.signal(signal.SIGHUP, hangup)
    metrics_http = None
    if settings.metrics.enabled:
        metrics_http, _ = start_http_server(settings.metrics.port, settings.metrics.host,
                                            registry=parts.metrics.registry)
        log.info("metrics", extra={"address": f"{settings.metrics.host}:"
                                              f"{metrics_http.server_port}"})
    start_serving(parts, settings, choice)
    watcher = watching[0] = watch_calibration(parts, settings)
    log.info("serving", extra={"address": f"{settings.server.host}:{parts.port}",
                               "model": engine.bundle.name})
    if on_ready is not None:
        on_ready(metrics_http.server_port if metrics_http is not None else 0)
    code = 0
    while not stop.wait(0.5):
        if parts.engines is not None and not parts.engines.alive():
            log.error("engine_process_died", extra={"pids": parts.engines.pids})
            code = 1  # NOT_SERVING, drain, exit 1: the supervisor restarts the pod
            break
    if watcher is not None:
        watcher.close()
    drain(parts, settings.server.grace_seconds)
    parts.plane.close()
    if parts.engines is not None:
        parts.engines.close()
    if metrics_http is not None:  # last, so the drain itself is visible to Prometheus
        metrics_http.shutdown()
        metrics_http.server_close()
    log.info("stopped", extra={"exit_code": code})
    return code
