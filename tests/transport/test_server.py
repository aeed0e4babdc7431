"""Integration: the real server on a free loopback port, real gRPC calls, real PNGs."""

from __future__ import annotations

import inspect
import io
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from torch import nn

from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, ModelBundle, wrap_network
from axguard.engine.preprocess import decode_image
from axguard.transport.server import SERVICE_NAME, ConfidenceServicer
from axguard.transport.v1.converters import (
    InputLimits,
    item_to_request,
    request_to_item,
    response_to_result,
    result_to_response,
)
from axguard_client import (
    AxguardClient,
    InvalidArgument,
    ResourceExhausted,
    ServerError,
    method_name,
)
from axguard_client.v1 import confidence_pb2 as pb
from axguard_client.v1 import confidence_pb2_grpc as pb_grpc
from conftest import EXAMPLES, RunningServer, png_bytes

DIGITS = sorted(EXAMPLES.glob("digit_*.png"))


def test_check_on_every_example_digit_is_correct(client):
    flagged = 0
    for path in DIGITS:
        response = client.check(path, request_id=f"id-{path.stem}")
        assert response.request_id == f"id-{path.stem}"
        assert response.prediction.class_name == path.stem.split("_")[1]
        assert [pb.AttributionMethod.Name(s.method) for s in response.co_scores] == [
            "ATTRIBUTION_METHOD_SALIENCY", "ATTRIBUTION_METHOD_DECONVOLUTION"]
        assert all(s.ax_process == pb.AX_PROCESS_SUM for s in response.co_scores)
        assert all(not s.HasField("labelled_score") for s in response.co_scores)
        assert response.verdict.calibrated
        v = response.verdict
        assert v.likely_wrong == (v.risk > v.threshold)  # false-alarm mode: risk > t
        flagged += v.likely_wrong
        assert response.verdict.calibration_id.startswith("cal-")
        assert len(response.prediction.logits) == 10
        assert response.timing.total_ms >= response.timing.forward_ms > 0
    # All ten are right; at β = 0.05 the flag may fire on an unsure one (digit_1: p 0.86).
    assert flagged <= 2


def test_check_over_grpc_equals_the_engine_offline(client, demo_engine):
    path = DIGITS[4]
    response = client.check(path, methods=["saliency", "deep_lift"], ax_processes=["sum",
                            "product"], label=4, return_heatmaps=True)
    image = decode_image(path.read_bytes(), demo_engine.bundle.spec, max_pixels=10**7)
    offline = demo_engine.check([CheckItem(image, ["saliency", "deep_lift"], ["sum", "product"],
                                           4, True)])[0]
    got = response_to_result(response)
    assert got.class_index == offline.class_index
    for a, b in zip(got.scores, offline.scores, strict=True):
        assert (a.method, a.ax_process) == (b.method, b.ax_process)
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
        assert a.labelled_score == pytest.approx(b.labelled_score, rel=1e-5, abs=1e-5)
    assert set(got.heatmaps) == {"saliency", "deep_lift"}
    torch.testing.assert_close(got.heatmaps["saliency"], offline.heatmaps["saliency"])
    assert got.heatmaps["saliency"].abs().max() == pytest.approx(1.0)


def test_tensor_input_equals_encoded_input(client, demo_engine):
    path = DIGITS[7]
    image = decode_image(path.read_bytes(), demo_engine.bundle.spec, max_pixels=10**7)
    by_tensor = client.check(item_to_request(CheckItem(image)))
    by_png = client.check(path)
    assert by_tensor.prediction.class_index == by_png.prediction.class_index
    assert [s.score for s in by_tensor.co_scores] == pytest.approx(
        [s.score for s in by_png.co_scores], rel=1e-5)


def test_check_batch_keeps_order_and_isolates_bad_items(client):
    good = [DIGITS[1].read_bytes(), DIGITS[2].read_bytes()]
    responses = client.check_batch([good[0], b"garbage", good[1]])
    assert len(responses) == 3
    assert responses[0].prediction.class_name == "1"
    assert responses[2].prediction.class_name == "2"
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "requests[1].image.encoded" in responses[1].error.message
    assert not responses[0].HasField("error")
    # Errors the engine finds name the item's field too.
    labelled = pb.CheckRequest(image=pb.Image(encoded=good[0]), label=10)
    responses = client.check_batch([good[0], labelled])
    assert responses[1].error.message.startswith("requests[1].label: 10 is out of range")
    assert responses[0].prediction.class_name == "1"


