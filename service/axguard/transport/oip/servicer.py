"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) on the same
port as axguard.v1, so Triton and KServe clients call axguard unchanged.

The served model is the one model, under its name and version. Inputs: `image` (BYTES,
shape [N] or [N, 1], encoded images) or `tensor` (FP32, [N, C, H, W] in [0, 1]). Outputs,
each returned only when requested (all but `receipt` when none are named): `class_index`
(INT32 [N]), `probabilities` and `logits` (FP32 [N, C]), `risk` (FP32 [N]; 0 without a
calibration, as in axguard.v1: never NaN), `likely_wrong` (BOOL [N]), `co_scores` (FP32
[N, K]; its `columns` parameter names the K method/AX-process pairs) and `receipt` (BYTES
[N], for Feedback). Request parameters: `methods` and `ax_processes` (comma-separated
strings), `prediction_only` (bool). Contents come typed (`contents`) or raw
(`raw_input_contents`, as Triton's client sends them); the answer uses the same form.

Pure translation: the items go through the same dynamic batcher as Check, errors are the
engine's (one status table in status.py) with messages naming the input.
"""

from __future__ import annotations

from typing import Any

import grpc

from ... import __version__
from ...serving.dataplane import DataPlane
from ..status import rpc_method
from . import open_inference_grpc_pb2 as oip
from . import open_inference_grpc_pb2_grpc as oip_grpc
from .converters import (
    announced_items,
    infer_field,
    infer_response,
    item_decoder,
    model_metadata,
    parse_options,
    requested_outputs,
)

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data plane that axguard.v1 uses too (one
    queue, one set of counters and receipts for both APIs)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @rpc_method
    def ServerLive(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        return oip.ServerLiveResponse(live=True)

    @rpc_method
    def ServerReady(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                    request_id: str) -> Any:
        return oip.ServerReadyResponse(ready=self.plane.ready)

    @rpc_method
    def ModelReady(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        return oip.ModelReadyResponse(
            ready=self.plane.describe(request.name, request.version).ready)

    @rpc_method
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                       request_id: str) -> Any:
        return oip.ServerMetadataResponse(name="axguard", version=__version__, extensions=[])

    @rpc_method
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                      request_id: str) -> Any:
        return model_metadata(self.plane.describe(request.name, request.version))

    @rpc_method
    def ModelInfer(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        plane = self.plane
        plane.ensure_ready()
        bundle = plane.require_model(request.model_name, request.model_version, "model_")
        options = parse_options(request.parameters)
        names = requested_outputs(request, options)
        count = announced_items(request, plane.max_batch_items)
        answers = plane.check_request(
            count, item_decoder(request, options, bundle, plane.limits, plane.max_batch_items),
            [f"{request_id}-{i}" for i in range(count)], timeout=context.time_remaining(),
            field_names=infer_field)
        return infer_response(request, answers, names, bundle.name, bundle.version)


def add_to_server(plane: DataPlane, server: grpc.Server) -> InferenceServicer:
    """Serve inference.GRPCInferenceService on `server` next to axguard.v1."""
    servicer = InferenceServicer(plane)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
