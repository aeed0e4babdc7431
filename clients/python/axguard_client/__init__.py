"""The axguard Python client: `AxguardClient` (blocking), `AsyncAxguardClient` (asyncio),
their typed errors, and helpers over the response messages."""

from .aio import AsyncAxguardClient
from .channel import DEFAULT_RETRY, RetryPolicy
from .client import (
    AxguardClient,
    ax_process_name,
    ax_process_value,
    build_check_request,
    method_name,
    method_value,
    split_batch,
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
from .inputs import ImageError, ModelInput, to_image
from .results import heatmap_array, tensor_array, to_dict

__all__ = [
    "DEFAULT_RETRY",
    "AsyncAxguardClient",
    "AxguardClient",
    "ClientError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ImageError",
    "InvalidArgument",
    "ModelInput",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "ax_process_name",
    "ax_process_value",
    "build_check_request",
    "heatmap_array",
    "method_name",
    "method_value",
    "split_batch",
    "tensor_array",
    "to_dict",
    "to_image",
]
