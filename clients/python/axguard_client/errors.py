"""Typed client errors, one per gRPC status a caller handles differently.

    ClientError
    ├── InvalidArgument     bad input: fix the request (message names the field)
    ├── ResourceExhausted   too large, or the server is full: back off and retry
    ├── Unavailable         not ready or shutting down: retry elsewhere or later
    ├── DeadlineExceeded    the call took longer than its timeout
    ├── Unauthenticated     missing or invalid bearer token
    ├── FailedPrecondition  the server is not set up for the call (e.g. feedback is off)
    └── ServerError         INTERNAL and anything else: report with the request id
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A failed axguard call; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(ClientError):
    """The server refused the request's content."""


class ResourceExhausted(ClientError):
    """The request was too large or the server had no room for it.

    `retry_after`: seconds the server suggested waiting (it was full; the client's retry
    policy already waited that long between its attempts), None when the request itself is
    over a limit and retrying cannot help."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 retry_after: float | None = None) -> None:
        super().__init__(code, details)
        self.retry_after = retry_after


class Unavailable(ClientError):
    """The server is not ready, shutting down, or unreachable."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed."""


class Unauthenticated(ClientError):
    """The server wants a valid `authorization: Bearer <token>` (see `token=`)."""


class FailedPrecondition(ClientError):
    """The server is not configured for this call (e.g. Feedback without a receipt key)."""


class ServerError(ClientError):
    """The server failed (INTERNAL) or answered with another status."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_after(error: grpc.RpcError) -> float | None:
    """The server's retry pushback in seconds; None when absent or "do not retry"."""
    trailers = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in trailers:
        if key == PUSHBACK_KEY:
            try:
                milliseconds = int(value)
            except ValueError:
                return None
            return milliseconds / 1000 if milliseconds >= 0 else None
    return None


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    """Return the typed error for a grpc.RpcError (or grpc.aio.AioRpcError) of a call."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(code, details, retry_after(error))
    return _BY_CODE.get(code, ServerError)(code, details)
