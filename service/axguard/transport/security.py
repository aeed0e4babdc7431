"""Transport security: TLS / mutual TLS with certificates reloaded on change, and optional
bearer tokens. The gRPC-specific half of it lives here, beside the server.

Certificates: grpc's dynamic server credentials ask `CertificateFiles.fetch` at every new
handshake; it returns a new configuration only when a file's modification time or size
changed (cert-manager rewrites mounted Secrets in place), so rotation needs no restart.

Tokens: one per line in `server.auth.token_file` (a mounted Secret), reread when the file
changes; compared in constant time (hmac.compare_digest); never logged. Health stays open
for probes.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from ..errors import ConfigError

log = logging.getLogger(__name__)

# Probes answer without a token: gRPC health and the Open Inference Protocol's server
# liveness and readiness (they reveal nothing but up/down).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                "/inference.GRPCInferenceService/ServerReady")
"""Methods that need no token: Kubernetes probes and load balancers call them."""


def _stamp(paths: list[Path]) -> tuple:
    return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


class CertificateFiles:
    """The server's certificate, key and optional client CA, reloaded when they change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.paths = [Path(cert_file), Path(key_file)]
        if client_ca_file is not None:
            self.paths.append(Path(client_ca_file))
        self.require_client_auth = client_ca_file is not None
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self.reloads = 0
        self.initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            stamp = _stamp(self.paths)
            cert, key = (p.read_bytes() for p in self.paths[:2])
            ca = self.paths[2].read_bytes() if self.require_client_auth else None
        except OSError as err:
            raise ConfigError(f"cannot read {err.filename}: {err.strerror}",
                              field="server.tls") from err
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration when the files changed, else None (keep the old)."""
        with self._lock:
            try:
                if _stamp(self.paths) == self._stamp:
                    return None
                config = self._load()
            except (OSError, ConfigError) as err:  # mid-rotation: keep serving the old one
                log.warning("tls_reload_failed", extra={"error": str(err)})
                return None
            self.reloads += 1
            log.info("tls_reloaded", extra={"reloads": self.reloads})
            return config

    def credentials(self) -> grpc.ServerCredentials:
        """Return server credentials that pick up rotated files at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.require_client_auth)


class TokenFile:
    """Bearer tokens, one per line (blank lines and # comments ignored), reread on change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._tokens: list[bytes] = []
        self._reload()
        if not self._tokens:
            raise ConfigError(f"{self.path} holds no token", field="server.auth.token_file")

    def _reload(self) -> None:
        try:
            stamp = _stamp([self.path])
            if stamp == self._stamp:
                return
            lines = self.path.read_text().splitlines()
        except OSError as err:
            if not self._stamp:
                raise ConfigError(f"cannot read {self.path}: {err.strerror}",
                                  field="server.auth.token_file") from err
            log.warning("token_reload_failed", extra={"error": err.strerror})
            return
        self._tokens = [ln.strip().encode() for ln in lines
                        if ln.strip() and not ln.strip().startswith("#")]
        self._stamp = stamp

    def accepts(self, token: str) -> bool:
        """Return True when `token` is one of the file's tokens (constant-time compare)."""
        with self._lock:
            self._reload()
            tokens = self._tokens
        given = token.encode()
        # Compare with every token so the time does not tell which one nearly matched.
        return any([hmac.compare_digest(given, t) for t in tokens])  # noqa: C419


def bearer_token(metadata: Any) -> str | None:
    """Return the token of an `authorization: Bearer …` header, else None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC but health without a valid bearer token: UNAUTHENTICATED."""

    def __init__(self, tokens: TokenFile, on_refused: Callable[[str], None]) -> None:
        self.tokens = tokens
        self.on_refused = on_refused

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        if method.startswith(OPEN_METHODS):
            return continuation(details)
        token = bearer_token(details.invocation_metadata)
        if token is not None and self.tokens.accepts(token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        reason = "missing" if token is None else "invalid"
        self.on_refused(method.rsplit("/", 1)[-1])
        log.info("rpc_unauthenticated", extra={"rpc": method, "reason": reason})
        message = (f"authorization: {reason} bearer token; send the metadata "
                   "'authorization: Bearer <token>'")

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kind = ("unary_unary" if handler.unary_unary else "unary_stream"
                if handler.unary_stream else "stream_unary" if handler.stream_unary
                else "stream_stream")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
