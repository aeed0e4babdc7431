"""Non-finite numbers never reach a client: decoded pixels are checked like tensors, and an
item whose model output (logits, heatmap, CO score, verdict feature) is not finite fails
alone, with INVALID_ARGUMENT, a metric and a log line with its request id. A real user-style
model (tests/nonfinite_model.py) on a real server, real gRPC calls on both APIs, and
calibration on real digits."""

from __future__ import annotations

import io
import logging
import math

import grpc
import numpy as np
import pytest
import torch
from fuzzing import nonfinite_fields
from nonfinite_model import clear, demo_weights, marked
from PIL import Image

from axguard.calibration.calibrate import calibrate, collect
from axguard.calibration.datasets import LabelledImages
from axguard.calibration.evaluate import evaluate, format_evaluation
from axguard.demo.data import load_split
from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import load_bundle
from axguard.engine.preprocess import decode_image, image_to_tensor
from axguard.errors import InvalidInput, NonFiniteOutput
from axguard.flag.artifact import save_artifact
from axguard.flag.verdict import Family, FlagModel, RiskModel
from axguard.transport.oip import open_inference_grpc_pb2 as oip
from axguard.transport.oip import open_inference_grpc_pb2_grpc as oip_grpc
from axguard_client import AxguardClient
from axguard_client.errors import InvalidArgument
from axguard_client.v1 import confidence_pb2 as pb
from conftest import RunningServer

STAGE_OF_MARKER = {"nan": "logits", "inf": "logits", "gradient": "heatmap"}


def tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize(("values", "reason"), [
    (np.full((16, 16), np.nan, np.float32), "contain NaN or Inf"),
    (np.full((16, 16), np.inf, np.float32), "contain NaN or Inf"),
    (np.full((16, 16), -np.inf, np.float32), "contain NaN or Inf"),
    (np.full((16, 16), 1e30, np.float32), "must lie in [0, 1], found [1e+30, 1e+30]"),
    (np.linspace(0, 255, 256, dtype=np.float32).reshape(16, 16), "found [0, 255]"),
    (np.full((16, 16), -0.5, np.float64), "must lie in [0, 1]"),
    (np.full((16, 16), 2**20, np.int32), "mode I image must lie in [0, 65535]"),
    (np.full((16, 16), -3, np.int16), "found [-3, -3]"),
], ids=["nan", "inf", "-inf", "huge", "0-255 float", "negative float64", "int32 wide",
        "signed int16"])
def test_out_of_range_or_non_finite_tiff_pixels_are_refused_naming_the_field(
        demo_bundle, values, reason):
    data = tiff(values)
    with pytest.raises(InvalidInput) as info:
        decode_image(data, demo_bundle.spec, max_pixels=10**6, field="requests[3].image.encoded")
    assert info.value.field == "requests[3].image.encoded"
    assert reason in str(info.value)


def test_one_nan_pixel_in_a_large_float_image_is_found_before_the_shrink(demo_bundle):
    # 640 × 640 is box-reduced before the final resize: the check must see the original.
    values = np.random.default_rng(0).random((640, 640), dtype=np.float32)
    values[313, 17] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        decode_image(tiff(values), demo_bundle.spec, max_pixels=10**7)
    values[313, 17] = -1e-3  # one slightly negative pixel: still out of range
    with pytest.raises(InvalidInput, match="found"):
        decode_image(tiff(values), demo_bundle.spec, max_pixels=10**7)


@pytest.mark.parametrize("values", [
    np.random.default_rng(1).random((16, 16), dtype=np.float32),
    np.random.default_rng(1).random((16, 16)),  # float64 sample format
    np.full((16, 16), 40000, np.uint16),
    np.full((16, 16), 200, np.int32),
])
def test_in_range_wide_images_decode(demo_bundle, values):
    x = decode_image(tiff(values), demo_bundle.spec, max_pixels=10**6)
    assert torch.isfinite(x).all() and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_the_training_path_refuses_the_same_pixels(demo_bundle):
    # image_to_tensor is what training (demo, finetune) and calibration of builtin data use.
    image = Image.fromarray(np.full((8, 8), np.nan, np.float32), "F")
    with pytest.raises(InvalidInput, match="NaN"):
        image_to_tensor(image, demo_bundle.spec)


