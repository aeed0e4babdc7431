"""The dynamic batcher: grouping, bounded queue, deadlines; and over gRPC."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from axguard.engine.core import CheckItem, Engine
from axguard.errors import Busy, DeadlineExceeded
from axguard.serving.batching import DynamicBatcher
from axguard_client import AxguardClient
from axguard_client.v1 import confidence_pb2 as pb
from axguard_client.v1 import confidence_pb2_grpc as pb_grpc
from conftest import EXAMPLES, RunningServer


@pytest.fixture()
def engine(demo_bundle) -> Engine:
    e = Engine(demo_bundle)
    e.warm_up()
    return e


def items(n: int, seed: int = 0) -> list[CheckItem]:
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return [CheckItem(img, ("saliency", "deconvolution"), ("sum",)) for img in x]


def test_concurrent_submissions_are_batched_and_equal_single_checks(engine):
    batcher = DynamicBatcher(engine, max_batch_size=16, max_delay=0.05)
    try:
        work = [engine.resolve(i) for i in items(24)]
        with engine._lock:  # hold the engine so that submissions pile up
            futures = [batcher.submit(i) for i in work]
        results = [f.result(timeout=60) for f in futures]
        assert batcher.stats.largest_batch > 1
        assert batcher.stats.items == 24
        assert max(r.timing.batch_size for r in results) > 1
        for item, result in zip(work, results, strict=True):
            alone = engine.check([item])[0]
            assert result.class_index == alone.class_index
            for a, b in zip(result.scores, alone.scores, strict=True):
                assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4)
    finally:
        batcher.close()


def test_a_full_queue_refuses_at_once(engine):
    batcher = DynamicBatcher(engine, max_batch_size=1, max_delay=0, max_queue=1)
    try:
        work = [engine.resolve(i) for i in items(3)]
        with engine._lock:
            first = batcher.submit(work[0])
            while batcher.in_flight == 0:  # the worker has taken it and waits for the engine
                threading.Event().wait(0.01)
            second = batcher.submit(work[1])
            with pytest.raises(Busy, match="queue is full"):
                batcher.submit(work[2])
            assert batcher.stats.rejected == 1
        assert first.result(timeout=60).class_index >= 0
        assert second.result(timeout=60).class_index >= 0
    finally:
        batcher.close()


def test_a_call_refused_by_a_full_queue_computes_none_of_its_items(engine):
    """check() of three items into a queue with room for two fails as a whole (Busy, with
    the server's retry hint); the two it queued are cancelled, never computed."""
    batcher = DynamicBatcher(engine, max_batch_size=1, max_delay=0, max_queue=2)
    try:
        work = [engine.resolve(i) for i in items(4)]
        with engine._lock:
            running = batcher.submit(work[0])
            while batcher.in_flight == 0:
                threading.Event().wait(0.01)
            with pytest.raises(Busy, match="queue is full") as info:
                batcher.check(work[1:4], timeout=60)
            assert 0.05 <= info.value.retry_after <= 5.0
        running.result(timeout=60)
        assert batcher.check(work[:1], timeout=60)[0].class_index >= 0  # still serving
        assert batcher.stats.items == 2  # the first item and the last check: nothing else
        assert batcher.stats.seconds_per_item > 0
    finally:
        batcher.close()


def test_deadline_while_waiting(engine):
    batcher = DynamicBatcher(engine, max_batch_size=1, max_delay=0)
    try:
        work = [engine.resolve(i) for i in items(2)]
        with engine._lock:
            batcher.submit(work[0])
            with pytest.raises(DeadlineExceeded):
                batcher.check([work[1]], timeout=0.2)
        assert batcher.check([work[1]], timeout=60)[0].class_index >= 0
    finally:
        batcher.close()


def test_a_far_future_deadline_counts_as_none(engine):
    # Some clients (Triton's) send "no deadline" as one far in the future: waiting on it
    # overflowed time_t (OverflowError → INTERNAL) before.
    batcher = DynamicBatcher(engine, max_batch_size=1, max_delay=0)
    try:
        work = [engine.resolve(i) for i in items(1)]
        for timeout in (1e12, 1e300, float("inf")):
            assert batcher.check(work, timeout=timeout)[0].class_index >= 0
    finally:
        batcher.close()


def test_concurrent_grpc_clients_share_batches(demo_engine):
    server = RunningServer(demo_engine, max_workers=16)
    try:
        png = (EXAMPLES / "digit_4.png").read_bytes()
        with AxguardClient(server.target, timeout=60) as client, \
                ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(lambda _: client.check(png), range(48)))
        assert {r.prediction.class_name for r in responses} == {"4"}
        assert max(r.timing.batch_size for r in responses) > 1
        assert all(r.timing.queue_ms >= 0 for r in responses)
        scores = {round(r.co_scores[0].score, 3) for r in responses}
        assert len(scores) == 1  # batching does not change the answer
    finally:
        server.stop()


