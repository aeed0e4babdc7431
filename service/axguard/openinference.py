"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) on the same
port as axguard.v1, so Triton and KServe clients call axguard unchanged.

The served model is the one model, under its name and version. Inputs: `image` (BYTES,
shape [N] or [N, 1], encoded images) or `tensor` (FP32, [N, C, H, W] in [0, 1]). Outputs,
each returned only when requested (all but `receipt` when none are named): `class_index`
(INT32 [N]), `probabilities` and `logits` (FP32 [N, C]), `risk` (FP32 [N]; 0 without a
calibration, as in axguard.v1: never NaN), `likely_wrong` (BOOL [N]), `co_scores` (FP32
[N, K]; its `columns` parameter names the K method/AX-process pairs) and `receipt` (BYTES
[N], for Feedback). Request parameters: `methods` and `ax_processes` (comma-separated
strings), `prediction_only` (bool). Contents come typed (`contents`) or raw
(`raw_input_contents`, as Triton's client sends them); the answer uses the same form.

Pure translation: the items go through the same dynamic batcher as Check, errors are the
engine's (one status table in server.py) with messages naming the input.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from . import __version__, scoring
from .converters import image_from_encoded
from .dataplane import DataPlane
from .engine import DEFAULT_AX_PROCESSES, CheckItem, CheckResult
from .errors import InputTooLarge, InvalidInput, NonFiniteOutput, NotFound
from .oip import open_inference_grpc_pb2 as oip
from .oip import open_inference_grpc_pb2_grpc as oip_grpc
from .preprocess import tensor_batch_from_bytes
from .rpc import rpc_method

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

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
        return [image_from_encoded(e, bundle, limits, f"{data_field}[{i}]")
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


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data plane that axguard.v1 uses too (one
    queue, one set of counters and receipts for both APIs)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.engine = plane.engine

    def _model(self, name: str, version: str, prefix: str = "") -> None:
        """Raise NotFound unless (name, version) is the served model ("" = any version)."""
        bundle = self.engine.bundle
        if name != bundle.name:
            raise NotFound(f"model {name!r} is not served here; this server serves "
                           f"{bundle.name!r}", field=f"{prefix}name")
        if version and version != bundle.version:
            raise NotFound(f"version {version!r} of {name!r} is not served; served: "
                           f"{bundle.version!r}", field=f"{prefix}version")

    @rpc_method
    def ServerLive(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        return oip.ServerLiveResponse(live=True)

    @rpc_method
    def ServerReady(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                    request_id: str) -> Any:
        return oip.ServerReadyResponse(ready=self.plane.ready)

    @rpc_method
    def ModelReady(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        self._model(request.name, request.version)
        return oip.ModelReadyResponse(ready=self.plane.ready)

    @rpc_method
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                       request_id: str) -> Any:
        return oip.ServerMetadataResponse(name="axguard", version=__version__, extensions=[])

    @rpc_method
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                      request_id: str) -> Any:
        self._model(request.name, request.version)
        bundle, engine = self.engine.bundle, self.engine
        classes = bundle.num_classes
        pairs = [(m, p) for m in engine.default_methods for p in DEFAULT_AX_PROCESSES]
        shapes = {"class_index": [-1], "probabilities": [-1, classes],
                  "logits": [-1, classes], "risk": [-1], "likely_wrong": [-1],
                  "co_scores": [-1, len(pairs)], "receipt": [-1]}
        calibration = engine.calibration
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
                "methods_available": ",".join(engine.available),
                "methods_report": json.dumps([dataclasses.asdict(s)
                                              for s in engine.method_report]),
                "ax_processes_available": ",".join(scoring.AX_PROCESSES),
                "calibration_id": calibration.calibration_id if calibration else "",
                "flag_threshold": str(calibration.flag.threshold) if calibration else "",
                "outputs_on_request_only": ",".join(ON_REQUEST_ONLY),
            })

    @rpc_method
    def ModelInfer(self, request: Any, context: grpc.ServicerContext,  # noqa: N802
                   request_id: str) -> Any:
        start = time.perf_counter()
        plane = self.plane
        plane.ensure_ready()
        self._model(request.model_name, request.model_version, "model_")
        options = parse_options(request.parameters)
        names = requested_outputs(request, options)
        announced = 1
        if len(request.inputs) == 1 and request.inputs[0].shape:
            announced = min(max(1, int(request.inputs[0].shape[0])), plane.max_batch_items)
        with plane.arriving(announced) as arrival:
            images = input_images(request, self.engine.bundle, plane.limits,
                                  plane.max_batch_items)
            items = [self._resolve(CheckItem(image, methods=options.methods,
                                             ax_processes=options.ax_processes,
                                             prediction_only=options.prediction_only,
                                             image_checked=True))
                     for image in images]
            try:  # one answer for the whole tensor: an item that fails fails the request
                results, receipts = plane.check(
                    items, [f"{request_id}-{i}" for i in range(len(items))],
                    timeout=context.time_remaining(), arrival=arrival, started=start,
                    all_or_none=True)
            except NonFiniteOutput as err:
                err.field = f"inputs[0][{err.index}]"
                raise
        bundle = self.engine.bundle
        response = oip.ModelInferResponse(model_name=bundle.name, model_version=bundle.version,
                                          id=request.id)
        verdict = results[0].verdict
        response.parameters["calibrated"].bool_param = verdict.calibrated
        if verdict.calibrated:
            response.parameters["calibration_id"].string_param = verdict.calibration_id
            response.parameters["flag_threshold"].double_param = verdict.threshold
        raw = len(request.raw_input_contents) > 0
        for name in names:
            out = add_output(response, name, output_values(name, results, receipts), raw)
            if name == "co_scores":
                pairs = [(s.method, s.ax_process) for s in results[0].scores]
                out.parameters["columns"].string_param = co_columns(pairs)
        return response

    def _resolve(self, item: CheckItem) -> CheckItem:
        """engine.resolve, with the request's field names in its errors."""
        try:
            return self.plane.resolve(item)
        except InvalidInput as err:
            err.field = (f"parameters.{err.field}" if err.field in ("methods", "ax_processes")
                         else f"inputs[0].{err.field}")
            raise


def add_to_server(plane: DataPlane, server: grpc.Server) -> InferenceServicer:
    """Serve inference.GRPCInferenceService on `server` next to axguard.v1."""
    servicer = InferenceServicer(plane)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
