"""The axguard Python client: `AxguardClient` and its typed errors."""

from .client import (
    AxguardClient,
    ax_process_name,
    ax_process_value,
    build_check_request,
    method_name,
    method_value,
)
from .errors import (
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AxguardClient",
    "ClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "ax_process_name",
    "ax_process_value",
    "build_check_request",
    "method_name",
    "method_value",
]
