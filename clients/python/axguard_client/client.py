"""The Python client: a context manager around a gRPC channel, a deadline on every call.

The channel balances over every address of its target and retries what is safe to repeat
(channel.py); images may be files, bytes or pixels in memory (inputs.py). `AxguardClient`
blocks, `AsyncAxguardClient` (aio.py) is its asyncio twin; both build their requests here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import DEFAULT_RETRY, ChannelSettings, RetryPolicy
from .errors import from_rpc_error
from .inputs import ModelInput, is_in_memory, to_image
from .v1 import confidence_pb2 as pb
from .v1 import confidence_pb2_grpc as pb_grpc

# Encoded bytes, a file path, a PIL image, a numpy array or a torch tensor (inputs.py).
ImageLike = Any


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
    model: ModelInput | None = None,
    name: str = "image",
    methods: Sequence[str | int] = (),
    ax_processes: Sequence[str | int] = (),
    label: int | None = None,
    return_heatmaps: bool = False,
    prediction_only: bool = False,
    verdict_only: bool = False,
    request_id: str = "",
) -> pb.CheckRequest:
    """Return a CheckRequest for an image: encoded bytes, a file path, a PIL image, a numpy
    array or a torch tensor (inputs.py; `model` lets an array go as a raw tensor, `name`
    is the argument errors name).

    `verdict_only`: the prediction and the verdict, without CO scores (the cheapest
    verdict); `prediction_only`: the prediction alone.
    """
    request = pb.CheckRequest(
        request_id=request_id,
        image=to_image(image, model, name),
        methods=[method_value(m) for m in methods],
        ax_processes=[ax_process_value(p) for p in ax_processes],
        return_heatmaps=return_heatmaps,
        prediction_only=prediction_only,
        verdict_only=verdict_only,
    )
    if label is not None:
        request.label = label
    return request


# Room left in a CheckBatch message for its framing when splitting by size.
BATCH_FRAMING_BYTES = 16 * 1024


def split_batch(requests: list[pb.CheckRequest], max_items: int, max_bytes: int
                ) -> list[list[pb.CheckRequest]]:
    """Split checks into consecutive CheckBatch calls of at most `max_items` requests and
    `max_bytes` bytes each (0: no limit); a request too large alone goes alone, for the
    server to refuse by name."""
    chunks: list[list[pb.CheckRequest]] = []
    current: list[pb.CheckRequest] = []
    size = BATCH_FRAMING_BYTES
    for request in requests:
        item = request.ByteSize() + 8  # field tag and length
        if current and ((max_items and len(current) >= max_items)
                        or (max_bytes and size + item > max_bytes)):
            chunks.append(current)
            current, size = [], BATCH_FRAMING_BYTES
        current.append(request)
        size += item
    if current:
        chunks.append(current)
    return chunks


def diagnose_request(image: ImageLike, model: ModelInput | None, *,
                     target_class: int | None, target_co: float | None, max_steps: int,
                     learning_rate: float | None, similarity_weight: float | None,
                     snapshot_every: int, request_id: str) -> pb.DiagnoseRequest:
    """Return a DiagnoseRequest (the image as for build_check_request)."""
    request = pb.DiagnoseRequest(request_id=request_id, image=to_image(image, model),
                                 max_steps=max_steps, snapshot_every=snapshot_every)
    for name, value in (("target_class", target_class), ("target_co", target_co),
                        ("learning_rate", learning_rate),
                        ("similarity_weight", similarity_weight)):
        if value is not None:
            setattr(request, name, value)
    return request


def feedback_request(labels: Iterable[tuple[str, int]]) -> pb.FeedbackRequest:
    return pb.FeedbackRequest(items=[pb.LabelFeedback(receipt=r, label=int(lbl))
                                     for r, lbl in labels])


class ClientBase:
    """What the blocking and the asyncio client share: settings, deadlines, the model's
    input (fetched once, when pixels in memory or a batch first need it), request
    building."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None,
                 token: str | None = None, load_balancing: str = "round_robin",
                 retry: RetryPolicy | None = DEFAULT_RETRY, wait_for_ready: bool = False,
                 channel_options: list[tuple[str, Any]] | None = None) -> None:
        """Open a channel to `target`: "host:port", "ipv4:a:p,b:p" or "dns:///name:port"
        (a headless Service: every replica).

        - `load_balancing`: "round_robin" spreads calls over every address (replicas that
          report NOT_SERVING are skipped); "pick_first" keeps to one.
        - `retry`: the policy for Check, CheckBatch, GetModelInfo and Feedback on
          UNAVAILABLE and RESOURCE_EXHAUSTED (channel.RetryPolicy); None: no retries.
        - `wait_for_ready`: calls wait (within their deadline) for a replica to come up
          instead of failing at once with UNAVAILABLE; also per call.
        - TLS when any tls_* is given (`tls_ca` verifies the server, `tls_cert` +
          `tls_key` present a client certificate, `tls_server_name` overrides the name
          checked); `token`: sent as `authorization: Bearer <token>` with every call.
        - `channel_options`: extra grpc channel arguments, which win over ours.
        """
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.settings = ChannelSettings(
            target, max_message_bytes=max_message_bytes, tls_ca=tls_ca, tls_cert=tls_cert,
            tls_key=tls_key, tls_server_name=tls_server_name, token=token,
            load_balancing=load_balancing, retry=retry,
            channel_options=tuple(channel_options or ()))
        self._info: pb.ModelInfo | None = None
        self._connect()

    def _connect(self) -> None:
        """Open the channel (the sync and the asyncio client each their own kind)."""
        raise NotImplementedError

    def _call_options(self, timeout: float | None, wait_for_ready: bool | None
                      ) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout,
                "metadata": self.settings.metadata or None,
                "wait_for_ready": self.wait_for_ready if wait_for_ready is None
                else wait_for_ready}

    @property
    def _model_input(self) -> ModelInput | None:
        return ModelInput.of(self._info) if self._info is not None else None

    def _check_request(self, image: ImageLike | pb.CheckRequest, name: str,
                       options: dict[str, Any]) -> pb.CheckRequest:
        if isinstance(image, pb.CheckRequest):
            return image
        return build_check_request(image, model=self._model_input, name=name, **options)

    def _batch_chunks(self, images: Iterable[ImageLike | pb.CheckRequest],
                      options: dict[str, Any]) -> list[list[pb.CheckRequest]]:
        requests = [self._check_request(image, f"images[{i}]", options)
                    for i, image in enumerate(images)]
        if not requests:
            return [[]]  # the server refuses it, naming the field
        info = self._info
        assert info is not None
        max_bytes = min(info.max_message_bytes or self.settings.max_message_bytes,
                        self.settings.max_message_bytes)
        return split_batch(requests, info.max_batch_items, max_bytes)