def test_an_empty_batch_is_invalid_argument(client):
    with pytest.raises(InvalidArgument, match="INVALID_ARGUMENT: requests: is empty"):
        client.check_batch([])


def malformed_tiff() -> bytes:
    """A TIFF whose StripOffsets (tag 273) has type 7 (UNDEFINED): Pillow raises TypeError
    inside load(). Found by fuzzing (issue 10)."""
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 7)
    return bytes(data)


def test_a_decoder_crash_on_client_bytes_is_invalid_argument_never_internal(client):
    bad = malformed_tiff()
    with pytest.raises(InvalidArgument) as info:
        client.check(bad)
    assert info.value.details.startswith("image.encoded: cannot decode")
    responses = client.check_batch([DIGITS[5].read_bytes(), bad])
    assert responses[0].prediction.class_name == "5"
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[1].error.message.startswith("requests[1].image.encoded: cannot decode")


def test_get_model_info(client, demo_engine):
    info = client.model_info()
    assert info.name == "digits-cnn"
    assert info.fingerprint == demo_engine.bundle.fingerprint and len(info.fingerprint) == 64
    assert list(info.class_names) == [str(d) for d in range(10)]
    assert list(info.input_shape) == [3, 32, 32]
    assert len(info.mean) == 3 and len(info.std) == 3
    assert len(info.available_methods) == 6
    assert list(info.default_methods) == [pb.ATTRIBUTION_METHOD_SALIENCY,
                                          pb.ATTRIBUTION_METHOD_DECONVOLUTION]
    summary = info.calibration
    assert summary.calibration_id == demo_engine.calibration.calibration_id
    assert summary.mode == "false_alarm" and summary.target == pytest.approx(0.05)
    assert summary.n_images == 359 and summary.n_errors == demo_engine.calibration.data.n_errors
    assert summary.threshold == pytest.approx(demo_engine.calibration.threshold.value)
    assert 0.5 < summary.auroc_msp <= 1 and 0.5 < summary.auroc_risk <= 1
    assert list(summary.risk_features) == demo_engine.calibration.flag.risk_model.features
    assert info.device == "cpu"


def test_health_is_serving(client, demo_server):
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"


def test_reflection_lists_the_services(demo_server):
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert response.file_descriptor_response.file_descriptor_proto


def tensor_request(values: np.ndarray, shape=None) -> pb.CheckRequest:
    shape = list(values.shape) if shape is None else shape
    return pb.CheckRequest(image=pb.Image(tensor=pb.Tensor(
        shape=shape, data=values.astype("<f4").tobytes())))


BAD_REQUESTS = [
    ("corrupt bytes", pb.CheckRequest(image=pb.Image(encoded=b"\x89PNG broken")),
     "image.encoded"),
    ("empty request", pb.CheckRequest(), "image"),
    ("wrong shape", tensor_request(np.zeros((3, 16, 16))), "image.tensor.shape"),
    ("wrong byte length", tensor_request(np.zeros(7), shape=[3, 32, 32]), "image.tensor.data"),
    ("NaN", tensor_request(np.full((3, 32, 32), np.nan)), "image.tensor.data"),
    ("Inf", tensor_request(np.full((3, 32, 32), np.inf)), "image.tensor.data"),
    ("out of range", tensor_request(np.full((3, 32, 32), 1.5)), "image.tensor.data"),
    ("unknown method", pb.CheckRequest(image=pb.Image(encoded=b"x"), methods=[42]), "methods"),
    ("unspecified method", pb.CheckRequest(image=pb.Image(encoded=b"x"), methods=[0]),
     "methods"),
    ("unknown AX process", pb.CheckRequest(image=pb.Image(encoded=b"x"), ax_processes=[9]),
     "ax_processes"),
    ("label out of range", pb.CheckRequest(image=pb.Image(tensor=pb.Tensor(
        shape=[3, 32, 32], data=np.zeros((3, 32, 32), "<f4").tobytes())), label=10), "label"),
    ("label out of range, prediction only", pb.CheckRequest(image=pb.Image(tensor=pb.Tensor(
        shape=[3, 32, 32], data=np.zeros((3, 32, 32), "<f4").tobytes())), label=-1,
        prediction_only=True), "label"),
    ("label out of range, verdict only", pb.CheckRequest(image=pb.Image(tensor=pb.Tensor(
        shape=[3, 32, 32], data=np.zeros((3, 32, 32), "<f4").tobytes())), label=10,
        verdict_only=True), "label"),
]


