"""Errors of the engine, free of any transport.

    AxguardError
    ├── InvalidInput        the caller sent something unusable (names the field)
    │   ├── UnknownMethod   an attribution method that does not exist or this model lacks
    │   └── NonFiniteOutput the model's output for this input is not finite
    ├── InputTooLarge       the input exceeds a configured limit
    ├── Busy                a bounded pool (queue, diagnoses) is full: retry later
    ├── NotReady            the model is not loaded or warmed up yet
    ├── DeadlineExceeded    the caller's deadline passed while the request waited
    ├── FailedPrecondition  the server is not set up for this call (e.g. feedback off)
    ├── NotFound            a named thing (model, version) is not served here
    ├── ConfigError         the server's own configuration is wrong (start-up only)
    └── ModelLoadError      the model or its weights could not be loaded (start-up only)

Only the transport maps them to status codes (transport/status.py, one table).
"""

from __future__ import annotations


class AxguardError(Exception):
    """Base of every error axguard raises on purpose; `field` names the culprit if any."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        """The message, prefixed with the field it concerns."""
        text = str(self)
        return f"{self.field}: {text}" if self.field else text


class InvalidInput(AxguardError):
    """The request holds a value the engine cannot use."""


class InputTooLarge(AxguardError):
    """The request exceeds a size limit (bytes, pixels or items)."""


class UnknownMethod(InvalidInput):
    """An attribution method that is unknown, or unavailable for this model."""


OUTPUT_STAGES = ("logits", "heatmap", "co_score", "verdict")
"""Where a non-finite output can show, in the order a check computes them."""


class NonFiniteOutput(InvalidInput):
    """The served network's output for this input is not finite: its logits, a heatmap, a
    CO score or a verdict feature is NaN or Inf. The input is valid pixels; the item fails
    instead of answering with such numbers (the other items of a batch are answered)."""

    def __init__(self, stage: str, *, field: str | None = "image") -> None:
        super().__init__(f"the model's output for this input is not finite ({stage})",
                         field=field)
        self.stage = stage
        self.index: int | None = None
        """The item's position in its request, where an API answers a batch as a whole."""


class StoreUnavailable(AxguardError):
    """A shared store (the feedback duplicate filter's Redis) cannot be reached: nothing of
    the request was counted that a retry could count again."""


class Busy(AxguardError):
    """No room in a bounded pool right now; `retry_after` (seconds) is the server's guess of
    when there will be, sent to clients as gRPC's retry pushback."""

    def __init__(self, message: str, *, field: str | None = None,
                 retry_after: float = 0.1) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class NotReady(AxguardError):
    """The engine cannot answer yet."""


class DeadlineExceeded(AxguardError):
    """The request's deadline passed before its result was ready."""


class FailedPrecondition(AxguardError):
    """The call cannot work with this server's configuration."""


class NotFound(AxguardError):
    """The request names a model or version this server does not serve."""


class ConfigError(AxguardError):
    """The server's configuration is inconsistent."""


class ModelLoadError(AxguardError):
    """The model, its weights or its class names could not be loaded."""


def field_within(part: str, field: str | None) -> str:
    """Name `field` inside the request part `part`: ("requests[2]", "image") →
    "requests[2].image"; no field → the part itself. The one way errors get prefixed."""
    return f"{part}.{field}" if field else part
