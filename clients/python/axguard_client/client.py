"""The Python client: a context manager around a gRPC channel, a deadline on every call."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import from_rpc_error
from .v1 import confidence_pb2 as pb
from .v1 import confidence_pb2_grpc as pb_grpc

ImageLike = bytes | str | Path


def method_value(method: str | int) -> int:
    """Return the AttributionMethod value for "saliency", "SALIENCY" or an enum value."""
    if isinstance(method, int):
        return method
    return pb.AttributionMethod.Value("ATTRIBUTION_METHOD_" + method.upper())


def method_name(value: int) -> str:
    """Return the short name ("saliency") of an AttributionMethod value."""
    return pb.AttributionMethod.Name(value).removeprefix("ATTRIBUTION_METHOD_").lower()


def ax_process_value(process: str | int) -> int:
    """Return the AxProcess value for "sum", "PRODUCT" or an enum value."""
    if isinstance(process, int):
        return process
    return pb.AxProcess.Value("AX_PROCESS_" + process.upper())


def ax_process_name(value: int) -> str:
    """Return the short name ("sum") of an AxProcess value."""
    return pb.AxProcess.Name(value).removeprefix("AX_PROCESS_").lower()


def build_check_request(
    image: ImageLike,
    *,
    methods: Sequence[str | int] = (),
    ax_processes: Sequence[str | int] = (),
    label: int | None = None,
    return_heatmaps: bool = False,
    prediction_only: bool = False,
    verdict_only: bool = False,
    request_id: str = "",
) -> pb.CheckRequest:
    """Return a CheckRequest for an encoded image (bytes) or an image file path.

    `verdict_only`: the prediction and the verdict, without CO scores (the cheapest
    verdict); `prediction_only`: the prediction alone.
    """
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    request = pb.CheckRequest(
        request_id=request_id,
        image=pb.Image(encoded=data),
        methods=[method_value(m) for m in methods],
        ax_processes=[ax_process_value(p) for p in ax_processes],
        return_heatmaps=return_heatmaps,
        prediction_only=prediction_only,
        verdict_only=verdict_only,
    )
    if label is not None:
        request.label = label
    return request


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready,  # noqa: ANN001
                 compression) -> None:  # noqa: ANN001
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class AxguardClient:
    """A connection to an axguard server.

    >>> with AxguardClient("localhost:50051") as client:
    ...     response = client.check("digit.png")
    """

    def __init__(self, target: str = "localhost:50051", *, timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None,
                 token: str | None = None,
                 channel_options: list[tuple[str, Any]] | None = None) -> None:
        """Open a channel: TLS when any tls_* is given (`tls_ca` verifies the server,
        `tls_cert` + `tls_key` present a client certificate for mutual TLS,
        `tls_server_name` overrides the name checked in the server's certificate), a
        bearer token sent with every call when `token` is given, and extra grpc channel
        arguments (`channel_options`; e.g. ("grpc.use_local_subchannel_pool", 1) gives this
        client its own connection, which a multi-process server needs to spread load)."""
        self.target = target
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   *(channel_options or [])]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if any(v is not None for v in (tls_ca, tls_cert, tls_key, tls_server_name)):
            if (tls_cert is None) != (tls_key is None):
                raise ValueError("a client certificate needs both tls_cert and tls_key")

            def read(path: str | Path | None) -> bytes | None:
                return Path(path).read_bytes() if path is not None else None

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca), private_key=read(tls_key),
                certificate_chain=read(tls_cert))
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if token:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self._channel = channel
        self._stub = pb_grpc.ConfidenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> AxguardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return rpc(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def check(self, image: ImageLike | pb.CheckRequest, *, timeout: float | None = None,
              **options: Any) -> pb.CheckResponse:
        """Return the CheckResponse for an image file, encoded bytes or a ready request.

        Options: methods, ax_processes, label, return_heatmaps, prediction_only,
        verdict_only, request_id.
        """
        request = image if isinstance(image, pb.CheckRequest) else build_check_request(
            image, **options)
        return self._call(self._stub.Check, request, timeout)

    def check_batch(self, images: Iterable[ImageLike | pb.CheckRequest], *,
                    timeout: float | None = None, **options: Any) -> list[pb.CheckResponse]:
        """Return one CheckResponse per image, in order; failed items carry `error`."""
        requests = [
            img if isinstance(img, pb.CheckRequest) else build_check_request(img, **options)
            for img in images
        ]
        response = self._call(self._stub.CheckBatch, pb.CheckBatchRequest(requests=requests),
                              timeout)
        return list(response.responses)

    def diagnose(self, image: ImageLike, *, target_class: int | None = None,
                 target_co: float | None = None, max_steps: int = 0,
                 learning_rate: float | None = None, similarity_weight: float | None = None,
                 snapshot_every: int = 0, request_id: str = "",
                 timeout: float | None = None) -> Iterator[pb.DiagnoseEvent]:
        """Yield the Diagnose stream's events (Progress per step, Snapshots, final Result).

        The deadline covers the whole stream; closing the iterator cancels the diagnosis.
        """
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        request = pb.DiagnoseRequest(request_id=request_id, image=pb.Image(encoded=data),
                                     max_steps=max_steps, snapshot_every=snapshot_every)
        for name, value in (("target_class", target_class), ("target_co", target_co),
                            ("learning_rate", learning_rate),
                            ("similarity_weight", similarity_weight)):
            if value is not None:
                setattr(request, name, value)
        call = self._stub.Diagnose(request, timeout=self.timeout if timeout is None else timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def feedback(self, labels: Iterable[tuple[str, int]], *, timeout: float | None = None
                 ) -> pb.FeedbackResponse:
        """Send true labels as (receipt, label) pairs, the receipt from each check's
        response; return the FeedbackResponse (one result per pair: counted, duplicate or
        an error naming `items[i].<field>`)."""
        request = pb.FeedbackRequest(items=[pb.LabelFeedback(receipt=r, label=int(lbl))
                                            for r, lbl in labels])
        return self._call(self._stub.Feedback, request, timeout)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        """Return the server's ModelInfo."""
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Return the health status name ("SERVING", "NOT_SERVING", ...)."""
        response = self._call(self._health.Check,
                              health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