@pytest.mark.parametrize(("name", "request_", "field"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field_and_serving_goes_on(
        client, name, request_, field):
    if request_.image.WhichOneof("source") == "encoded" and request_.image.encoded == b"x":
        request_.image.encoded = DIGITS[0].read_bytes()
    with pytest.raises(InvalidArgument) as info:
        client.check(request_)
    assert info.value.details.startswith(f"{field}:"), info.value.details
    assert "Traceback" not in info.value.details
    assert client.check(DIGITS[3]).prediction.class_name == "3"


def test_server_options_carry_the_connection_age_unless_it_is_off():
    from axguard.config import load_settings
    from axguard.transport.server import server_options

    options = dict(server_options(load_settings()))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 300_000
    off = dict(server_options(load_settings(server={"max_connection_age_seconds": 0})))
    assert "grpc.max_connection_age_ms" not in off
    assert off["grpc.max_receive_message_length"] == 64 * 1024 * 1024


def test_a_health_watch_is_not_a_call_in_flight(demo_server):
    """Clients that health-check hold a Watch open for their connection's life; counted in
    flight, it would hold every drain to its full grace period."""
    channel = grpc.insecure_channel(demo_server.target)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert demo_server.parts.interceptor.active == 0
    finally:
        watch.cancel()
        channel.close()


def test_drain_finishes_while_health_watching_clients_leave(demo_engine):
    """Balancing clients watch health and leave when they read NOT_SERVING. With
    grpcio-health-checking's own servicer this deadlocked the drain of a server with two or
    more watchers (a status send waits for gRPC's completion thread, which waits for the
    servicer's lock in a leaving stream's close callback): SIGTERM hung until SIGKILL."""
    import threading

    from axguard.transport.server import drain

    server = RunningServer(demo_engine)
    channels = [grpc.insecure_channel(server.target) for _ in range(8)]
    saw_not_serving = threading.Semaphore(0)

    def watch_then_leave(channel: grpc.Channel) -> None:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            for response in stream:
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    saw_not_serving.release()
                    channel.close()  # as a round-robin client drops a draining backend
                    return
        except grpc.RpcError:
            pass

    watchers = [threading.Thread(target=watch_then_leave, args=(c,), daemon=True)
                for c in channels]
    for w in watchers:
        w.start()
    deadline = time.monotonic() + 30
    while server.parts.health.watcher_count("") < 8:
        assert time.monotonic() < deadline, "the watches did not start"
    drained = threading.Thread(target=drain, args=(server.parts, 2.0), daemon=True)
    drained.start()
    drained.join(timeout=60)  # a hang, not a speed: a drain takes about 2 s here
    try:
        assert not drained.is_alive(), "drain deadlocked with health watchers leaving"
        for _ in channels:
            assert saw_not_serving.acquire(timeout=30), "a watcher never read NOT_SERVING"
    finally:
        server.plane.close()


def test_health_answers_clients_arriving_while_others_leave(demo_server):
    """Each health-checking client opens a Watch on its connection and closes it when it
    leaves. With grpcio-health-checking's own servicer a Watch arriving while another
    stream closed deadlocked the health service for good (its first answer is sent under
    the lock the closing stream's callback waits for): every later client hung."""
    from concurrent.futures import ThreadPoolExecutor

    def arrive_and_leave(_: int) -> str:
        channel = grpc.insecure_channel(demo_server.target)
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        try:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(next(stream).status)
        except grpc.RpcError as err:
            return err.code().name
        finally:
            channel.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(arrive_and_leave, range(120)))
    assert set(answers) == {"SERVING"}, sorted(set(answers))
    # Every leaving stream's close callback ran and forgot it (they run asynchronously).
    deadline = time.monotonic() + 30
    while demo_server.parts.health.watcher_count("") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert demo_server.parts.health.watcher_count("") == 0


def requests_counted(server: RunningServer, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "axguard_grpc_requests_total", {"grpc_method": method, "grpc_code": code}) or 0.0


def test_a_request_over_a_limit_is_resource_exhausted_and_never_retried(demo_engine):
    server = RunningServer(demo_engine, max_image_bytes=1000, max_batch_items=4)
    try:
        with AxguardClient(server.target, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="image.encoded") as info:
                c.check(np_png(64))
            # The server's pushback -1 says a retry would fail again: one attempt only.
            assert info.value.retry_after is None
            assert requests_counted(server, "Check", "RESOURCE_EXHAUSTED") == 1
            # Past the batch limit: refused whole, naming the field, not retried either.
            stub = pb_grpc.ConfidenceServiceStub(c._channel)
            five = pb.CheckBatchRequest(requests=[
                pb.CheckRequest(image=pb.Image(encoded=DIGITS[0].read_bytes()))] * 5)
            with pytest.raises(grpc.RpcError) as raw:
                stub.CheckBatch(five, timeout=30)
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raw.value.details().startswith("requests: has 5 items, limit 4")
            assert ("grpc-retry-pushback-ms", "-1") in [
                (m.key, m.value) for m in raw.value.trailing_metadata()]
            assert requests_counted(server, "CheckBatch", "RESOURCE_EXHAUSTED") == 1
            # The client splits a longer list into calls within the limit, in order.
            before = requests_counted(server, "CheckBatch", "OK")
            answers = c.check_batch(DIGITS[:10])
            assert [a.prediction.class_name for a in answers] == [
                p.stem.removeprefix("digit_") for p in DIGITS[:10]]
            assert requests_counted(server, "CheckBatch", "OK") - before == 3  # 4 + 4 + 2
    finally:
        server.stop()


def np_png(size: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class ExplodingNet(nn.Module):
    """Raises on an all-white image: stands in for a bug inside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 0.99).all()):
            raise RuntimeError("secret internal detail")
        return self.fc(x.flatten(1))


def test_unexpected_error_is_internal_without_detail_and_is_logged(caplog):
    spec = InputSpec(3, 4, 4, (0.0,) * 3, (1.0,) * 3)
    bundle = ModelBundle(wrap_network(ExplodingNet(), spec), spec, ["a", "b"], "boom", "1", "0")
    server = RunningServer(Engine(bundle, default_methods=["saliency"]))
    try:
        with AxguardClient(server.target, timeout=30) as c:
            white = np.ones((3, 4, 4), dtype="<f4")
            request = pb.CheckRequest(request_id="req-77", image=pb.Image(
                tensor=pb.Tensor(shape=[3, 4, 4], data=white.tobytes())))
            with caplog.at_level("ERROR", logger="axguard"), pytest.raises(ServerError) as info:
                c.check(request)
            assert info.value.code == grpc.StatusCode.INTERNAL
            assert "secret" not in info.value.details and "req-77" in info.value.details
            assert any(getattr(r, "request_id", None) == "req-77" for r in caplog.records)
            grey = np.full((3, 4, 4), 0.5, dtype="<f4")
            request.image.tensor.data = grey.tobytes()
            assert c.check(request).prediction.class_name in ("a", "b")
    finally:
        server.stop()


def test_not_serving_until_warm(demo_bundle):
    from axguard.config import load_settings
    from axguard.transport.server import build_server

    engine = Engine(demo_bundle)
    parts = build_server(load_settings(server={"port": 0}), engine)
    server, port = parts.server, parts.port
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ConfidenceServiceStub(channel).Check(
                    pb.CheckRequest(image=pb.Image(encoded=DIGITS[0].read_bytes())), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None).wait()


def test_every_rpc_carries_the_error_decorator():
    rpcs = pb.DESCRIPTOR.services_by_name["ConfidenceService"].methods_by_name
    for name in rpcs:
        method = getattr(ConfidenceServicer, name)
        assert getattr(method, "__axguard_rpc__", False), name
        assert name in inspect.getsource(ConfidenceServicer)


def test_converters_round_trip(demo_engine):
    image = torch.rand(3, 32, 32)
    item = CheckItem(image, ("saliency", "layer_grad_cam"), ("product",), 7, True)
    limits = InputLimits(10**6, 10**6)
    back = request_to_item(item_to_request(item), demo_engine.bundle, limits)
    torch.testing.assert_close(back.image, item.image)
    assert (tuple(back.methods), tuple(back.ax_processes), back.label, back.return_heatmaps) == (
        item.methods, item.ax_processes, item.label, item.return_heatmaps)
    result = demo_engine.check([item])[0]
    again = response_to_result(result_to_response(result, "r"))
    assert again.class_index == result.class_index
    assert again.probabilities == pytest.approx(result.probabilities, rel=1e-6)
    assert [(s.method, s.ax_process, s.labelled_score is None) for s in again.scores] == [
        (s.method, s.ax_process, s.labelled_score is None) for s in result.scores]
    assert again.scores[0].score == pytest.approx(result.scores[0].score, rel=1e-6)
    torch.testing.assert_close(again.heatmaps["saliency"], result.heatmaps["saliency"])


def test_verdict_over_grpc_equals_the_offline_calibration_code(client, demo_engine):
    """Round trip: the served verdict is what calibration's own functions compute."""
    artifact = demo_engine.calibration
    for path in DIGITS[:4]:
        response = client.check(path, methods=["saliency"])
        assert [method_name(s.method) for s in response.co_scores] == ["saliency"]
        image = decode_image(path.read_bytes(), demo_engine.bundle.spec, max_pixels=10**7)
        _, batch = demo_engine.check_with_evidence([CheckItem(image, verdict_only=True)])
        risk, wrong, features = artifact.flag.verdicts(batch)
        assert response.verdict.risk == pytest.approx(float(risk[0]), rel=1e-5, abs=1e-7)
        assert response.verdict.likely_wrong == bool(wrong[0])
        assert response.verdict.threshold == pytest.approx(artifact.threshold.value)
        assert dict(response.verdict.features) == pytest.approx(
            {k: float(v[0]) for k, v in features.items()}, rel=1e-6)
    # verdict_only: the prediction and the verdict, no scores.
    only = client.check(DIGITS[0], verdict_only=True)
    assert only.verdict.calibrated and len(only.co_scores) == 0


def test_the_least_confident_wrong_test_digit_is_flagged(client, hardest_wrong_digit):
    """A real mistake of the demo model, sent as a PNG, gets the flag."""
    image, label = hardest_wrong_digit
    response = client.check(png_bytes(image))
    assert response.prediction.class_index != label
    assert response.verdict.likely_wrong
    assert response.verdict.risk > response.verdict.threshold


def test_decode_limits_follow_the_memory_budget():
    from axguard.config import load_settings
    from axguard.errors import ConfigError
    from axguard.serving.dataplane import input_limits

    mib = 2**20
    limits = input_limits(load_settings())
    assert limits.max_image_pixels == 640 * mib // 20  # 1 GiB − 384 MiB in flight, 2 decodes
    small = input_limits(load_settings(server={"memory_budget_mib": 128,
                                               "max_image_bytes": mib}))
    assert small.max_image_pixels == 104 * mib // 10
    with pytest.raises(ConfigError) as info:
        input_limits(load_settings(server={"max_image_pixels": 10**9}))
    assert info.value.field == "server.max_image_pixels"
    with pytest.raises(ConfigError) as info:
        input_limits(load_settings(server={"memory_budget_mib": 256}))
    assert info.value.field == "server.memory_budget_mib"


def test_an_image_over_the_budget_is_resource_exhausted(demo_engine):
    # 64 MiB − 8 × 3 × 1 MiB in flight: one decode of 40 MiB, 4.2 M pixels
    server = RunningServer(demo_engine, memory_budget_mib=64, max_image_bytes=2**20)
    try:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("L", (3000, 3000)).save(buffer, "PNG")  # 9 M pixels, a few KB of PNG
        with AxguardClient(server.target, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="image.encoded: image has 3000x3000"):
                c.check(buffer.getvalue())
            assert c.check(DIGITS[2]).prediction.class_name == "2"
    finally:
        server.stop()
