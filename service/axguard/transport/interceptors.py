"""gRPC server interceptors: every RPC counted by method and status code, timed, tracked
while in flight; request bytes that do not parse refused with INVALID_ARGUMENT."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..serving.metrics import Metrics

log = logging.getLogger("axguard.server")

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


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
        self.metrics.inflight_now.inc()

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
        metrics = self.metrics
        metrics.child(metrics.rpcs, method, code.name).inc()
        metrics.child(metrics.rpc_duration, method).observe(time.perf_counter() - start)
        metrics.inflight_now.dec()
        with self._lock:
            self._active -= 1

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        if details.method == HEALTH_WATCH:
            # A subscription open for the connection's life (clients' health checking), not
            # a request: counting it in flight would hold every drain to its full grace.
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
