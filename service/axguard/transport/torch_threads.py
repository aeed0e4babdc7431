"""Start-up tuning of the serving process: the network's weight layout (NCHW or
channels_last) and torch's intra-op threads, set before the model loads, then chosen by
measurement after the warm-up (serving/threads.py holds the rules).

The transport's CPU time per request comes from a real loopback round trip: a throwaway
gRPC server on a loopback port answers a representative CheckRequest (a tensor image at the
model's input size) with a representative CheckResponse, through the same converters Check
uses; a client in this process times the round trips. Client and server share the process,
so the figure is on the safe side (it counts the client's work too).
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent import futures
from dataclasses import replace
from typing import Any

import grpc
import torch

from ..config import Settings
from ..engine.core import CheckItem, CheckResult, Engine
from ..engine.model import MEMORY_FORMATS, ModelBundle, has_image_weights, set_memory_format
from ..engine.preprocess import InputLimits
from ..serving.threads import (
    ThreadChoice,
    candidate_threads,
    choose_memory_format,
    choose_threads,
    measure_threads,
    time_batch,
    usable_cores,
)
from .v1 import confidence_pb2 as pb
from .v1.converters import request_to_item, result_to_response, tensor_to_proto

log = logging.getLogger("axguard.server")


def configure_torch(settings: Settings) -> None:
    """Set torch's intra-op threads before the model loads: `model.torch_threads`, else
    one less than the usable cores (at least 1) until the warm-up measures the best count
    (`start_serving`)."""
    torch.set_num_threads(settings.model.torch_threads or max(1, usable_cores() - 1))


def choose_memory_format_at_start(settings: Settings, engine: Engine,
                                  items: list[CheckItem]) -> dict[str, float] | None:
    """Lay the network's weights out as `model.memory_format`; "auto" times `items` as one
    check in each layout and keeps the faster (threads.choose_memory_format), after
    checking that channels_last gives the same logits (a custom kernel might not). Returns
    the timings when it measured."""
    bundle = engine.bundle
    wanted = settings.model.memory_format
    if not has_image_weights(bundle):
        return None
    if wanted != "auto":
        set_memory_format(bundle, wanted)
        return None
    probe = torch.stack([item.image for item in items]).to(bundle.device)
    with torch.inference_mode():
        before = bundle.network(probe).float()
    timings = {}
    for name in MEMORY_FORMATS:
        set_memory_format(bundle, name)
        timings[name] = time_batch(lambda: engine.check(items))
    with torch.inference_mode():
        after = bundle.network(probe).float()  # channels_last, the last one timed
    scale = float(before.abs().max()) or 1.0
    same = bool(torch.allclose(before, after, rtol=1e-3, atol=1e-4 * scale))
    chosen = choose_memory_format(timings) if same else "contiguous"
    if not same:
        log.warning("memory_format_differs", extra={"max_difference": float(
            (before - after).abs().max())})
    set_memory_format(bundle, chosen)
    return timings


def choose_torch_threads(settings: Settings, engine: Engine, warm: Any) -> ThreadChoice:
    """Set the network's weight layout (choose_memory_format_at_start) and torch's
    intra-op threads: `model.torch_threads` when configured, else the count with the
    shortest measured batch cycle (threads.choose_threads), timing a batch of
    min(max_batch_size, max_workers) images (the largest batch single Checks can form) and
    a loopback round trip of the transport. GPU models keep cores − 1 (their batch and
    the transport are timed all the same)."""
    cores = usable_cores()
    batch = min(settings.batching.max_batch_size, settings.server.max_workers)
    images = torch.rand(batch, *engine.bundle.spec.shape,
                        generator=torch.Generator().manual_seed(0))
    items = [CheckItem(image) for image in images]
    layout = choose_memory_format_at_start(settings, engine, items)
    if settings.model.torch_threads:
        choice = ThreadChoice(settings.model.torch_threads, "configured")
    elif engine.bundle.device.type != "cpu":
        # The thread count hardly matters to a GPU engine; its batch and the transport are
        # still timed for the engine processes' rule (transport/engines.py).
        threads = max(1, cores - 1)
        torch.set_num_threads(threads)
        timings = {threads: time_batch(lambda: engine.check(items))}
        transport = transport_seconds_per_request(engine.bundle, images[0], warm)
        choice = ThreadChoice(threads, "device", batch, timings, transport)
    else:
        timings = measure_threads(lambda: engine.check(items), candidate_threads(cores))
        transport = transport_seconds_per_request(engine.bundle, images[0], warm)
        choice = ThreadChoice(choose_threads(timings, transport, batch, cores), "measured",
                              batch, timings, transport)
    choice = replace(choice, memory_format=engine.bundle.memory_format,
                     memory_format_seconds=layout)
    torch.set_num_threads(choice.threads)
    log.info("torch_threads", extra={"threads": choice.threads, "source": choice.source,
                                     "memory_format": choice.memory_format,
                                     "choice": choice.describe()})
    return choice


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
