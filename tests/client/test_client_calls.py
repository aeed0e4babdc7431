"""The asyncio client against a real server (the same surface as the blocking one: checks,
batches, diagnoses, feedback, info, health, deadlines, typed errors, TLS, tokens), and the
retry policy both share: a full queue's pushback is waited out and retried."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from certificates import write

from axguard_client import (
    AsyncAxguardClient,
    AxguardClient,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from conftest import EXAMPLES, RunningServer

DIGIT = EXAMPLES / "digit_7.png"


def run(coroutine):  # noqa: ANN001, ANN201
    return asyncio.run(coroutine)


def test_the_async_client_checks_batches_and_describes(demo_server):
    async def calls() -> None:
        async with AsyncAxguardClient(demo_server.target, timeout=60) as client:
            assert await client.health() == "SERVING"
            info = await client.model_info()
            assert info.name == "digits-cnn" and info.max_batch_items == 256
            response = await client.check(DIGIT)
            assert response.prediction.class_name == "7" and response.verdict.calibrated
            array = np.zeros((32, 32, 3), dtype=np.uint8)
            assert (await client.check(array)).prediction.probability > 0
            answers = await client.check_batch([DIGIT, DIGIT.read_bytes(), array])
            assert [a.prediction.class_name for a in answers][:2] == ["7", "7"]
            concurrent = await asyncio.gather(*(client.check(DIGIT) for _ in range(16)))
            assert {r.prediction.class_name for r in concurrent} == {"7"}
            with pytest.raises(InvalidArgument, match="image.encoded"):
                await client.check(b"not an image")

    run(calls())


def test_the_async_diagnosis_streams_and_stops_when_left(demo_server):
    async def calls() -> tuple[list[str], list[str]]:
        async with AsyncAxguardClient(demo_server.target, timeout=60) as client:
            kinds = [e.WhichOneof("event") async for e in client.diagnose(DIGIT, max_steps=5)]
            early = []
            async for event in client.diagnose(DIGIT, max_steps=500):
                early.append(event.WhichOneof("event"))
                if len(early) == 2:
                    break  # leaving the loop cancels the call
            with pytest.raises(DeadlineExceeded):
                async for _ in client.diagnose(DIGIT, max_steps=2000, timeout=0.05):
                    pass
            return kinds, early

    kinds, early = run(calls())
    with AxguardClient(demo_server.target, timeout=60) as client:  # the same stream
        assert kinds == [e.WhichOneof("event") for e in client.diagnose(DIGIT, max_steps=5)]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    assert early == ["progress", "progress"]


def test_the_async_client_sends_feedback(demo_engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1 " + "ab" * 32 + "\n")
    server = RunningServer(demo_engine, {"feedback": {"key_file": keys}})

    async def calls() -> tuple[int, int]:
        async with AsyncAxguardClient(server.target, timeout=60) as client:
            receipt = (await client.check(DIGIT)).receipt
            first = await client.feedback([(receipt, 7)])
            again = await client.feedback([(receipt, 7)])
            return first.counted, again.duplicates

    try:
        assert run(calls()) == (1, 1)
    finally:
        server.stop()


def test_the_async_client_speaks_tls_and_tokens(demo_engine, pki, tmp_path):  # noqa: F811
    tokens = write(tmp_path, "tokens", b"s3cret\n")
    server = RunningServer(demo_engine, tls={"cert_file": pki["cert"], "key_file": pki["key"]},
                           auth={"token_file": tokens})

    async def calls(token: str | None) -> str:
        async with AsyncAxguardClient(server.target, tls_ca=pki["ca_pem"], token=token,
                                      timeout=30) as client:
            return (await client.check(DIGIT)).prediction.class_name

    try:
        assert run(calls("s3cret")) == "7"
        with pytest.raises(Unauthenticated):
            run(calls("wrong"))
    finally:
        server.stop()


def test_an_unreachable_target_fails_fast_or_waits_for_ready_within_its_deadline():
    async def calls() -> None:
        async with AsyncAxguardClient("127.0.0.1:1", timeout=2) as client:
            with pytest.raises(Unavailable):
                await client.check(DIGIT)
            with pytest.raises(DeadlineExceeded):
                await client.check(DIGIT, wait_for_ready=True, timeout=0.5)

    run(calls())
    with AxguardClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(Unavailable):
            client.model_info()
        with pytest.raises(DeadlineExceeded):
            client.model_info(wait_for_ready=True, timeout=0.5)


def busy_count(server: RunningServer) -> float:
    return server.metrics.registry.get_sample_value(
        "axguard_grpc_requests_total",
        {"grpc_method": "Check", "grpc_code": "RESOURCE_EXHAUSTED"}) or 0.0


def hammer(target: str, retry: RetryPolicy | None) -> list[ResourceExhausted]:
    """8 threads × 15 checks at once; return the refusals the callers saw."""
    failures: list[ResourceExhausted] = []

    def load() -> None:
        with AxguardClient(target, timeout=60, retry=retry) as client:
            for _ in range(15):
                try:
                    client.check(DIGIT)
                except ResourceExhausted as err:
                    failures.append(err)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def test_a_full_queue_sends_a_pushback_that_the_retry_policy_waits_out(demo_engine):
    server = RunningServer(demo_engine, {"batching": {"max_queue": 1}})
    try:
        failures = hammer(server.target, retry=None)
        refused = busy_count(server)
        assert refused > 0 and len(failures) == refused  # no retries: every refusal fails
        assert all(f.details.startswith("queue: the check queue is full") for f in failures)
        assert all(0.05 <= f.retry_after <= 5.0 for f in failures)  # the server's hint
        failures = hammer(server.target, retry=RetryPolicy())
        refused_with_retries = busy_count(server) - refused
        assert refused_with_retries > 0
        assert len(failures) < refused_with_retries  # refusals were retried and answered
    finally:
        server.stop()


def test_a_retry_policy_out_of_grpc_bounds_is_refused():
    with pytest.raises(ValueError, match="max_attempts: must be 2..5"):
        RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        AxguardClient("localhost:1", tls_cert="x.pem")