# ------------------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("nonfinite") / "weights.pt"
    torch.save(demo_weights(), path)
    return path


def marker_bundle(demo_bundle, weights, source="nonfinite_model:build"):
    return load_bundle(source, spec=demo_bundle.spec, class_names=demo_bundle.class_names,
                       weights=weights, name="nonfinite", version="1")


@pytest.fixture(scope="module")
def marker_engine(demo_bundle, weights):
    engine = Engine(marker_bundle(demo_bundle, weights))
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def digits(demo_bundle):
    x, y = load_split("test").tensors(demo_bundle.spec)
    return torch.stack([clear(img) for img in x[:6]]), y[:6]


def test_only_the_items_with_non_finite_outputs_fail_and_the_rest_equal_a_clean_batch(
        marker_engine, digits):
    x, _ = digits
    items = [x[0], marked(x[1], "nan"), x[2], marked(x[3], "inf"), x[4],
             marked(x[5], "gradient")]
    before = dict(marker_engine.nonfinite_outputs)
    results = marker_engine.check([CheckItem(img, label=1, return_heatmaps=True)
                                   for img in items])
    alone = marker_engine.check([CheckItem(x[i], label=1, return_heatmaps=True)
                                 for i in (0, 2, 4)])
    for k, marker in ((1, "nan"), (3, "inf"), (5, "gradient")):
        failed = results[k]
        assert isinstance(failed.error, NonFiniteOutput)
        assert failed.error.stage == STAGE_OF_MARKER[marker]
        assert str(failed.error) == ("the model's output for this input is not finite "
                                     f"({STAGE_OF_MARKER[marker]})")
        assert failed.logits == [] and failed.scores == [] and failed.heatmaps == {}
    for k, reference in zip((0, 2, 4), alone, strict=True):
        got = results[k]
        assert got.error is None
        assert got.class_index == reference.class_index
        np.testing.assert_allclose(got.logits, reference.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([s.score for s in got.scores],
                                   [s.score for s in reference.scores], rtol=1e-4, atol=1e-4)
        assert all(math.isfinite(v) for v in [*got.logits, *got.probabilities])
    after = marker_engine.nonfinite_outputs
    assert after.get("logits", 0) - before.get("logits", 0) == 2
    assert after.get("heatmap", 0) - before.get("heatmap", 0) == 1


def test_a_non_finite_co_score_fails_its_item(demo_bundle, weights, digits):
    # NaN whenever an input leaves [0, 1] by more than 0.005: images never do, AX inputs
    # x + h with SUM do (the heatmap peaks at ±1).
    engine = Engine(marker_bundle(demo_bundle, weights, "nonfinite_model:build_nan_below_zero"))
    x, _ = digits
    prediction = engine.check([CheckItem(x[0], prediction_only=True)])[0]
    assert prediction.error is None and all(map(math.isfinite, prediction.logits))
    result = engine.check([CheckItem(x[0], methods=["saliency"])])[0]
    assert isinstance(result.error, NonFiniteOutput) and result.error.stage == "co_score"
    assert engine.nonfinite_outputs == {"co_score": 1}


def perturbation_flag(threshold: float) -> FlagModel:
    families = [Family(name="msp"), Family(name="perturbation", epsilon=0.01)]
    names = ["neg_log_1m_msp", "perturbed_neg_log_1m_msp:0.01"]
    return FlagModel(families=families, mode="false_alarm", threshold=threshold,
                     risk_model=RiskModel(features=names, mean=[0.0, 0.0], scale=[1.0, 1.0],
                                          coef=[-1.0, -1.0], intercept=0.0,
                                          regularisation_c=1.0))


def test_a_non_finite_verdict_feature_fails_its_item(demo_bundle, weights, digits,
                                                     demo_calibration):
    bundle = marker_bundle(demo_bundle, weights, "nonfinite_model:build_nan_below_zero")
    artifact = demo_calibration.model_copy(update={
        "flag": perturbation_flag(demo_calibration.flag.threshold),
        "model": demo_calibration.model.model_copy(update={"fingerprint": bundle.fingerprint})})
    engine = Engine(bundle, calibration=artifact)
    x, _ = digits
    # x − 0.01·sign(∇) leaves [0, 1] on the dark background: that forward is NaN.
    result = engine.check([CheckItem(x[0], verdict_only=True)])[0]
    assert isinstance(result.error, NonFiniteOutput) and result.error.stage == "verdict"
    assert engine.nonfinite_outputs == {"verdict": 1}


# ------------------------------------------------------------------------------ serving

@pytest.fixture(scope="module")
def marker_server(marker_engine):
    server = RunningServer(marker_engine)
    yield server
    server.stop()


def png(image: torch.Tensor) -> bytes:
    # Exact 0/1 survive PNG's 8 bits; the markers are exact 0 and 1.
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def all_finite(message) -> bool:  # noqa: ANN001
    return nonfinite_fields(message) == []


def test_check_answers_invalid_argument_and_the_server_counts_and_logs_it(
        marker_server, digits, caplog):
    x, _ = digits
    with AxguardClient(marker_server.target, timeout=60) as client:
        with caplog.at_level(logging.WARNING, logger="axguard.server"), \
                pytest.raises(InvalidArgument) as info:
            client.check(pb.CheckRequest(image=pb.Image(encoded=png(marked(x[1], "nan"))),
                                         request_id="req-nan"))
        assert info.value.details == ("image: the model's output for this input is not "
                                      "finite (logits)")
        logged = [r for r in caplog.records if r.getMessage() == "check_output_not_finite"]
        assert [(r.request_id, r.stage) for r in logged] == [("req-nan", "logits")]
        ok = client.check(png(x[0]))
        assert all_finite(ok) and ok.prediction.class_name
    metrics = marker_server.metrics.registry
    assert metrics.get_sample_value("axguard_nonfinite_outputs_total",
                                    {"model": "nonfinite", "stage": "logits"}) >= 1
    assert metrics.get_sample_value("axguard_nonfinite_outputs_total",
                                    {"model": "nonfinite", "stage": "verdict"}) == 0


def test_check_batch_fails_only_the_non_finite_items(marker_server, digits):
    x, _ = digits
    images = [x[0], marked(x[1], "inf"), x[2], marked(x[3], "gradient"), x[4]]
    with AxguardClient(marker_server.target, timeout=60) as client:
        responses = client.check_batch([png(img) for img in images])
    assert [r.HasField("error") for r in responses] == [False, True, False, True, False]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[1].error.message == ("requests[1].image: the model's output for this "
                                          "input is not finite (logits)")
    assert responses[3].error.message.endswith("not finite (heatmap)")
    assert not responses[1].HasField("prediction") and not responses[1].receipt
    for k in (0, 2, 4):
        assert all_finite(responses[k]) and responses[k].prediction.class_name


def test_open_inference_protocol_names_the_failed_item(marker_server, digits):
    x, _ = digits
    batch = torch.stack([x[0], x[2], marked(x[4], "nan")]).numpy()
    tensor = oip.ModelInferRequest.InferInputTensor(name="tensor", datatype="FP32",
                                                    shape=list(batch.shape))
    request = oip.ModelInferRequest(model_name="nonfinite", inputs=[tensor],
                                    raw_input_contents=[batch.astype("<f4").tobytes()])
    with grpc.insecure_channel(marker_server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == ("inputs[0][2]: the model's output for this input is "
                                        "not finite (logits)")
        del request.raw_input_contents[:]
        clean = batch[:2]
        request.inputs[0].shape[:] = list(clean.shape)
        request.raw_input_contents.append(clean.astype("<f4").tobytes())
        response = stub.ModelInfer(request, timeout=60)
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if out.datatype == "FP32":
            assert np.isfinite(np.frombuffer(raw, "<f4")).all(), out.name


def test_metrics_endpoint_lists_every_stage_from_zero(marker_server):
    from prometheus_client import generate_latest

    text = generate_latest(marker_server.metrics.registry).decode()
    for stage in ("logits", "heatmap", "co_score", "verdict"):
        assert f'axguard_nonfinite_outputs_total{{model="nonfinite",stage="{stage}"}}' in text


# ------------------------------------------------------------------------------ calibration

def test_calibration_leaves_out_and_reports_images_with_non_finite_outputs(
        marker_engine, demo_bundle, tmp_path):
    split = load_split("calibration")
    images = [image_to_tensor(img, demo_bundle.spec) for img in split.images]
    images = [clear(img) for img in images]
    bad = {7: "nan", 100: "inf", 333: "gradient"}
    for k, marker in bad.items():
        images[k] = marked(images[k], marker)
    names = [f"digit-{k}" for k in range(len(images))]
    loaders = [(lambda spec, img=img: img) for img in images]
    data = LabelledImages("test:digits-with-markers", names,
                          [int(v) for v in split.labels], loaders)
    collected = collect(marker_engine, data, [("saliency", "sum")], progress=False)
    assert collected.left_out == [(f"digit-{k}", STAGE_OF_MARKER[m]) for k, m in bad.items()]
    assert len(collected.names) == len(collected.labels) == len(images) - 3
    assert np.isfinite(collected.evidence.logits).all()
    assert all(np.isfinite(v).all() for v in collected.co_labelled.values())

    artifact = calibrate(marker_engine, data, families=["logit"], n_bootstrap=50,
                         selection_resamples=50, progress=False)
    assert artifact.data.n_images == len(images) - 3
    assert artifact.notes[0].startswith("3 images were left out because the model's output "
                                        "for them was not finite: digit-7 (logits), "
                                        "digit-100 (logits), digit-333 (heatmap)")
    assert all(math.isfinite(m.auroc.value) for m in artifact.metrics)
    saved = save_artifact(artifact, tmp_path / "calibration.json")
    evaluation = evaluate(Engine(marker_engine.bundle, calibration=saved), data,
                          n_bootstrap=50, progress=False)
    assert evaluation.n_images == len(images) - 3 and len(evaluation.left_out) == 3
    assert "3 images were left out" in format_evaluation(evaluation)


def test_the_fuzzers_scan_finds_nan_and_inf_anywhere_in_an_answer():
    clean = pb.CheckResponse(prediction=pb.Prediction(logits=[1.0, 2.0], probability=0.7),
                             verdict=pb.Verdict(risk=0.1, features={"msp": 0.7}))
    assert nonfinite_fields(clean) == []
    nested = pb.CheckBatchResponse(responses=[clean, pb.CheckResponse(
        prediction=pb.Prediction(logits=[1.0, math.nan]),
        co_scores=[pb.CoScore(score=math.inf)],
        verdict=pb.Verdict(features={"margin": -math.inf}))])
    assert sorted(nonfinite_fields(nested)) == [
        "responses[1].co_scores[0].score", "responses[1].prediction.logits",
        "responses[1].verdict.features[margin]"]


def test_the_paper_figures_refuse_data_with_non_finite_outputs_naming_the_image(
        marker_engine, digits):
    from axguard.paper.figures import co_table

    x, y = digits
    images = [x[0], x[1], marked(x[2], "inf")]
    data = LabelledImages("test:marked", ["a.png", "b.png", "c.png"],
                          [int(v) for v in y[:3]], [(lambda spec, img=img: img)
                                                    for img in images])
    with pytest.raises(InvalidInput, match=r"^c\.png: the model's output for this input is "
                                           r"not finite \(logits\)"):
        co_table(marker_engine, data, batch_size=2)
