"""The transport's CPU time per request on this machine, measured for the thread policy.

A throwaway gRPC server on a loopback port answers a representative CheckRequest (a tensor
image at the model's input size) with a representative CheckResponse, through the same
converters Check uses; a client in this process times the round trips. Client and server
share the process, so the figure is on the safe side (it counts the client's work too).
"""

from __future__ import annotations

import statistics
import time
from concurrent import futures

import grpc
import torch

from .converters import InputLimits, request_to_item, result_to_response, tensor_to_proto
from .engine import CheckResult
from .model import ModelBundle
from .v1 import confidence_pb2 as pb

_METHOD = "/axguard.probe.TransportProbe/Echo"


def transport_seconds_per_request(bundle: ModelBundle, image: torch.Tensor,
                                  result: CheckResult, calls: int = 40) -> float:
    """Median seconds of one loopback Check-shaped round trip, converters included."""
    request = pb.CheckRequest(image=pb.Image(tensor=tensor_to_proto(image)))
    limits = InputLimits(1 << 62, 1 << 62)

    def echo(message: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        request_to_item(message, bundle, limits)
        return result_to_response(result, "probe")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "axguard.probe.TransportProbe", {"Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(_METHOD,
                                       request_serializer=pb.CheckRequest.SerializeToString,
                                       response_deserializer=pb.CheckResponse.FromString)
            for _ in range(5):
                call(request, timeout=30)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                call(request, timeout=30)
                times.append(time.perf_counter() - start)
    finally:
        server.stop(None)
    return statistics.median(times)
