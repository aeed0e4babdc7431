"""The Open Inference Protocol (KServe v2) on axguard's port: a real server, real gRPC calls
with the protocol's own stubs, real digits; answers compared with axguard.v1's Check."""

from __future__ import annotations

import json
import math
import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from axguard.demo.data import load_split
from axguard.errors import InvalidInput
from axguard.transport.oip import open_inference_grpc_pb2 as oip
from axguard.transport.oip import open_inference_grpc_pb2_grpc as oip_grpc
from axguard.transport.oip.converters import join_bytes_elements, split_bytes_elements
from axguard_client.v1 import confidence_pb2 as pb
from conftest import RunningServer, png_bytes


@pytest.fixture(scope="module")
def digits():
    split = load_split("test")
    return split.images[:16]


@pytest.fixture()
def stub(demo_server):
    with grpc.insecure_channel(demo_server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def bytes_input(images, raw: bool = True):
    data = [png_bytes(im) for im in images]
    tensor = oip.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES",
                                                    shape=[len(data)])
    if raw:
        return tensor, [join_bytes_elements(data)]
    tensor.contents.bytes_contents.extend(data)
    return tensor, []


def tensor_input(x: np.ndarray, raw: bool = True):
    tensor = oip.ModelInferRequest.InferInputTensor(name="tensor", datatype="FP32",
                                                    shape=list(x.shape))
    if raw:
        return tensor, [x.astype("<f4").tobytes()]
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return tensor, []


def infer(stub, model: str, given, outputs=(), **parameters):
    tensor, raw = given
    request = oip.ModelInferRequest(model_name=model, id="req-1", inputs=[tensor],
                                    raw_input_contents=raw)
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = value
    return stub.ModelInfer(request, timeout=60)


def decoded(response) -> dict[str, np.ndarray]:
    """Output name → array, from raw or typed contents."""
    kinds = {"INT32": "<i4", "FP32": "<f4", "BOOL": "?"}
    out = {}
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if response.raw_output_contents:
            raw = response.raw_output_contents[i]
            if tensor.datatype == "BYTES":
                values = np.array(split_bytes_elements(raw, "raw"), dtype=object)
            else:
                values = np.frombuffer(raw, dtype=kinds[tensor.datatype])
        else:
            c = tensor.contents
            values = np.array({"INT32": c.int_contents, "FP32": c.fp32_contents,
                               "BOOL": c.bool_contents, "BYTES": c.bytes_contents}
                              [tensor.datatype])
        out[tensor.name] = values.reshape(shape)
    return out


def test_bytes_elements_by_hand():
    joined = join_bytes_elements([b"ab", b"", b"xyz"])
    assert joined == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00xyz"
    assert split_bytes_elements(joined, "f") == [b"ab", b"", b"xyz"]
    with pytest.raises(InvalidInput, match="declares 5 bytes, only 2"):
        split_bytes_elements(struct.pack("<I", 5) + b"ab", "raw_input_contents[0]")
    with pytest.raises(InvalidInput, match="4-byte length"):
        split_bytes_elements(b"\x01\x00", "raw_input_contents[0]")


