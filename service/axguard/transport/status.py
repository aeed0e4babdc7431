"""gRPC status mapping and the wrappers every servicer method goes through (both APIs:
axguard.v1 and the Open Inference Protocol): a request id, engine errors → status codes by
one table, anything unexpected → INTERNAL with a generic message (detail in the log)."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ..errors import (
    AxguardError,
    Busy,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InputTooLarge,
    InvalidInput,
    ModelLoadError,
    NotFound,
    NotReady,
    StoreUnavailable,
)

log = logging.getLogger("axguard.server")

# Engine error → gRPC status. The most specific class wins (checked in MRO order).
STATUS_BY_ERROR: dict[type[AxguardError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    InputTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Busy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ConfigError: grpc.StatusCode.INTERNAL,
    ModelLoadError: grpc.StatusCode.INTERNAL,
    AxguardError: grpc.StatusCode.INTERNAL,
}


def status_for(error: AxguardError) -> grpc.StatusCode:
    """Return the status code of an engine error."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def request_id_of(request: Any) -> str:
    """Return the caller's request id (axguard.v1 `request_id`, the Open Inference
    Protocol's `id`), or a fresh one."""
    return (getattr(request, "request_id", "") or getattr(request, "id", "")
            or uuid.uuid4().hex)


# gRPC's retry pushback trailer (gRFC A6): a client's retry policy waits that many
# milliseconds before its next attempt, and does not retry at all on a negative value.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_pushback(error: Exception) -> str | None:
    """Return the pushback a RESOURCE_EXHAUSTED error tells retrying clients: the delay a
    full pool suggests (Busy), "-1" for a request over a limit (a retry fails again), None
    for other errors."""
    if isinstance(error, Busy):
        return str(max(1, round(error.retry_after * 1000)))
    if isinstance(error, InputTooLarge):
        return "-1"
    return None


def _failure(rpc: str, request_id: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """Return the status and client message for an error; log it with the request id."""
    if isinstance(error, AxguardError):
        code = status_for(error)
        log.info("rpc_rejected", extra={"rpc": rpc, "request_id": request_id,
                                        "code": code.name, "reason": error.message})
        return code, error.message
    log.error("rpc_failed", exc_info=error, extra={"rpc": rpc, "request_id": request_id})
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"


def _abort(context: grpc.ServicerContext, rpc: str, request_id: str, error: Exception) -> None:
    """End the call with the error's status and message (and its retry pushback)."""
    code, message = _failure(rpc, request_id, error)
    pushback = retry_pushback(error)
    if pushback is not None:
        context.set_trailing_metadata(((PUSHBACK_KEY, pushback),))
    context.abort(code, message)


def rpc_method(func: F) -> F:
    """Wrap a unary servicer method: request id, error → status, no stack trace to clients."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = request_id_of(request)
        try:
            return func(self, request, context, request_id)
        except Exception as err:  # noqa: BLE001  (mapped, logged, never leaked)
            _abort(context, func.__name__, request_id, err)

    wrapper.__axguard_rpc__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def rpc_stream_method(func: F) -> F:
    """`rpc_method` for server-streaming methods (generators)."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = request_id_of(request)
        try:
            yield from func(self, request, context, request_id)
        except Exception as err:  # noqa: BLE001  (mapped, logged, never leaked)
            _abort(context, func.__name__, request_id, err)

    wrapper.__axguard_rpc__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


