"""Drives a running axguard server with the real `tritonclient[grpc]` package, as a Triton
pipeline would, and prints what it saw as JSON. Runs in its own virtual environment
(.venv-triton: tritonclient needs protobuf < 7, the project pins 7):

    .venv-triton/bin/python tests/triton_driver.py ADDRESS MODEL PNG_DIR TENSOR.npy

PNG_DIR holds 16 encoded digits (0.png … 15.png); TENSOR.npy a float32 [4, C, H, W] batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def error_of(call) -> dict:  # noqa: ANN001
    try:
        call()
    except InferenceServerException as err:
        return {"status": str(err.status()), "message": err.message()}
    return {"status": "OK", "message": ""}


def outputs_of(result, names: list[str]) -> dict:  # noqa: ANN001
    response = result.get_response(as_json=True)
    params = {o["name"]: o.get("parameters", {}) for o in response["outputs"]}
    out = {}
    for name in names:
        values = result.as_numpy(name)
        out[name] = {
            "shape": list(values.shape),
            "values": ([v.decode() for v in values.ravel()] if values.dtype == object
                       else values.tolist()),
            "parameters": params.get(name, {}),
        }
    return {"outputs": out, "returned": [o["name"] for o in response["outputs"]],
            "parameters": response.get("parameters", {}), "id": response.get("id", ""),
            "model_name": response.get("model_name", "")}


def main() -> int:
    address, model, png_dir, tensor_file = sys.argv[1:5]
    client = grpcclient.InferenceServerClient(url=address)
    report: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "unknown_model_ready": error_of(lambda: client.is_model_ready("no-such-model")),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
    }
    pngs = [(Path(png_dir) / f"{i}.png").read_bytes() for i in range(16)]
    images = grpcclient.InferInput("image", [16], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    all_names = ["class_index", "probabilities", "logits", "risk", "likely_wrong",
                 "co_scores"]
    report["bytes_all"] = outputs_of(client.infer(model, [images], request_id="triton-1"),
                                     all_names)

    tensor = np.load(tensor_file).astype(np.float32)
    floats = grpcclient.InferInput("tensor", list(tensor.shape), "FP32")
    floats.set_data_from_numpy(tensor)
    wanted = [grpcclient.InferRequestedOutput("co_scores"),
              grpcclient.InferRequestedOutput("class_index"),
              grpcclient.InferRequestedOutput("receipt")]
    report["fp32_requested"] = outputs_of(
        client.infer(model, [floats], outputs=wanted,
                     parameters={"methods": "saliency,deconvolution",
                                 "ax_processes": "sum,product"}),
        ["co_scores", "class_index", "receipt"])
    report["prediction_only"] = outputs_of(
        client.infer(model, [floats], parameters={"prediction_only": True}),
        ["class_index", "probabilities", "logits"])

    wrong_shape = grpcclient.InferInput("tensor", [4, 1, 8, 8], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((4, 1, 8, 8), np.float32))
    report["bad_shape"] = error_of(lambda: client.infer(model, [wrong_shape]))
    report["bad_output"] = error_of(lambda: client.infer(
        model, [floats], outputs=[grpcclient.InferRequestedOutput("saliency_map")]))
    report["bad_model"] = error_of(lambda: client.infer("no-such-model", [floats]))
    out_of_range = grpcclient.InferInput("tensor", list(tensor.shape), "FP32")
    out_of_range.set_data_from_numpy(tensor * 3.0 + 1.0)
    report["bad_values"] = error_of(lambda: client.infer(model, [out_of_range]))
    report["ready_after_errors"] = client.is_server_ready()
    print(json.dumps(report))
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
