"""A seeded generator of malformed and hostile requests over every RPC, and a runner.

Every case is sent as raw bytes through a generic channel (so unparsable protobuf is
possible) and names the status codes the README documents for it. The service must never
answer INTERNAL or UNKNOWN, and must keep serving. Used by tests/transport/test_fuzz.py (a fast
subset in `make test`) and `make fuzz` (the whole run, written to bench/results/fuzz.json).
"""

from __future__ import annotations

import io
import math
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from axguard.transport.oip import open_inference_grpc_pb2 as oip
from axguard_client.v1 import confidence_pb2 as pb

SERVICE = "/axguard.v1.ConfidenceService/"
INFER = "/inference.GRPCInferenceService/ModelInfer"
"""A Case's rpc that starts with "/" is a full method path (the Open Inference Protocol)."""
C = grpc.StatusCode
BAD = frozenset({C.INVALID_ARGUMENT})
BAD_OR_BIG = frozenset({C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED})
FORBIDDEN = frozenset({C.INTERNAL, C.UNKNOWN})


@dataclass(frozen=True)
class Case:
    """One hostile request: raw bytes for one RPC, and the codes it may get."""

    kind: str
    rpc: str
    payload: bytes
    allowed: frozenset
    timeout: float = 30.0
    cancel_after: float | None = None
    """Cancel the call after this many seconds (streams only)."""


def _digit(size: int = 8) -> Image.Image:
    rng = np.random.default_rng(size)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