def test_full_queue_is_resource_exhausted_over_grpc(demo_bundle):
    from axguard.config import load_settings
    from axguard.transport.server import build_server, start_serving

    engine = Engine(demo_bundle)
    settings = load_settings(server={"port": 0}, batching={"max_queue": 1, "max_batch_size": 1})
    parts = build_server(settings, engine)
    server, port = parts.server, parts.port
    start_serving(parts)
    batcher = parts.plane.batcher
    try:
        request = pb.CheckRequest(image=pb.Image(encoded=(EXAMPLES / "digit_1.png").read_bytes()))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ConfidenceServiceStub(channel)
            with engine._lock:
                first = stub.Check.future(request, timeout=60)
                while batcher.in_flight == 0:  # the worker holds it, waiting for the engine
                    threading.Event().wait(0.01)
                second = stub.Check.future(request, timeout=60)
                while batcher.depth == 0:
                    threading.Event().wait(0.01)
                with pytest.raises(grpc.RpcError) as info:
                    stub.Check(request, timeout=60)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue" in info.value.details()
            assert first.result().prediction.class_name == "1"
            assert second.result().prediction.class_name == "1"
    finally:
        server.stop(None).wait()
        batcher.close()


def test_prediction_only_skips_scores_and_batches_with_full_checks(client, demo_engine):
    png = (EXAMPLES / "digit_6.png").read_bytes()
    request = pb.CheckRequest(image=pb.Image(encoded=png), prediction_only=True)
    response = client.check(request)
    full = client.check(png)
    assert response.prediction.class_name == full.prediction.class_name == "6"
    assert response.prediction.probability == pytest.approx(full.prediction.probability)
    assert len(response.co_scores) == 0 and not response.verdict.calibrated
    mixed = demo_engine.check([CheckItem(torch.rand(3, 32, 32), prediction_only=True),
                               CheckItem(torch.rand(3, 32, 32))])
    assert mixed[0].scores == [] and not mixed[0].verdict.calibrated
    assert len(mixed[1].scores) == 2 and mixed[1].verdict.calibrated


def test_the_batcher_waits_for_announced_items_and_not_for_absent_ones(engine):
    batcher = DynamicBatcher(engine, max_batch_size=16, max_delay=30.0)
    try:
        first, second = (engine.resolve(i) for i in items(2, seed=5))
        # Nothing announced: the lone item runs at once, not after the 30 s delay.
        alone = batcher.submit(first).result(timeout=10)
        assert alone.timing.batch_size == 1
        # Two announced: the batch waits for the one still being decoded.
        with batcher.arriving(2) as arrival:
            early = batcher.submit(first)
            threading.Timer(0.3, lambda: batcher.check([second], arrival=arrival)).start()
            assert early.result(timeout=10).timing.batch_size == 2
        with batcher.arriving() as refused:
            pass  # a request refused while decoding: its announcement ends with the block
        assert refused is not None and batcher.submit(first).result(timeout=10)
    finally:
        batcher.close()


def test_every_runner_takes_batches_from_the_one_queue(demo_bundle):
    """Two engines, one queue: while one engine is held, the other answers everything."""
    first, second = Engine(demo_bundle), Engine(demo_bundle)
    batcher = DynamicBatcher(first, max_batch_size=4, max_delay=0)
    batcher.add_runner(second.check)
    try:
        assert batcher.runners == 2
        work = [first.resolve(i) for i in items(12, seed=5)]
        with first._lock:  # the first engine is busy: its runner blocks on its batch
            futures = [batcher.submit(i) for i in work]
            # The held batch has at most 4 items: the second engine answers the rest.
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sum(f.done() for f in futures) >= 8
        done = [f.result(timeout=60) for f in futures]
        by_runner = batcher.stats.batches_by_runner
        assert set(by_runner) == {"axguard-batcher-0", "axguard-batcher-1"}
        assert by_runner["axguard-batcher-1"] >= 2  # the free one took the rest
        assert sum(by_runner.values()) == batcher.stats.batches
        for item, result in zip(work, done, strict=True):
            assert result.class_index == first.check([item])[0].class_index
    finally:
        batcher.close()


def test_a_lost_runners_batch_is_answered_by_the_others(demo_bundle):
    from axguard.serving.batching import RunnerLost

    engine = Engine(demo_bundle)
    calls = []

    def gone(batch):
        calls.append(len(batch))
        raise RunnerLost("engine process 1 ended")

    batcher = DynamicBatcher(engine, max_batch_size=8, max_delay=0)
    batcher.add_runner(gone)
    batcher.retire_first_runner()  # as with engine processes: only `gone` serves
    try:
        work = [engine.resolve(i) for i in items(6, seed=6)]
        results = batcher.check(work, timeout=60)
        # `gone` took a batch and lost it; with no runner left, the engine came back.
        assert calls and batcher.stats.lost_runners == 1
        assert batcher.runners == 1
        assert [r.class_index for r in results] == [
            r.class_index for r in engine.check(work)]
        assert batcher.check(work[:2], timeout=60)[0].class_index == results[0].class_index
    finally:
        batcher.close()
