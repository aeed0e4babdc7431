"""Converters between the Open Inference Protocol's messages and the data plane's types: the
BYTES encoding, the request's parameters and outputs, its one input → engine items, the
results → output tensors, the model's metadata."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...engine import scoring
from ...engine.core import CheckItem, CheckResult
from ...engine.preprocess import image_from_encoded, tensor_batch_from_bytes
from ...errors import InputTooLarge, InvalidInput
from ...serving.dataplane import Answers, ModelDescription
from . import open_inference_grpc_pb2 as oip

PLATFORM = "pytorch"


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor the protocol offers."""

    name: str
    datatype: str
    needs_check: bool
    """True when it comes from the heatmaps or the verdict (not with prediction_only)."""


OUTPUTS = (
    OutputSpec("class_index", "INT32", False),
    OutputSpec("probabilities", "FP32", False),
    OutputSpec("logits", "FP32", False),
    OutputSpec("risk", "FP32", True),
    OutputSpec("likely_wrong", "BOOL", True),
    OutputSpec("co_scores", "FP32", True),
    OutputSpec("receipt", "BYTES", True),
)
OUTPUT_BY_NAME = {o.name: o for o in OUTPUTS}
ON_REQUEST_ONLY = ("receipt",)
"""Outputs sent only when named (the others come when no output is named)."""

PARAMETERS = ("methods", "ax_processes", "prediction_only")
IGNORED_PARAMETERS = ("priority", "timeout")
"""Triton scheduling parameters a client may send; one queue here, deadlines from gRPC."""


# --- the BYTES tensor encoding ------------------------------------------------------------

def split_bytes_elements(raw: bytes, field: str) -> list[bytes]:
    """Return the elements of a raw BYTES tensor: each a 4-byte little-endian length and
    that many bytes (the protocol's serialisation)."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"ends inside an element's 4-byte length at byte {offset}",
                               field=field)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"element {len(elements)} declares {length} bytes, only "
                               f"{len(raw) - offset} are left", field=field)
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """Return the raw serialisation of BYTES elements (inverse of split_bytes_elements)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# --- request → engine items ---------------------------------------------------------------

@dataclass(frozen=True)
class InferOptions:
    """What the request's parameters ask for."""

    methods: tuple[str, ...] = ()
    ax_processes: tuple[str, ...] = ()
    prediction_only: bool = False


def parse_options(parameters: Any) -> InferOptions:
    """Return the options in a request's `parameters` map; unknown keys are refused."""
    methods: tuple[str, ...] = ()
    processes: tuple[str, ...] = ()
    prediction_only = False
    for key in sorted(parameters):
        value = parameters[key]
        choice = value.WhichOneof("parameter_choice")
        field = f"parameters.{key}"
        if key in ("methods", "ax_processes"):
            if choice != "string_param":
                raise InvalidInput("must be a string_param (comma-separated names)",
                                   field=field)
            # Validated once, by the engine's resolve (its errors are renamed there).
            names = tuple(n.strip() for n in value.string_param.split(",") if n.strip())
            if key == "methods":
                methods = names
            else:
                processes = names
        elif key == "prediction_only":
            if choice != "bool_param":
                raise InvalidInput("must be a bool_param", field=field)
            prediction_only = value.bool_param
        elif key not in IGNORED_PARAMETERS:
            raise InvalidInput(f"unknown parameter; valid: {', '.join(PARAMETERS)}",
                               field=field)
    return InferOptions(methods, processes, prediction_only)


def requested_outputs(request: Any, options: InferOptions) -> list[str]:
    """Return the output names to send, in the order asked (every default one when none)."""
    if not request.outputs:
        return [o.name for o in OUTPUTS if o.name not in ON_REQUEST_ONLY
                and not (options.prediction_only and o.needs_check)]
    names: list[str] = []
    for i, out in enumerate(request.outputs):
        field = f"outputs[{i}].name"
        spec = OUTPUT_BY_NAME.get(out.name)
        if spec is None:
            raise InvalidInput(f"unknown output {out.name!r}; valid: "
                               f"{', '.join(OUTPUT_BY_NAME)}", field=field)
        if out.name in names:
            raise InvalidInput(f"{out.name!r} is asked for twice", field=field)
        if spec.needs_check and options.prediction_only:
            raise InvalidInput(f"{out.name!r} needs the check; the request sets "
                               "prediction_only", field=field)
        names.append(out.name)
    return names