def _encoded(fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image = _digit(16)
    if fmt == "GIF":
        image = image.convert("P")
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


CORPUS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}
ACCEPTED = ("PNG", "JPEG", "BMP", "TIFF")


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (a decompression bomb's header)."""
    data = bytearray(CORPUS["PNG"])
    struct.pack_into(">II", data, 16, width, height)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # a valid chunk CRC
    return bytes(data)


def _tiff_bad_tag(tag: int, type_code: int) -> bytes:
    data = bytearray(CORPUS["TIFF"])
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<H", data, entry + 2, type_code)
    return bytes(data)


def _float_tiff(rng: np.random.Generator) -> tuple[bytes, bool]:
    """A TIFF of a wide sample format (float32/64, int32, signed int16) and whether its
    pixels are valid: NaN, Inf, huge or out-of-range values, or a clean in-range image."""
    side = int(rng.choice([8, 16, 32, 300]))
    choice = int(rng.integers(8))
    values: np.ndarray = rng.random((side, side), dtype=np.float32)
    valid = False
    if choice == 0:
        values.ravel()[int(rng.integers(values.size))] = np.nan
    elif choice == 1:
        values.ravel()[int(rng.integers(values.size))] = float(rng.choice([np.inf, -np.inf]))
    elif choice == 2:
        values = np.full((side, side), float(rng.choice([1e30, 3e38, -1e30])), np.float32)
    elif choice == 3:
        values = (values * 255).astype(np.float64)  # a 0–255 float image: out of range
        values.ravel()[0] = 255.0
    elif choice == 4:
        values = rng.integers(-2**31, 2**31 - 1, (side, side), dtype=np.int64).astype(np.int32)
    elif choice == 5:
        values = rng.integers(-300, 0, (side, side)).astype(np.int16)
    else:  # in range: float32 or float64 in [0, 1]
        valid = True
        if choice == 7:
            values = values.astype(np.float64)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    return buffer.getvalue(), valid


def _check(image: pb.Image, **fields: object) -> bytes:
    return pb.CheckRequest(image=image, **fields).SerializeToString()


def _tensor(shape: list[int], values: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(shape=shape, data=values.astype("<f4").tobytes()))


FUZZ_KEY_ID = "fuzz"
FUZZ_SECRET = "fuzzing-secret-known-to-the-generator-0123456789"
"""The fuzz server's receipt key: the generator also forges well-signed receipts."""


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _feedback(rng: np.random.Generator) -> pb.FeedbackRequest:
    """Forged, mangled and validly signed receipts with odd payloads and labels."""
    import hashlib
    import hmac
    import json

    items = []
    for _ in range(int(rng.integers(0, 6))):
        choice = int(rng.integers(6))
        if choice == 0:
            receipt = rng.bytes(int(rng.integers(0, 300))).decode("latin-1")
        elif choice == 1:
            receipt = ".".join(["axr1", FUZZ_KEY_ID, _b64(rng.bytes(60)), _b64(rng.bytes(32))])
        elif choice == 2:
            receipt = "axr1." * int(rng.integers(1, 400))
        else:  # signed with the server's key: payloads a leaked key could produce
            body = [{"i": "x", "m": "0" * 16, "c": "", "k": 1, "r": None, "f": None, "t": 0},
                    {"i": 1, "m": None, "c": [], "k": "z", "r": "nan", "f": 3, "t": 1e300},
                    {"unexpected": True}, [1, 2], "text"][int(rng.integers(5))]
            payload = _b64(json.dumps(body).encode())
            signed = f"axr1.{FUZZ_KEY_ID}.{payload}"
            sig = hmac.new(FUZZ_SECRET.encode(), signed.encode(), hashlib.sha256).digest()
            receipt = f"{signed}.{_b64(sig)}"
        label = int(rng.choice([0, 3, -1, 10, 2**31 - 1, -(2**31)]))
        items.append(pb.LabelFeedback(receipt=receipt, label=label))
    if rng.random() < 0.05:
        items = items[:1] * 10_001  # over feedback.max_items
    return pb.FeedbackRequest(items=items)


def _model_infer(rng: np.random.Generator, model: str, shape: tuple[int, int, int],
                 good_png: bytes) -> oip.ModelInferRequest:
    """A mangled Open Inference Protocol request: lying shapes and lengths, odd datatypes,
    garbage BYTES elements, NaN, unknown parameters and outputs, a wrong model."""
    n = int(rng.integers(1, 4))
    choice = int(rng.integers(9))
    request = oip.ModelInferRequest(model_name=model if rng.random() > 0.1 else "zz")
    tensor = request.inputs.add(name="tensor", datatype="FP32", shape=[n, *shape])
    pixels = rng.random((n, *shape), dtype=np.float32)
    if choice == 0:  # garbage BYTES, honest or lying lengths
        tensor.name, tensor.datatype = "image", "BYTES"
        del tensor.shape[:]
        tensor.shape.extend([int(rng.choice([n, -1, 0, 2**40]))])
        elements = [rng.bytes(int(rng.integers(0, 60))) for _ in range(n)]
        raw = b"".join(struct.pack("<I", (len(e) + int(rng.integers(-2, 3))) % 2**32) + e
                       for e in elements)
        request.raw_input_contents.append(raw)
    elif choice == 1:  # a valid PNG, raw or typed
        tensor.name, tensor.datatype = "image", "BYTES"
        del tensor.shape[:]
        tensor.shape.extend([1, 1] if rng.random() < 0.5 else [1])
        if rng.random() < 0.5:
            request.raw_input_contents.append(struct.pack("<I", len(good_png)) + good_png)
        else:
            tensor.contents.bytes_contents.append(good_png)
    elif choice == 2:  # wrong raw length
        request.raw_input_contents.append(pixels.tobytes()[: int(rng.integers(0, 64))])
    elif choice == 3:  # NaN / out of range, typed contents
        pixels.ravel()[0] = float(rng.choice([np.nan, np.inf, 7.0, -1.0]))
        tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    elif choice == 4:  # lying shapes
        del tensor.shape[:]
        tensor.shape.extend(int(v) for v in rng.choice([-1, 0, 3, 32, 2**62],
                                                       int(rng.integers(0, 6))))
        request.raw_input_contents.append(pixels.tobytes())
    elif choice == 5:  # odd datatype, two inputs, or both raw and typed contents
        odd = int(rng.integers(3))
        if odd == 0:
            tensor.datatype = str(rng.choice(["FP16", "INT8", "BYTES", "", "fp32"]))
        elif odd == 1:
            request.inputs.add(name="image", datatype="BYTES", shape=[1])
        else:
            tensor.contents.fp32_contents.extend([0.5])
        request.raw_input_contents.append(pixels.tobytes())
    elif choice == 6:  # parameters of the wrong kind or unknown
        request.raw_input_contents.append(pixels.tobytes())
        key = str(rng.choice(["methods", "ax_processes", "prediction_only", "zzz"]))
        kind = int(rng.integers(3))
        if kind == 0:
            request.parameters[key].int64_param = int(rng.integers(-5, 5))
        elif kind == 1:
            request.parameters[key].string_param = rng.bytes(8).hex()
        else:
            request.parameters[key].bool_param = True
    elif choice == 7:  # outputs: unknown, repeated, or needing the check with prediction_only
        request.raw_input_contents.append(pixels.tobytes())
        for _ in range(int(rng.integers(1, 4))):
            request.outputs.add(name=str(rng.choice(["risk", "co_scores", "x", ""])))
        request.parameters["prediction_only"].bool_param = bool(rng.random() < 0.5)
    else:  # valid tensor
        request.raw_input_contents.append(pixels.tobytes())
    return request


def hostile_cases(seed: int, count: int, shape: tuple[int, int, int] = (3, 32, 32),
                  model: str = "digits-cnn") -> Iterator[Case]:
    """Yield `count` hostile cases, the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    good = _tensor(list(shape), np.full(shape, 0.5))
    kinds = [
        "random_bytes", "truncated", "bit_flipped", "header_fuzz", "other_format", "bomb",
        "tiff_tag_type", "bad_tensor", "bad_enum", "bad_label", "batch", "empty_batch",
        "diagnose_options", "unparsable", "tiny_deadline", "cancelled_stream", "model_info",
        "feedback", "model_infer", "float_tiff",
    ]
    for i in range(count):
        kind = kinds[int(rng.integers(len(kinds)))] if i >= len(kinds) else kinds[i]
        fmt = ACCEPTED[int(rng.integers(len(ACCEPTED)))]
        if kind == "random_bytes":
            data = rng.bytes(int(rng.integers(0, 2000)))
            yield Case(kind, "Check", _check(pb.Image(encoded=data)), BAD)
        elif kind == "truncated":
            data = CORPUS[fmt]
            cut = data[: int(rng.integers(0, len(data)))]
            yield Case(kind, "Check", _check(pb.Image(encoded=cut)), BAD | {C.OK})
        elif kind == "bit_flipped":
            data = bytearray(CORPUS[fmt])
            for _ in range(int(rng.integers(1, 20))):
                pos = int(rng.integers(len(data)))
                data[pos] ^= 1 << int(rng.integers(8))
            yield Case(kind, "Check", _check(pb.Image(encoded=bytes(data))),
                       BAD_OR_BIG | {C.OK})
        elif kind == "header_fuzz":
            data = bytearray(CORPUS[fmt])
            head = min(64, len(data))
            data[:head] = rng.bytes(head) if rng.random() < 0.3 else bytes(
                b if rng.random() > 0.1 else int(rng.integers(256)) for b in data[:head])
            yield Case(kind, "Check", _check(pb.Image(encoded=bytes(data))),
                       BAD_OR_BIG | {C.OK})
        elif kind == "other_format":
            other = ("GIF", "WEBP")[int(rng.integers(2))]
            yield Case(kind, "Check", _check(pb.Image(encoded=CORPUS[other])), BAD)
        elif kind == "bomb":
            side = int(rng.choice([20_000, 65_535, 100_000, 2**31 - 1]))
            yield Case(kind, "Check", _check(pb.Image(encoded=_png_with_size(side, side))),
                       BAD_OR_BIG)
        elif kind == "tiff_tag_type":
            tag = int(rng.choice([273, 279, 256, 257, 258, 259, 262, 277, 278]))
            yield Case(kind, "Check", _check(pb.Image(encoded=_tiff_bad_tag(
                tag, int(rng.integers(1, 13))))), BAD_OR_BIG | {C.OK})
        elif kind == "bad_tensor":
            choice = int(rng.integers(5))
            if choice == 0:
                bad = _tensor([int(s) for s in rng.integers(-3, 64, 3)], np.zeros(10))
            elif choice == 1:
                bad = pb.Image(tensor=pb.Tensor(shape=list(shape),
                                                data=rng.bytes(int(rng.integers(0, 100)))))
            elif choice == 2:
                bad = _tensor(list(shape), np.full(shape, rng.choice([np.nan, np.inf, -np.inf])))
            elif choice == 3:
                bad = _tensor(list(shape), rng.normal(0, 10, shape))
            else:
                bad = _tensor([2**40, 2**40, 3], np.zeros(3))
            yield Case(kind, "Check", _check(bad), BAD)
        elif kind == "bad_enum":
            field = ("methods", "ax_processes")[int(rng.integers(2))]
            values = [int(v) for v in rng.integers(-5, 50, int(rng.integers(1, 4)))]
            payload = pb.CheckRequest(image=good, **{field: values}).SerializeToString()
            allowed = BAD | ({C.OK} if all(0 < v <= (6 if field == "methods" else 2)
                                           for v in values) else set())
            yield Case(kind, "Check", payload, frozenset(allowed))
        elif kind == "bad_label":
            label = int(rng.choice([-1, 10, 2**31 - 1, -(2**31)]))
            only = rng.random() < 0.5
            yield Case(kind, "Check", _check(good, label=label, prediction_only=only), BAD)
        elif kind == "batch":
            items = []
            for _ in range(int(rng.integers(1, 6))):
                items.append(pb.CheckRequest(image=pb.Image(encoded=rng.bytes(50)))
                             if rng.random() < 0.5 else pb.CheckRequest(image=good))
            if rng.random() < 0.1:
                items = [pb.CheckRequest(image=good)] * 300  # over max_batch_items
            yield Case(kind, "CheckBatch",
                       pb.CheckBatchRequest(requests=items).SerializeToString(),
                       frozenset({C.OK, C.RESOURCE_EXHAUSTED}))
        elif kind == "empty_batch":
            yield Case(kind, "CheckBatch", b"", BAD)
        elif kind == "diagnose_options":
            request = pb.DiagnoseRequest(image=good, max_steps=int(rng.integers(-5, 3)))
            option = int(rng.integers(5))
            if option == 0:
                request.similarity_weight = float(rng.choice([3e38, -1.0, np.nan, np.inf]))
            elif option == 1:
                request.learning_rate = float(rng.choice([0.0, -1.0, 1e30, np.nan]))
            elif option == 2:
                request.target_class = int(rng.choice([-1, 10, 2**31 - 1]))
            elif option == 3:
                request.target_co = float(rng.choice([np.nan, np.inf, -np.inf]))
            else:
                request.snapshot_every = -int(rng.integers(1, 100))
            yield Case(kind, "Diagnose", request.SerializeToString(),
                       BAD | {C.OK, C.RESOURCE_EXHAUSTED})
        elif kind == "feedback":
            yield Case(kind, "Feedback", _feedback(rng).SerializeToString(),
                       frozenset({C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED,
                                  C.FAILED_PRECONDITION}))
        elif kind == "float_tiff":
            data, valid = _float_tiff(rng)
            how = int(rng.integers(3))
            if how == 0:
                yield Case(kind, "Check", _check(pb.Image(encoded=data)),
                           frozenset({C.OK}) if valid else BAD)
            elif how == 1:  # in a batch: only that item fails, the call is OK
                items = [pb.CheckRequest(image=good), pb.CheckRequest(image=pb.Image(
                    encoded=data)), pb.CheckRequest(image=good)]
                yield Case(kind, "CheckBatch",
                           pb.CheckBatchRequest(requests=items).SerializeToString(),
                           frozenset({C.OK}))
            else:  # the Open Inference Protocol's BYTES input
                request = oip.ModelInferRequest(model_name=model)
                request.inputs.add(name="image", datatype="BYTES", shape=[1])
                request.inputs[0].contents.bytes_contents.append(data)
                yield Case(kind, INFER, request.SerializeToString(),
                           frozenset({C.OK}) if valid else BAD)
        elif kind == "model_infer":
            request = _model_infer(rng, model, shape, CORPUS["PNG"])
            yield Case(kind, INFER, request.SerializeToString(),
                       frozenset({C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED,
                                  C.NOT_FOUND}))
        elif kind == "unparsable":
            rpc = ("Check", "CheckBatch", "Diagnose", "GetModelInfo",
                   "Feedback")[int(rng.integers(5))]
            data = b"\xff" + rng.bytes(int(rng.integers(0, 40)))
            # Unknown fields are legal protobuf: some garbage parses as an empty message.
            yield Case(kind, rpc, data, BAD | ({C.OK} if rpc == "GetModelInfo" else set()))
        elif kind == "tiny_deadline":
            yield Case(kind, "Check", _check(good), frozenset({C.OK, C.DEADLINE_EXCEEDED}),
                       timeout=0.001)
        elif kind == "cancelled_stream":
            request = pb.DiagnoseRequest(image=good, max_steps=2000, target_co=1e9)
            yield Case(kind, "Diagnose", request.SerializeToString(),
                       frozenset({C.CANCELLED, C.RESOURCE_EXHAUSTED}),
                       cancel_after=float(rng.uniform(0.0, 0.2)))
        else:
            yield Case(kind, "GetModelInfo", b"", frozenset({C.OK}))


def nonfinite_fields(message, path: str = "") -> list[str]:  # noqa: ANN001
    """Return the paths of every NaN or Inf float/double in a protobuf message (nested
    messages, repeated fields and maps included); [] when all are finite."""
    found: list[str] = []
    for descriptor, value in message.ListFields():
        name = f"{path}{descriptor.name}"
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            items = list(value.items())
            value_field = descriptor.message_type.fields_by_name["value"]
            for key, item in items:
                if value_field.message_type is not None:
                    found += nonfinite_fields(item, f"{name}[{key}].")
                elif isinstance(item, float) and not math.isfinite(item):
                    found.append(f"{name}[{key}]")
            continue
        values = list(value) if descriptor.is_repeated else [value]
        if descriptor.message_type is not None:
            for k, item in enumerate(values):
                found += nonfinite_fields(item, f"{name}[{k}]." if descriptor.is_repeated
                                          else f"{name}.")
        elif descriptor.type in (descriptor.TYPE_FLOAT, descriptor.TYPE_DOUBLE):
            found += [name for v in values if not math.isfinite(v)]
    return found


MARKERS = {"nan": (255, 0, None), "inf": (255, 255, None), "gradient": (0, 255, 0)}
"""tests/nonfinite_model.py's markers as 8-bit pixel values of channel 0, row 0."""


def _marked_png(rng: np.random.Generator, marker: str | None) -> tuple[np.ndarray, bytes]:
    """A 32 × 32 RGB image (uint8 and PNG) with a marker, or none (pixel 0 set to 128)."""
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[0, 0, 0] = 128
    for k, value in enumerate(MARKERS[marker] if marker else ()):
        if value is not None:
            pixels[0, k, 0] = value
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return pixels, buffer.getvalue()


def nonfinite_model_cases(seed: int, count: int, model: str = "nonfinite") -> Iterator[Case]:
    """Yield `count` valid requests to a server of tests/nonfinite_model.py, a third of them
    with markers that make its output NaN or Inf: a marked item answers INVALID_ARGUMENT
    (alone, in a batch), never OK with NaN; an unmarked one answers OK."""
    rng = np.random.default_rng(seed)
    kinds = ["marked_check", "marked_tensor", "marked_batch", "marked_infer",
             "marked_diagnose"]
    markers = [None, None, None, None, "nan", "inf", "gradient"]

    def pick() -> str | None:
        return markers[int(rng.integers(len(markers)))]

    def allowed(marker: str | None) -> frozenset:
        if marker is None:
            return frozenset({C.OK})
        return BAD if marker in ("nan", "inf") else frozenset({C.OK, C.INVALID_ARGUMENT})

    for i in range(count):
        kind = kinds[i % len(kinds)] if i < len(kinds) else kinds[int(rng.integers(len(kinds)))]
        marker = pick()
        pixels, png = _marked_png(rng, marker)
        options = {str(rng.choice(["prediction_only", "verdict_only", "return_heatmaps",
                                   "label"])): True} if rng.random() < 0.5 else {}
        if "label" in options:
            options["label"] = int(rng.integers(10))
        if kind == "marked_check":
            yield Case(kind, "Check", _check(pb.Image(encoded=png), **options), allowed(marker))
        elif kind == "marked_tensor":
            image = _tensor([3, 32, 32], pixels.transpose(2, 0, 1) / 255.0)
            yield Case(kind, "Check", _check(image, **options), allowed(marker))
        elif kind == "marked_batch":
            items = [pb.CheckRequest(image=pb.Image(encoded=_marked_png(rng, pick())[1]),
                                     **options) for _ in range(int(rng.integers(1, 6)))]
            yield Case(kind, "CheckBatch",
                       pb.CheckBatchRequest(requests=items).SerializeToString(),
                       frozenset({C.OK}))
        elif kind == "marked_infer":
            chosen = [marker, *(pick() for _ in range(int(rng.integers(0, 4))))]
            batch = np.stack([_marked_png(rng, m)[0] for m in chosen]).transpose(0, 3, 1, 2)
            request = oip.ModelInferRequest(model_name=model)
            request.inputs.add(name="tensor", datatype="FP32", shape=list(batch.shape))
            request.raw_input_contents.append((batch / 255.0).astype("<f4").tobytes())
            worst = ("nan" if any(m in ("nan", "inf") for m in chosen)
                     else "gradient" if "gradient" in chosen else None)
            yield Case(kind, INFER, request.SerializeToString(), allowed(worst))
        else:
            request = pb.DiagnoseRequest(image=pb.Image(encoded=png),
                                         max_steps=int(rng.integers(1, 6)))
            yield Case(kind, "Diagnose", request.SerializeToString(),
                       allowed(marker) | {C.RESOURCE_EXHAUSTED})


ANSWER_TYPES = {"Check": pb.CheckResponse, "CheckBatch": pb.CheckBatchResponse,
                "Diagnose": pb.DiagnoseEvent, "GetModelInfo": pb.ModelInfo,
                "Feedback": pb.FeedbackResponse, INFER: oip.ModelInferResponse}


def nonfinite_in_answer(rpc: str, answer: bytes) -> list[str]:
    """Return where an answer's serialized bytes hold NaN or Inf (typed fields, and the Open
    Inference Protocol's raw FP32 outputs)."""
    message = ANSWER_TYPES[rpc].FromString(answer)
    found = nonfinite_fields(message)
    if rpc == INFER:
        for out, raw in zip(message.outputs, message.raw_output_contents, strict=False):
            if out.datatype == "FP32" and not np.isfinite(np.frombuffer(raw, "<f4")).all():
                found.append(f"raw_output_contents[{out.name}]")
    return found


@dataclass
class FuzzReport:
    """What a run saw."""

    sent: int
    codes: Counter
    violations: list[str]


def run_cases(channel: grpc.Channel, cases: list[Case], threads: int = 8) -> FuzzReport:
    """Send every case from `threads` threads; return the codes and every violation."""
    codes: Counter = Counter()
    violations: list[str] = []
    lock = threading.Lock()
    identity = {"request_serializer": None, "response_deserializer": None}

    def one(case: Case) -> None:
        code = C.OK
        answers: list[bytes] = []
        try:
            if case.rpc == "Diagnose":
                call = channel.unary_stream(SERVICE + "Diagnose", **identity)(
                    case.payload, timeout=case.timeout)
                if case.cancel_after is not None:
                    threading.Timer(case.cancel_after, call.cancel).start()
                for event in call:
                    answers.append(event)
            else:
                path = case.rpc if case.rpc.startswith("/") else SERVICE + case.rpc
                answers.append(channel.unary_unary(path, **identity)(case.payload,
                                                                     timeout=case.timeout))
        except grpc.RpcError as err:
            code = err.code()
        # Every answer that came back, whatever the final status: no NaN or Inf in it.
        bad = [field for answer in answers for field in nonfinite_in_answer(case.rpc, answer)]
        with lock:
            codes[(case.kind, code.name)] += 1
            if code in FORBIDDEN or code not in case.allowed:
                violations.append(f"{case.kind} {case.rpc}: {code.name} "
                                  f"(allowed {sorted(c.name for c in case.allowed)})")
            if bad:
                violations.append(f"{case.kind} {case.rpc}: {code.name} answer holds "
                                  f"non-finite numbers at {bad[:5]}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, cases))
    return FuzzReport(len(cases), codes, violations)
