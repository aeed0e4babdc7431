"""`AsyncAxguardClient`: the client over grpc.aio, for asyncio pipelines (FastAPI, aiohttp,
Ray Serve's async handlers). The same surface as AxguardClient, every call awaited; the
same channel settings (balancing, health checking, retries, TLS, token) and typed errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client import ClientBase, ImageLike, diagnose_request, feedback_request
from .errors import from_rpc_error
from .inputs import is_in_memory
from .v1 import confidence_pb2 as pb
from .v1 import confidence_pb2_grpc as pb_grpc


class AsyncAxguardClient(ClientBase):
    """An asyncio connection to an axguard server, or to every replica of one. Open it
    inside the running event loop.

    >>> async with AsyncAxguardClient("localhost:50051") as client:
    ...     response = await client.check("digit.png")
    """

    def _connect(self) -> None:
        self._channel = self._open(plain=False)
        self._plain: grpc.aio.Channel | None = None
        self._stub = pb_grpc.ConfidenceServiceStub(self._channel)

    def _open(self, *, plain: bool) -> grpc.aio.Channel:
        settings, credentials = self.settings, self.settings.credentials()
        options = settings.options(plain=plain)
        if credentials is None:
            return grpc.aio.insecure_channel(settings.target, options=options)
        return grpc.aio.secure_channel(settings.target, credentials, options=options)

    async def __aenter__(self) -> AsyncAxguardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels (calls still running are cancelled)."""
        await self._channel.close()
        if self._plain is not None:
            await self._plain.close()

    async def _call(self, rpc: Any, request: Any, timeout: float | None,
                    wait_for_ready: bool | None = None) -> Any:
        try:
            return await rpc(request, **self._call_options(timeout, wait_for_ready))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def check(self, image: ImageLike | pb.CheckRequest, *,
                    timeout: float | None = None, wait_for_ready: bool | None = None,
                    **options: Any) -> pb.CheckResponse:
        """AxguardClient.check, awaited."""
        if self._info is None and is_in_memory(image):
            await self.model_info(timeout=timeout)
        return await self._call(self._stub.Check,
                                self._check_request(image, "image", options), timeout,
                                wait_for_ready)

    async def check_batch(self, images: Iterable[ImageLike | pb.CheckRequest], *,
                          timeout: float | None = None, wait_for_ready: bool | None = None,
                          **options: Any) -> list[pb.CheckResponse]:
        """AxguardClient.check_batch, awaited (the calls of a split list one after
        another)."""
        if self._info is None:
            await self.model_info(timeout=timeout)
        responses: list[pb.CheckResponse] = []
        for chunk in self._batch_chunks(images, options):
            answer = await self._call(self._stub.CheckBatch,
                                      pb.CheckBatchRequest(requests=chunk), timeout,
                                      wait_for_ready)
            responses.extend(answer.responses)
        return responses

    async def diagnose(self, image: ImageLike, *, target_class: int | None = None,
                       target_co: float | None = None, max_steps: int = 0,
                       learning_rate: float | None = None,
                       similarity_weight: float | None = None, snapshot_every: int = 0,
                       request_id: str = "", timeout: float | None = None,
                       wait_for_ready: bool | None = None
                       ) -> AsyncIterator[pb.DiagnoseEvent]:
        """AxguardClient.diagnose as an async iterator (`async for event in ...`); leaving
        the loop early cancels the diagnosis."""
        if self._info is None and is_in_memory(image):
            await self.model_info(timeout=timeout)
        request = diagnose_request(
            image, self._model_input, target_class=target_class, target_co=target_co,
            max_steps=max_steps, learning_rate=learning_rate,
            similarity_weight=similarity_weight, snapshot_every=snapshot_every,
            request_id=request_id)
        call = self._stub.Diagnose(request, **self._call_options(timeout, wait_for_ready))
        try:
            async for event in call:
                yield event
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def feedback(self, labels: Iterable[tuple[str, int]], *,
                       timeout: float | None = None, wait_for_ready: bool | None = None
                       ) -> pb.FeedbackResponse:
        """AxguardClient.feedback, awaited."""
        return await self._call(self._stub.Feedback, feedback_request(labels), timeout,
                                wait_for_ready)

    async def model_info(self, *, timeout: float | None = None,
                         wait_for_ready: bool | None = None) -> pb.ModelInfo:
        """AxguardClient.model_info, awaited."""
        info = await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout,
                                wait_for_ready)
        self._info = info
        return info

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """AxguardClient.health, awaited."""
        if self._plain is None:
            self._plain = self._open(plain=True)
        stub = health_pb2_grpc.HealthStub(self._plain)
        response = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service),
                                    timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