def input_images(request: Any, bundle: Any, limits: Any, max_items: int) -> list[torch.Tensor]:
    """Return the (C, H, W) images of the request's one input, validated."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"has {len(request.inputs)} inputs; send exactly one, named "
                           "'image' (BYTES) or 'tensor' (FP32)", field="inputs")
    tensor = request.inputs[0]
    raw = list(request.raw_input_contents)
    if len(raw) > 1:
        raise InvalidInput(f"has {len(raw)} entries for 1 input", field="raw_input_contents")
    if raw and tensor.HasField("contents"):
        raise InvalidInput("both contents and raw_input_contents are set; send one",
                           field="inputs[0].contents")
    data_field = "raw_input_contents[0]" if raw else "inputs[0].contents"
    shape = [int(s) for s in tensor.shape]
    if tensor.name == "image":
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"is {tensor.datatype!r}; input 'image' is BYTES",
                               field="inputs[0].datatype")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise InvalidInput(f"{shape} must be [N] or [N, 1] with N >= 1",
                               field="inputs[0].shape")
        if shape[0] > max_items:
            raise InputTooLarge(f"has {shape[0]} images, limit {max_items}",
                                field="inputs[0].shape")
        elements = (split_bytes_elements(raw[0], data_field) if raw
                    else list(tensor.contents.bytes_contents))
        if len(elements) != shape[0]:
            raise InvalidInput(f"holds {len(elements)} elements, the shape says {shape[0]}",
                               field=data_field)
        return [image_from_encoded(e, bundle.spec, limits, f"{data_field}[{i}]")
                for i, e in enumerate(elements)]
    if tensor.name == "tensor":
        if tensor.datatype != "FP32":
            raise InvalidInput(f"is {tensor.datatype!r}; input 'tensor' is FP32",
                               field="inputs[0].datatype")
        data = raw[0] if raw else np.asarray(tensor.contents.fp32_contents, "<f4").tobytes()
        batch = tensor_batch_from_bytes(shape, data, bundle.spec, shape_field="inputs[0].shape",
                                        data_field=data_field, max_items=max_items)
        return list(batch)
    raise InvalidInput(f"unknown input {tensor.name!r}; send 'image' (BYTES, encoded "
                       "images) or 'tensor' (FP32, [N, C, H, W] in [0, 1])",
                       field="inputs[0].name")


# --- engine results → response ------------------------------------------------------------

def co_columns(pairs: Sequence[tuple[str, str]]) -> str:
    """Return the `columns` parameter of co_scores: "method/process" pairs, comma-separated."""
    return ",".join(f"{m}/{p}" for m, p in pairs)


def output_values(name: str, results: list[CheckResult], receipts: list[str]) -> np.ndarray:
    """Return output `name` for the results as an array of its protocol datatype."""
    if name == "class_index":
        return np.array([r.class_index for r in results], dtype="<i4")
    if name == "probabilities":
        return np.array([r.probabilities for r in results], dtype="<f4")
    if name == "logits":
        return np.array([r.logits for r in results], dtype="<f4")
    if name == "risk":
        # Without a calibration 0, as axguard.v1's Verdict (the `calibrated` parameter says
        # which): no answer carries NaN.
        return np.array([r.verdict.risk if r.verdict.calibrated else 0.0
                         for r in results], dtype="<f4")
    if name == "likely_wrong":
        return np.array([r.verdict.likely_wrong for r in results], dtype=bool)
    if name == "co_scores":
        return np.array([[s.score for s in r.scores] for r in results],
                        dtype="<f4").reshape(len(results), -1)
    if name == "receipt":
        return np.array([r.encode() for r in receipts], dtype=object)
    raise AssertionError(name)


def add_output(response: Any, name: str, values: np.ndarray, raw: bool) -> Any:
    """Append one output tensor to the response, raw or typed like the request."""
    spec = OUTPUT_BY_NAME[name]
    out = response.outputs.add(name=name, datatype=spec.datatype, shape=list(values.shape))
    if raw:
        response.raw_output_contents.append(
            join_bytes_elements(list(values)) if spec.datatype == "BYTES"
            else values.astype(values.dtype.newbyteorder("<")).tobytes())
    elif spec.datatype == "INT32":
        out.contents.int_contents.extend(values.tolist())
    elif spec.datatype == "FP32":
        out.contents.fp32_contents.extend(values.ravel().tolist())
    elif spec.datatype == "BOOL":
        out.contents.bool_contents.extend(values.tolist())
    else:
        out.contents.bytes_contents.extend(values.tolist())
    return out


def announced_items(request: Any, max_items: int) -> int:
    """How many images the request's one input says it holds (1 when it cannot say: the
    decoder then names what is wrong), at most `max_items` (the decoder refuses more)."""
    if len(request.inputs) == 1 and request.inputs[0].shape:
        return min(max(1, int(request.inputs[0].shape[0])), max_items)
    return 1


def item_decoder(request: Any, options: InferOptions, bundle: Any, limits: Any,
                 max_items: int) -> Callable[[int], CheckItem]:
    """Return decode(i) → the engine item of image i; the input is decoded once, on the
    first call (inside the data plane's arrival, so the batcher waits for it)."""
    images = functools.cache(lambda: input_images(request, bundle, limits, max_items))

    def decode(index: int) -> CheckItem:
        return CheckItem(images()[index], methods=options.methods,
                         ax_processes=options.ax_processes,
                         prediction_only=options.prediction_only, image_checked=True)

    return decode


def infer_field(index: int, field: str | None) -> str:
    """The request's name for an error of item `index`: the options are parameters, the
    item itself is row `index` of input 0 (the decoder names its own fields in full)."""
    if field in ("methods", "ax_processes"):
        return f"parameters.{field}"
    if field in (None, "image"):
        return f"inputs[0][{index}]"
    return field


def infer_response(request: Any, answers: Answers, names: list[str], name: str,
                   version: str) -> Any:
    """Return the ModelInferResponse: the requested outputs, typed or raw like the input."""
    results = [a.result for a in answers.items]
    receipts = [a.receipt for a in answers.items]
    response = oip.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    verdict = results[0].verdict
    response.parameters["calibrated"].bool_param = verdict.calibrated
    if verdict.calibrated:
        response.parameters["calibration_id"].string_param = verdict.calibration_id
        response.parameters["flag_threshold"].double_param = verdict.threshold
    raw = len(request.raw_input_contents) > 0
    for output in names:
        out = add_output(response, output, output_values(output, results, receipts), raw)
        if output == "co_scores":
            pairs = [(s.method, s.ax_process) for s in results[0].scores]
            out.parameters["columns"].string_param = co_columns(pairs)
    return response


def model_metadata(described: ModelDescription) -> Any:
    """Return the ModelMetadataResponse of the served model."""
    bundle, calibration = described.bundle, described.calibration
    classes, pairs = bundle.num_classes, described.default_pairs
    shapes = {"class_index": [-1], "probabilities": [-1, classes], "logits": [-1, classes],
              "risk": [-1], "likely_wrong": [-1], "co_scores": [-1, len(pairs)],
              "receipt": [-1]}
    meta = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=bundle.name, versions=[bundle.version], platform=PLATFORM,
        inputs=[meta(name="image", datatype="BYTES", shape=[-1]),
                meta(name="tensor", datatype="FP32", shape=[-1, *bundle.spec.shape])],
        outputs=[meta(name=o.name, datatype=o.datatype, shape=shapes[o.name])
                 for o in OUTPUTS],
        properties={
            "inputs": "send one: image (BYTES [N] or [N, 1], encoded PNG/JPEG/...) or "
                      "tensor (FP32 [N, C, H, W], values in [0, 1])",
            "co_scores_columns": co_columns(pairs),
            "class_names": json.dumps(bundle.class_names),
            "parameters": ", ".join(PARAMETERS),
            "methods_available": ",".join(described.available),
            "methods_report": json.dumps([dataclasses.asdict(s)
                                          for s in described.method_report]),
            "ax_processes_available": ",".join(scoring.AX_PROCESSES),
            "calibration_id": calibration.calibration_id if calibration else "",
            "flag_threshold": str(calibration.flag.threshold) if calibration else "",
            "outputs_on_request_only": ",".join(ON_REQUEST_ONLY),
        })
