"""What every axguard channel is opened with, sync or asyncio: the service config (balancing
over every address of the target, health checking, retries that are safe), the channel
arguments, TLS credentials and the bearer token."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "axguard.v1.ConfidenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"

# Safe to send again after UNAVAILABLE or RESOURCE_EXHAUSTED: a refused call did nothing on
# the server, and a repeated Feedback item is counted once by its receipt. Diagnose is a
# stream and is never retried (gRPC's transparent retry still covers a call that never left
# the client).
RETRIED_METHODS = ("Check", "CheckBatch", "GetModelInfo", "Feedback")

# gRPC caps a retry policy at five attempts.
MAX_ATTEMPTS_LIMIT = 5


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for the methods that are safe to repeat (gRFC A6).

    An attempt that fails with a code in `codes` is sent again, to the next replica the
    balancer picks, after a random delay up to initial_backoff × multiplier^n (capped at
    max_backoff), or after the server's `grpc-retry-pushback-ms` trailer when it sends one
    (axguard sends it with RESOURCE_EXHAUSTED: a delay when it is full, -1 for a request over a
    limit, which is then not retried). The call's deadline covers every attempt.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts: must be 2..{MAX_ATTEMPTS_LIMIT} (gRPC's limit); "
                             "pass retry=None for no retries")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("initial_backoff must be > 0 and max_backoff >= initial_backoff")
        if self.backoff_multiplier <= 0:
            raise ValueError("backoff_multiplier: must be > 0")

    def as_json(self) -> dict[str, Any]:
        return {"maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff}s",
                "maxBackoff": f"{self.max_backoff}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.codes)}


DEFAULT_RETRY = RetryPolicy()


def service_config(load_balancing: str = "round_robin",
                   retry: RetryPolicy | None = DEFAULT_RETRY) -> str:
    """Return the channel's service config as JSON.

    `round_robin` opens a connection to every address the target resolves to (an `ipv4:`
    list, or `dns:///` of a headless Service) and spreads calls over them; health checking
    (grpc.health.v1 Watch) takes a replica out of the rotation the moment it reports
    NOT_SERVING (warming up, draining on SIGTERM), before any call is refused there.
    Retries are throttled (gRFC A6): when most recent calls failed, retrying stops until
    calls succeed again, so an outage is not multiplied by the retries.
    """
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}],
                              "healthCheckConfig": {"serviceName": ""}}
    if retry is not None:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": retry.as_json()}]
        config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
    return json.dumps(config)


# The plain channel that health() asks: one replica, no health checking (through a
# health-checked channel a NOT_SERVING replica cannot be asked how it is).
PLAIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})


@dataclass(frozen=True)
class ChannelSettings:
    """How to open a channel to the target; shared by AxguardClient and
    AsyncAxguardClient."""

    target: str
    max_message_bytes: int = 64 * 1024 * 1024
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_server_name: str | None = None
    token: str | None = None
    load_balancing: str = "round_robin"
    retry: RetryPolicy | None = DEFAULT_RETRY
    channel_options: Sequence[tuple[str, Any]] = ()

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")

    @property
    def secure(self) -> bool:
        return any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key,
                                           self.tls_server_name))

    def options(self, *, plain: bool = False) -> list[tuple[str, Any]]:
        """Channel arguments; `channel_options` given by the caller win over ours (a
        caller's own `grpc.service_config` replaces the balancing and retries)."""
        options: dict[str, Any] = {
            "grpc.max_receive_message_length": self.max_message_bytes,
            "grpc.max_send_message_length": self.max_message_bytes,
            # A request is kept for a retry only while it fits this buffer (default 256 KiB,
            # less than one 224x224 RGB tensor).
            "grpc.per_rpc_retry_buffer_size": self.max_message_bytes,
            "grpc.service_config": (PLAIN_SERVICE_CONFIG if plain else
                                    service_config(self.load_balancing, self.retry)),
        }
        if self.tls_server_name:
            options["grpc.ssl_target_name_override"] = self.tls_server_name
        options.update(dict(self.channel_options))
        return list(options.items())

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials (`tls_ca` verifies the server, `tls_cert` + `tls_key` present a
        client certificate), or None for a plaintext channel."""
        if not self.secure:
            return None

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca),
                                            private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
