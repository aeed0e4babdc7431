"""Triton's own client (`tritonclient[grpc]` from PyPI) against a running axguard server:
readiness, metadata, BYTES and FP32 (raw contents), requested outputs, a batch of 16, bad
input. tritonclient needs protobuf < 7, so it lives in .venv-triton (made by `make test`)
and runs as a subprocess (tests/triton_driver.py)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from axguard.demo.data import load_split
from axguard_client.v1 import confidence_pb2 as pb
from conftest import ROOT, png_bytes

# Triton's client in its own virtual environment.
pytestmark = pytest.mark.system

TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"


@pytest.fixture(scope="module")
def report(demo_server, tmp_path_factory):
    assert TRITON_PYTHON.exists(), (
        f"{TRITON_PYTHON} is missing: run the tests with `make test`, which creates it")
    folder = tmp_path_factory.mktemp("triton")
    images = load_split("test").images[:16]
    for i, image in enumerate(images):
        (folder / f"{i}.png").write_bytes(png_bytes(image))
    tensor = np.random.default_rng(3).random((4, *demo_server.engine.bundle.spec.shape),
                                             dtype=np.float32)
    np.save(folder / "tensor.npy", tensor)
    done = subprocess.run(
        [str(TRITON_PYTHON), str(ROOT / "tests" / "triton_driver.py"), demo_server.target,
         demo_server.engine.bundle.name, str(folder), str(folder / "tensor.npy")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {"report": json.loads(done.stdout), "images": images, "tensor": tensor}


def test_readiness_and_metadata(report, demo_server):
    r = report["report"]
    assert r["live"] and r["ready"] and r["model_ready"]
    assert r["unknown_model_ready"]["status"] == "StatusCode.NOT_FOUND"
    assert r["server_metadata"]["name"] == "axguard"
    meta = r["model_metadata"]
    bundle = demo_server.engine.bundle
    assert meta["name"] == bundle.name and meta["versions"] == [bundle.version]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES",
                                                                   "tensor": "FP32"}
    assert [o["name"] for o in meta["outputs"]] == [
        "class_index", "probabilities", "logits", "risk", "likely_wrong", "co_scores",
        "receipt"]


def test_bytes_batch_of_16_equals_check(report, client):
    out = report["report"]["bytes_all"]
    assert out["id"] == "triton-1"
    assert out["returned"] == ["class_index", "probabilities", "logits", "risk",
                               "likely_wrong", "co_scores"]
    assert out["outputs"]["class_index"]["shape"] == [16]
    assert out["outputs"]["co_scores"]["shape"] == [16, 2]
    assert out["outputs"]["co_scores"]["parameters"]["columns"]["string_param"] == \
        "saliency/sum,deconvolution/sum"
    for i, image in enumerate(report["images"]):
        check = client.check(pb.CheckRequest(image=pb.Image(encoded=png_bytes(image))))
        assert out["outputs"]["class_index"]["values"][i] == check.prediction.class_index
        assert out["outputs"]["likely_wrong"]["values"][i] == check.verdict.likely_wrong
        np.testing.assert_allclose(out["outputs"]["co_scores"]["values"][i],
                                   [s.score for s in check.co_scores], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["outputs"]["risk"]["values"][i], check.verdict.risk,
                                   rtol=1e-4, atol=1e-6)


def test_fp32_raw_with_parameters_and_requested_outputs(report, client):
    out = report["report"]["fp32_requested"]
    assert out["returned"] == ["co_scores", "class_index", "receipt"]
    scores = out["outputs"]["co_scores"]
    assert scores["shape"] == [4, 4]
    assert scores["parameters"]["columns"]["string_param"] == (
        "saliency/sum,saliency/product,deconvolution/sum,deconvolution/product")
    for i, image in enumerate(report["tensor"]):
        check = client.check(pb.CheckRequest(
            image=pb.Image(tensor=pb.Tensor(shape=list(image.shape),
                                            data=image.astype("<f4").tobytes())),
            methods=[pb.ATTRIBUTION_METHOD_SALIENCY, pb.ATTRIBUTION_METHOD_DECONVOLUTION],
            ax_processes=[pb.AX_PROCESS_SUM, pb.AX_PROCESS_PRODUCT]))
        assert out["outputs"]["class_index"]["values"][i] == check.prediction.class_index
        np.testing.assert_allclose(scores["values"][i], [s.score for s in check.co_scores],
                                   rtol=1e-4, atol=1e-4)
    only = report["report"]["prediction_only"]
    assert only["returned"] == ["class_index", "probabilities", "logits"]
    assert only["outputs"]["class_index"]["values"] == out["outputs"]["class_index"]["values"]


def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(report):
    r = report["report"]
    assert r["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert r["bad_shape"]["message"].startswith("inputs[0].shape: [4, 1, 8, 8] must be")
    assert r["bad_output"]["message"].startswith("outputs[0].name: unknown output")
    assert r["bad_model"]["status"] == "StatusCode.NOT_FOUND"
    assert r["bad_values"]["message"].startswith("raw_input_contents[0]: values must lie")
    assert r["ready_after_errors"]
