"""The Check handler alone on grpc.aio or on the thread-pool server, with the real engine,
batcher, converters, metrics and receipts (no interceptors): `python bench/aio_check_server.py
threads|aio` prints its port. bench/transport_raw.py drives it to bound what porting the
servicers to grpc.aio gives."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from concurrent import futures

import grpc
import torch
from prometheus_client import CollectorRegistry

from axguard.config import Settings
from axguard.demo.bundle import ASSETS, load_demo_bundle
from axguard.engine.core import Engine
from axguard.flag.artifact import load_artifact
from axguard.serving.batching import DynamicBatcher
from axguard.serving.dataplane import input_limits
from axguard.serving.metrics import Metrics
from axguard.serving.quality import LiveQuality
from axguard.transport.v1.converters import request_to_item, result_to_response
from axguard_client.v1 import confidence_pb2_grpc as pb_grpc

torch.set_num_threads(1)  # what the server's measurement picks for the demo here
BUNDLE = load_demo_bundle()
CALIBRATION = load_artifact(ASSETS / "calibration.json")
ENGINE = Engine(BUNDLE, calibration=CALIBRATION)
ENGINE.warm_up()
SETTINGS = Settings()
METRICS = Metrics(CollectorRegistry(), model=BUNDLE.name, class_names=BUNDLE.class_names)
LIVE = LiveQuality(SETTINGS, BUNDLE, CALIBRATION, METRICS)
LIMITS = input_limits(SETTINGS)
BATCHER = DynamicBatcher(ENGINE, max_batch_size=32, max_delay=0.002, max_queue=1024)


def answer(result, request_id: str, start: float):  # noqa: ANN001, ANN201
    total = time.perf_counter() - start
    METRICS.observe_check(result, result.timing.queue_ms, total)
    response = result_to_response(result, request_id, total_ms=total * 1e3)
    response.receipt = LIVE.observe([result], [request_id])[0]
    return response


class Threads(pb_grpc.ConfidenceServiceServicer):
    def Check(self, request, context):  # noqa: ANN001, ANN201, N802
        start, request_id = time.perf_counter(), request.request_id or uuid.uuid4().hex
        with BATCHER.arriving() as arrival:
            item = ENGINE.resolve(request_to_item(request, BUNDLE, LIMITS))
            result = BATCHER.check([item], timeout=context.time_remaining(),
                                   arrival=arrival)[0]
        return answer(result, request_id, start)


class Aio(pb_grpc.ConfidenceServiceServicer):
    async def Check(self, request, context):  # noqa: ANN001, ANN201, N802
        start, request_id = time.perf_counter(), request.request_id or uuid.uuid4().hex
        with BATCHER.arriving() as arrival:
            item = ENGINE.resolve(request_to_item(request, BUNDLE, LIMITS))
            future = BATCHER.submit(item)
            arrival.done()
        result = await asyncio.wrap_future(future)
        return answer(result, request_id, start)


def serve_threads() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ConfidenceServiceServicer_to_server(Threads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def serve_aio() -> None:
    server = grpc.aio.server()
    pb_grpc.add_ConfidenceServiceServicer_to_server(Aio(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if sys.argv[1] == "threads":
        serve_threads()
    else:
        asyncio.run(serve_aio())
