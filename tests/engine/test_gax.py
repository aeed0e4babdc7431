"""GAX: the algorithm against a longhand reference, and the Diagnose stream end to end."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from axguard.engine import gax
from axguard.engine.gax import GaxOptions
from axguard.engine.preprocess import decode_image
from axguard.errors import InvalidInput
from axguard_client import AxguardClient, InvalidArgument, ResourceExhausted
from axguard_client.v1 import confidence_pb2 as pb
from axguard_client.v1 import confidence_pb2_grpc as pb_grpc
from conftest import EXAMPLES, RunningServer

DIGIT = EXAMPLES / "digit_3.png"


def digit(bundle) -> torch.Tensor:
    return decode_image(DIGIT.read_bytes(), bundle.spec, max_pixels=10**7)


def reference_gax(network, x, target_class, steps, lr=0.1, lam=100.0, eps=1e-4):
    """DESIGN 1.8 written out: h = tanh(w x + 0.01), loss = −s_co + λ / mean((h−x+ε)²/(x+ε))."""
    x = x[None]
    with torch.no_grad():
        base = network(x)
    c = base.shape[1]
    kappa = torch.full((c,), -1.0 / (c - 1))
    kappa[target_class] = 1.0
    w = torch.ones_like(x, requires_grad=True)
    adam = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
    trace = []
    for _ in range(steps):
        h = torch.tanh(w * x + 0.01)
        co = ((network(x + h) - base)[0] * kappa).sum()
        loss = -co + lam / ((h - x + eps) ** 2 / (x + eps)).mean()
        trace.append((float(co.detach()), float(loss.detach()), h.detach()[0].clone()))
        adam.zero_grad()
        loss.backward()
        adam.step()
    return trace


def test_gax_follows_the_papers_algorithm_step_by_step(demo_bundle):
    x = digit(demo_bundle)
    options = GaxOptions(target_class=3, target_co=1e9, max_steps=12)
    steps = list(gax.diagnose(demo_bundle.network, x, options))
    reference = reference_gax(demo_bundle.network, x, 3, 13)
    assert [s.step for s in steps] == list(range(13))
    for got, (co, loss, h) in zip(steps, reference, strict=True):
        assert got.co_score == pytest.approx(co, rel=1e-4, abs=1e-4)
        assert got.loss == pytest.approx(loss, rel=1e-4)
        torch.testing.assert_close(got.heatmap, h, rtol=1e-4, atol=1e-5)
    assert steps[-1].final and not steps[-1].reached_target
    assert all(p.grad is None for p in demo_bundle.network.parameters())


def test_co_and_heatmap_come_from_the_same_parameters(demo_bundle):
    """Re-scoring each reported heatmap gives exactly the reported CO (the reference code
    saved them one step apart)."""
    from axguard.engine import scoring

    x = digit(demo_bundle)
    with torch.no_grad():
        base = demo_bundle.network(x[None])
        for step in gax.diagnose(demo_bundle.network, x, GaxOptions(3, 1e9, max_steps=5)):
            co = scoring.co_score(demo_bundle.network((x + step.heatmap)[None]), base,
                                  scoring.kappa(torch.tensor([3]), 10))
            assert float(co) == pytest.approx(step.co_score, rel=1e-5, abs=1e-5)


def test_gax_stops_at_the_target_or_the_cap(demo_bundle):
    x = digit(demo_bundle)
    first = next(gax.diagnose(demo_bundle.network, x, GaxOptions(3, 1e9, max_steps=3)))
    reached = list(gax.diagnose(demo_bundle.network, x,
                                GaxOptions(3, first.co_score + 5, max_steps=400)))
    assert reached[-1].reached_target and reached[-1].final
    assert reached[-1].co_score >= first.co_score + 5 > reached[-2].co_score
    capped = list(gax.diagnose(demo_bundle.network, x, GaxOptions(3, 1e9, max_steps=7)))
    assert len(capped) == 8 and not capped[-1].reached_target


def test_similarity_and_loss_by_hand():
    h = torch.tensor([0.5, 0.0])
    x = torch.tensor([0.25, 1.0])
    eps = 1e-4
    expected = ((0.25 + eps) ** 2 / (0.25 + eps) + (-1 + eps) ** 2 / (1 + eps)) / 2
    assert float(gax.similarity(h, x)) == pytest.approx(expected)
    assert float(gax.gax_loss(torch.tensor(3.0), torch.tensor(0.5), 100.0)) == pytest.approx(197)
    assert float(gax.gax_heatmap(torch.ones(1), torch.zeros(1))) == pytest.approx(
        torch.tanh(torch.tensor(0.01)).item())


def diagnoser(engine, calibration="same"):
    from axguard.config import GaxSettings
    from axguard.serving.diagnoser import Diagnoser

    return Diagnoser(engine.bundle, GaxSettings(max_steps_cap=2000, default_target_co=48.0),
                     engine.calibration if calibration == "same" else calibration)


def test_gax_options_validation(demo_engine):
    x = digit(demo_engine.bundle)
    base = dict(target_class=None, target_co=None, max_steps=500, learning_rate=0.1,
                similarity_weight=100.0)
    options = diagnoser(demo_engine).options(x, **base)
    assert options.target_class == 3
    assert options.target_co == pytest.approx(demo_engine.calibration.gax_target)
    for change, field in ((dict(target_class=10), "target_class"),
                          (dict(max_steps=5000), "max_steps"),
                          (dict(learning_rate=0.0), "learning_rate"),
                          (dict(similarity_weight=float("nan")), "similarity_weight"),
                          (dict(similarity_weight=3e38), "similarity_weight"),
                          (dict(learning_rate=1e30), "learning_rate"),
                          (dict(target_co=float("inf")), "target_co")):
        with pytest.raises(InvalidInput) as info:
            diagnoser(demo_engine).options(x, **{**base, **change})
        assert info.value.field == field
    uncalibrated = diagnoser(demo_engine, calibration=None)
    assert uncalibrated.options(x, **base).target_co == 48.0


def test_diagnose_stream_end_to_end(client, demo_engine):
    events = list(client.diagnose(DIGIT, snapshot_every=5, max_steps=300, request_id="gax-1"))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    result = events[-1].result
    progress = [e.progress for e in events if e.HasField("progress")]
    snapshots = [e.snapshot for e in events if e.HasField("snapshot")]
    assert [p.step for p in progress] == list(range(result.steps + 1))
    assert [s.step for s in snapshots] == list(range(0, result.steps, 5))
    assert result.reached_target
    assert result.final_co == pytest.approx(progress[-1].co_score)
    assert result.final_co >= result.target_co == pytest.approx(
        demo_engine.calibration.gax_target)
    assert list(result.heatmap.shape) == [3, 32, 32]
    heatmap = torch.frombuffer(bytearray(result.heatmap.data), dtype=torch.float32)
    assert heatmap.abs().max() <= 1.0
    assert result.prediction_before.class_name == "3"
    assert result.prediction_after.probability >= result.prediction_before.probability - 1e-6
    assert result.target_class == 3


def test_diagnose_bad_input(client):
    with pytest.raises(InvalidArgument, match="image.encoded"):
        list(client.diagnose(b"not an image"))
    with pytest.raises(InvalidArgument, match="max_steps"):
        list(client.diagnose(DIGIT, max_steps=10**6))
    with pytest.raises(InvalidArgument, match="target_class"):
        list(client.diagnose(DIGIT, target_class=42))


def long_request() -> pb.DiagnoseRequest:
    return pb.DiagnoseRequest(image=pb.Image(encoded=DIGIT.read_bytes()), max_steps=2000,
                              target_co=1e9, request_id="long")


def test_a_full_pool_refuses_at_once_and_cancel_frees_it(demo_engine, caplog):
    server = RunningServer(demo_engine)
    server_settings_pool = 2
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ConfidenceServiceStub(channel)
            calls = [stub.Diagnose(long_request(), timeout=120)
                     for _ in range(server_settings_pool)]
            for call in calls:
                next(call)  # both are running
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Diagnose(long_request(), timeout=120))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - started < 5  # at once, not after the others
            # Check is not blocked by running diagnoses (they use their own model copy).
            with AxguardClient(server.target, timeout=60) as c:
                assert c.check(EXAMPLES / "digit_1.png").prediction.class_name == "1"
            with caplog.at_level("INFO", logger="axguard"):
                for call in calls:
                    call.cancel()
                deadline = time.time() + 30
                while time.time() < deadline and sum(
                        r.getMessage() == "diagnose_cancelled" for r in caplog.records) < 2:
                    time.sleep(0.05)
            cancelled = [r for r in caplog.records if r.getMessage() == "diagnose_cancelled"]
            assert len(cancelled) == 2
            assert all(r.steps < 2000 for r in cancelled)
            registry = server.metrics.registry

            def cancelled_count() -> float:
                return registry.get_sample_value("axguard_grpc_requests_total", {
                    "grpc_method": "Diagnose", "grpc_code": "CANCELLED"}) or 0

            deadline = time.time() + 10
            while cancelled_count() < 2 and time.time() < deadline:
                time.sleep(0.05)
            assert cancelled_count() == 2
            assert registry.get_sample_value("axguard_grpc_requests_total", {
                "grpc_method": "Diagnose", "grpc_code": "RESOURCE_EXHAUSTED"}) == 1
            # The pool is free again.
            events = list(stub.Diagnose(pb.DiagnoseRequest(
                image=pb.Image(encoded=DIGIT.read_bytes()), max_steps=3, target_co=1e9),
                timeout=60))
            assert events[-1].result.steps == 3
    finally:
        server.stop()


def test_deadline_stops_the_optimisation(demo_engine, caplog):
    server = RunningServer(demo_engine)
    try:
        with AxguardClient(server.target) as c, caplog.at_level("INFO", logger="axguard"):
            started = time.perf_counter()
            with pytest.raises(Exception) as info:
                list(c.diagnose(DIGIT, max_steps=2000, target_co=1e9, timeout=0.5))
            # Never OK without a result: the client sees the deadline whoever noticed it.
            assert "DEADLINE_EXCEEDED" in str(info.value) or "DeadlineExceeded" in repr(
                info.value)
            deadline = time.time() + 30
            while time.time() < deadline and not any(
                    r.getMessage() == "diagnose_cancelled" for r in caplog.records):
                time.sleep(0.05)
            assert any(r.getMessage() == "diagnose_cancelled" for r in caplog.records)
            assert time.perf_counter() - started < 30
            registry = server.metrics.registry
            deadline = time.time() + 10
            while time.time() < deadline and not registry.get_sample_value(
                    "axguard_grpc_requests_total",
                    {"grpc_method": "Diagnose", "grpc_code": "DEADLINE_EXCEEDED"}):
                time.sleep(0.05)
            assert registry.get_sample_value("axguard_grpc_requests_total", {
                "grpc_method": "Diagnose", "grpc_code": "DEADLINE_EXCEEDED"}) == 1
    finally:
        server.stop()


def test_busy_maps_to_resource_exhausted_in_the_client(demo_engine):
    from axguard.config import load_settings  # noqa: F401  (settings drive the pool size)

    server = RunningServer(demo_engine)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ConfidenceServiceStub(channel)
            calls = [stub.Diagnose(long_request(), timeout=60) for _ in range(2)]
            for call in calls:
                next(call)
            with AxguardClient(server.target) as c, pytest.raises(ResourceExhausted):
                list(c.diagnose(DIGIT))
            for call in calls:
                call.cancel()
    finally:
        server.stop()


def test_concurrent_diagnoses_do_not_share_state(demo_engine):
    x = digit(demo_engine.bundle)
    options = GaxOptions(3, 1e9, max_steps=10)
    shared = diagnoser(demo_engine)
    serial = [s.co_score for s in shared.run(x, options)]
    results: list[list[float]] = []

    def run() -> None:
        results.append([s.co_score for s in shared.run(x, options)])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r == pytest.approx(serial, rel=1e-5)


def test_a_run_cut_off_by_its_deadline_never_ends_ok(demo_engine):
    """Even when the server notices the deadline first, the stream ends DEADLINE_EXCEEDED."""
    server = RunningServer(demo_engine)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ConfidenceServiceStub(channel)
            for timeout in (0.3, 0.6, 1.0):
                call = stub.Diagnose(pb.DiagnoseRequest(
                    image=pb.Image(encoded=DIGIT.read_bytes()), max_steps=2000,
                    target_co=1e9), timeout=timeout)
                events = []
                with pytest.raises(grpc.RpcError) as info:
                    for event in call:
                        events.append(event)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert not any(e.HasField("result") for e in events)
    finally:
        server.stop()


def test_huge_options_are_refused_and_nothing_non_finite_is_streamed(client):
    from axguard_client import InvalidArgument

    with pytest.raises(InvalidArgument, match="similarity_weight"):
        list(client.diagnose(DIGIT, similarity_weight=3e38, max_steps=5))
    events = list(client.diagnose(DIGIT, similarity_weight=1e6, learning_rate=10.0,
                                  max_steps=20, snapshot_every=1))
    import math

    for e in events:
        for part in (e.progress, e.snapshot, e.result):
            for name in ("co_score", "loss", "similarity", "final_co"):
                if hasattr(part, name):
                    assert math.isfinite(getattr(part, name))