class AxguardClient(ClientBase):
    """A connection to an axguard server, or to every replica of one.

    >>> with AxguardClient("localhost:50051") as client:
    ...     response = client.check("digit.png")
    """

    def _connect(self) -> None:
        self._channel = self._open(plain=False)
        self._plain: grpc.Channel | None = None
        self._stub = pb_grpc.ConfidenceServiceStub(self._channel)

    def _open(self, *, plain: bool) -> grpc.Channel:
        settings, credentials = self.settings, self.settings.credentials()
        options = settings.options(plain=plain)
        if credentials is None:
            return grpc.insecure_channel(settings.target, options=options)
        return grpc.secure_channel(settings.target, credentials, options=options)

    def __enter__(self) -> AxguardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels."""
        self._channel.close()
        if self._plain is not None:
            self._plain.close()

    def _call(self, rpc: Any, request: Any, timeout: float | None,
              wait_for_ready: bool | None = None) -> Any:
        try:
            return rpc(request, **self._call_options(timeout, wait_for_ready))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def check(self, image: ImageLike | pb.CheckRequest, *, timeout: float | None = None,
              wait_for_ready: bool | None = None, **options: Any) -> pb.CheckResponse:
        """Return the CheckResponse for an image: a file path, encoded bytes, a PIL image, a
        numpy array or torch tensor (C×H×W or H×W×C, uint8 or float in [0, 1]), or a ready
        CheckRequest.

        Options: methods, ax_processes, label, return_heatmaps, prediction_only,
        verdict_only, request_id.
        """
        if self._info is None and is_in_memory(image):
            self.model_info(timeout=timeout)
        return self._call(self._stub.Check, self._check_request(image, "image", options),
                          timeout, wait_for_ready)

    def check_batch(self, images: Iterable[ImageLike | pb.CheckRequest], *,
                    timeout: float | None = None, wait_for_ready: bool | None = None,
                    **options: Any) -> list[pb.CheckResponse]:
        """Return one CheckResponse per image, in order; failed items carry `error`.

        A list longer than the server's batch limit (or its message limit) goes as several
        CheckBatch calls, one after another, each with the full `timeout`.
        """
        if self._info is None:
            self.model_info(timeout=timeout)
        responses: list[pb.CheckResponse] = []
        for chunk in self._batch_chunks(images, options):
            answer = self._call(self._stub.CheckBatch, pb.CheckBatchRequest(requests=chunk),
                                timeout, wait_for_ready)
            responses.extend(answer.responses)
        return responses

    def diagnose(self, image: ImageLike, *, target_class: int | None = None,
                 target_co: float | None = None, max_steps: int = 0,
                 learning_rate: float | None = None, similarity_weight: float | None = None,
                 snapshot_every: int = 0, request_id: str = "",
                 timeout: float | None = None, wait_for_ready: bool | None = None
                 ) -> Iterator[pb.DiagnoseEvent]:
        """Yield the Diagnose stream's events (Progress per step, Snapshots, final Result).

        The deadline covers the whole stream; closing the iterator cancels the diagnosis.
        A stream is never retried.
        """
        if self._info is None and is_in_memory(image):
            self.model_info(timeout=timeout)
        request = diagnose_request(
            image, self._model_input, target_class=target_class, target_co=target_co,
            max_steps=max_steps, learning_rate=learning_rate,
            similarity_weight=similarity_weight, snapshot_every=snapshot_every,
            request_id=request_id)
        call = self._stub.Diagnose(request, **self._call_options(timeout, wait_for_ready))
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def feedback(self, labels: Iterable[tuple[str, int]], *, timeout: float | None = None,
                 wait_for_ready: bool | None = None) -> pb.FeedbackResponse:
        """Send true labels as (receipt, label) pairs, the receipt from each check's
        response; return the FeedbackResponse (one result per pair: counted, duplicate or
        an error naming `items[i].<field>`)."""
        return self._call(self._stub.Feedback, feedback_request(labels), timeout,
                          wait_for_ready)

    def model_info(self, *, timeout: float | None = None,
                   wait_for_ready: bool | None = None) -> pb.ModelInfo:
        """Return the server's ModelInfo (and keep it: it tells how to send arrays and how
        to split batches)."""
        info = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout,
                          wait_for_ready)
        self._info = info
        return info

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Return the health status name ("SERVING", "NOT_SERVING", ...) of one replica of
        the target (asked on a plain channel: the balanced one skips replicas that are not
        serving)."""
        if self._plain is None:
            self._plain = self._open(plain=True)
        stub = health_pb2_grpc.HealthStub(self._plain)
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service),
                              timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