def test_readiness_and_metadata_agree_with_health(stub, demo_server):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    name = demo_server.engine.bundle.name
    assert stub.ModelReady(oip.ModelReadyRequest(name=name)).ready
    with grpc.insecure_channel(demo_server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelReady(oip.ModelReadyRequest(name="other"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("name: model 'other' is not served")
    meta = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert meta.name == "axguard" and meta.version
    model = stub.ModelMetadata(oip.ModelMetadataRequest(name=name))
    bundle = demo_server.engine.bundle
    assert model.name == name and list(model.versions) == [bundle.version]
    assert {(t.name, t.datatype, tuple(t.shape)) for t in model.inputs} == {
        ("image", "BYTES", (-1,)), ("tensor", "FP32", (-1, *bundle.spec.shape))}
    outputs = {t.name: (t.datatype, tuple(t.shape)) for t in model.outputs}
    assert outputs["probabilities"] == ("FP32", (-1, bundle.num_classes))
    assert outputs["co_scores"] == ("FP32", (-1, 2))
    assert model.properties["co_scores_columns"] == "saliency/sum,deconvolution/sum"
    assert json.loads(model.properties["class_names"]) == bundle.class_names
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(oip.ModelMetadataRequest(name=name, version="99"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_infer_bytes_equals_check(stub, client, demo_server, digits, raw):
    name = demo_server.engine.bundle.name
    response = infer(stub, name, bytes_input(digits, raw))
    assert bool(response.raw_output_contents) == raw
    assert response.id == "req-1" and response.model_name == name
    assert [o.name for o in response.outputs] == ["class_index", "probabilities", "logits",
                                                  "risk", "likely_wrong", "co_scores"]
    out = decoded(response)
    assert out["class_index"].shape == (16,) and out["probabilities"].shape == (16, 10)
    assert response.parameters["calibrated"].bool_param
    cols = response.outputs[5].parameters["columns"].string_param
    assert cols == "saliency/sum,deconvolution/sum"
    for i, image in enumerate(digits):
        check = client.check(pb.CheckRequest(image=pb.Image(encoded=png_bytes(image))))
        assert out["class_index"][i] == check.prediction.class_index
        np.testing.assert_allclose(out["probabilities"][i], check.prediction.probabilities,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["co_scores"][i], [s.score for s in check.co_scores],
                                   rtol=1e-4, atol=1e-4)
        assert out["likely_wrong"][i] == check.verdict.likely_wrong
        assert math.isclose(out["risk"][i], check.verdict.risk, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_infer_tensor_with_parameters_and_requested_outputs(stub, demo_server, raw):
    x = np.random.default_rng(0).random((3, *demo_server.engine.bundle.spec.shape),
                                        dtype=np.float32)
    name = demo_server.engine.bundle.name
    response = infer(stub, name, tensor_input(x, raw), outputs=["co_scores", "receipt"],
                     methods="saliency", ax_processes="sum,product")
    assert [o.name for o in response.outputs] == ["co_scores", "receipt"]
    out = decoded(response)
    assert out["co_scores"].shape == (3, 2)
    assert response.outputs[0].parameters["columns"].string_param == \
        "saliency/sum,saliency/product"
    assert out["receipt"].shape == (3,)  # no feedback key on this server: empty receipts
    only = decoded(infer(stub, name, tensor_input(x, raw), prediction_only=True))
    assert sorted(only) == ["class_index", "logits", "probabilities"]


def test_a_batch_of_16_runs_as_one_engine_batch(stub, demo_server, digits):
    batcher = demo_server.plane.batcher
    before = batcher.stats.largest_batch
    batcher.stats.largest_batch = 0
    try:
        infer(stub, demo_server.engine.bundle.name, bytes_input(digits))
        assert batcher.stats.largest_batch == 16
    finally:
        batcher.stats.largest_batch = max(before, batcher.stats.largest_batch)


BAD = [
    ("wrong datatype", lambda x: (oip.ModelInferRequest.InferInputTensor(
        name="tensor", datatype="FP64", shape=list(x.shape)), [x.tobytes()]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype: is 'FP64'"),
    ("wrong shape", lambda x: tensor_input(x[:, :1]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape: [2, 1, 32, 32] must be [N, 3, 32, 32]"),
    ("short data", lambda x: (tensor_input(x)[0], [x.astype("<f4").tobytes()[:-4]]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]: has 24572 bytes"),
    ("NaN", lambda x: tensor_input(np.full_like(x, np.nan)), {},
     grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]: contains NaN"),
    ("out of range", lambda x: tensor_input(x + 2), {},
     grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]: values must lie in [0, 1]"),
    ("unknown input", lambda x: (oip.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="FP32", shape=list(x.shape)), [x.tobytes()]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name: unknown input 'pixels'"),
    ("not an image", lambda x: (oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1]), [join_bytes_elements([b"nope"])]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0][0]: cannot decode"),
    ("count mismatch", lambda x: (oip.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[3]), [join_bytes_elements([b"a"])]), {},
     grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]: holds 1 elements"),
    ("unknown method", lambda x: tensor_input(x), {"methods": "lime"},
     grpc.StatusCode.INVALID_ARGUMENT, "parameters.methods: "),
    ("unknown parameter", lambda x: tensor_input(x), {"colour": "red"},
     grpc.StatusCode.INVALID_ARGUMENT, "parameters.colour: unknown parameter"),
    ("too many", lambda x: tensor_input(np.zeros((300, 3, 32, 32), np.float32)), {},
     grpc.StatusCode.RESOURCE_EXHAUSTED, "inputs[0].shape: has 300 images, limit 256"),
]


@pytest.mark.parametrize("make, parameters, code, message", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_names_the_field_and_the_server_keeps_serving(
        stub, demo_server, make, parameters, code, message):
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as err:
        infer(stub, demo_server.engine.bundle.name, make(x), **parameters)
    assert err.value.code() == code
    assert err.value.details().startswith(message), err.value.details()
    assert stub.ServerReady(oip.ServerReadyRequest()).ready


def test_request_level_errors(stub, demo_server, digits):
    name = demo_server.engine.bundle.name
    with pytest.raises(grpc.RpcError) as err:
        infer(stub, "other", bytes_input(digits[:1]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("model_name: model 'other'")
    with pytest.raises(grpc.RpcError) as err:
        infer(stub, name, bytes_input(digits[:1]), outputs=["heatmap"])
    assert err.value.details().startswith("outputs[0].name: unknown output 'heatmap'")
    with pytest.raises(grpc.RpcError) as err:
        infer(stub, name, bytes_input(digits[:1]), outputs=["risk"], prediction_only=True)
    assert err.value.details().startswith("outputs[0].name: 'risk' needs the check")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(oip.ModelInferRequest(model_name=name), timeout=30)
    assert err.value.details().startswith("inputs: has 0 inputs")


def test_uncalibrated_risk_is_zero_never_nan_and_nothing_is_flagged(demo_bundle, digits):
    from axguard.engine.core import Engine

    server = RunningServer(Engine(demo_bundle))
    try:
        with grpc.insecure_channel(server.target) as channel:
            response = infer(oip_grpc.GRPCInferenceServiceStub(channel), demo_bundle.name,
                             bytes_input(digits[:2]))
        out = decoded(response)
        assert not response.parameters["calibrated"].bool_param
        assert (out["risk"] == 0).all() and not out["likely_wrong"].any()
    finally:
        server.stop()


def test_drain_makes_server_ready_false_and_health_not_serving(demo_bundle):
    from axguard.engine.core import Engine

    server = RunningServer(Engine(demo_bundle))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(oip.ServerReadyRequest()).ready
            server.health.enter_graceful_shutdown()
            server.plane.draining = True
            assert not stub.ServerReady(oip.ServerReadyRequest()).ready
            assert not stub.ModelReady(oip.ModelReadyRequest(name=demo_bundle.name)).ready
            assert stub.ServerLive(oip.ServerLiveRequest()).live
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()


def test_tokens_guard_inference_but_not_the_probes(demo_engine, tmp_path, digits):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token-for-tests\n")
    server = RunningServer(demo_engine, auth={"token_file": tokens})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(oip.ServerLiveRequest()).live
            assert stub.ServerReady(oip.ServerReadyRequest()).ready
            name = demo_engine.bundle.name
            for call in (lambda: infer(stub, name, bytes_input(digits[:1])),
                         lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name=name))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            tensor, raw = bytes_input(digits[:1])
            response = stub.ModelInfer(
                oip.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=raw),
                metadata=[("authorization", "Bearer s3cret-token-for-tests")], timeout=60)
            assert response.outputs[0].name == "class_index"
    finally:
        server.stop()
