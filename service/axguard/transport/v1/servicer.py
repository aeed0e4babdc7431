"""axguard.v1.ConfidenceService: each method converts the request, makes one data-plane
call, and converts the answer back (converters.py holds every conversion)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from ...serving.dataplane import DataPlane
from ..status import rpc_method, rpc_stream_method
from . import confidence_pb2 as pb
from . import confidence_pb2_grpc as pb_grpc
from .converters import (
    answer_to_response,
    batch_field,
    diagnose_ask,
    diagnose_event_message,
    feedback_response,
    image_from_proto,
    model_info_message,
    request_to_item,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConfidenceService"].full_name


class ConfidenceServicer(pb_grpc.ConfidenceServiceServicer):
    """axguard.v1.ConfidenceService over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @rpc_method
    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext,
              request_id: str) -> pb.CheckResponse:
        plane = self.plane
        answers = plane.check_request(
            1, lambda _: request_to_item(request, plane.bundle, plane.limits), [request_id],
            timeout=context.time_remaining())
        return answer_to_response(answers.items[0], answers)

    @rpc_method
    def CheckBatch(self, request: pb.CheckBatchRequest, context: grpc.ServicerContext,
                   request_id: str) -> pb.CheckBatchResponse:
        plane, items = self.plane, request.requests
        answers = plane.check_request(
            len(items), lambda i: request_to_item(items[i], plane.bundle, plane.limits),
            [sub.request_id or f"{request_id}-{i}" for i, sub in enumerate(items)],
            timeout=context.time_remaining(), field_names=batch_field, separate=True)
        return pb.CheckBatchResponse(
            responses=[answer_to_response(a, answers) for a in answers.items])

    @rpc_method
    def Feedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext,
                 request_id: str) -> pb.FeedbackResponse:
        labels = [(item.receipt, item.label) for item in request.items]
        return feedback_response(self.plane.feedback(labels, request_id))

    @rpc_stream_method
    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext,
                 request_id: str) -> Iterator[pb.DiagnoseEvent]:
        plane = self.plane
        cancelled = threading.Event()
        context.add_callback(cancelled.set)

        def should_stop() -> bool:
            remaining = context.time_remaining()
            return cancelled.is_set() or (remaining is not None and remaining <= 0)

        events = plane.diagnose_request(
            lambda: (image_from_proto(request.image, plane.bundle, plane.limits),
                     diagnose_ask(request)),
            request_id, should_stop=should_stop, cancelled=cancelled.is_set)
        for event in events:
            yield diagnose_event_message(event, plane.bundle.class_names)

    @rpc_method
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext,
                     request_id: str) -> pb.ModelInfo:
        self.plane.ensure_ready(warm=False)  # the description is valid before the warm-up
        return model_info_message(self.plane.describe())
