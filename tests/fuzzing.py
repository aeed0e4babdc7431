"""A seeded generator of malformed and hostile requests over every RPC, and a runner.

Every case is sent as raw bytes through a generic channel (so unparsable protobuf is
possible) and names the status codes the README documents for it. The service must never
answer INTERNAL or UNKNOWN, and must keep serving. Used by tests/test_fuzz.py (a fast
subset in `make test`) and `make fuzz` (the whole run, written to bench/results/fuzz.json).
"""

from __future__ import annotations

import io
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

from axguard.oip import open_inference_grpc_pb2 as oip
from axguard.v1 import confidence_pb2 as pb

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
        "feedback", "model_infer",
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
        try:
            if case.rpc == "Diagnose":
                call = channel.unary_stream(SERVICE + "Diagnose", **identity)(
                    case.payload, timeout=case.timeout)
                if case.cancel_after is not None:
                    threading.Timer(case.cancel_after, call.cancel).start()
                for _ in call:
                    pass
            else:
                path = case.rpc if case.rpc.startswith("/") else SERVICE + case.rpc
                channel.unary_unary(path, **identity)(case.payload, timeout=case.timeout)
        except grpc.RpcError as err:
            code = err.code()
        with lock:
            codes[(case.kind, code.name)] += 1
            if code in FORBIDDEN or code not in case.allowed:
                violations.append(f"{case.kind} {case.rpc}: {code.name} "
                                  f"(allowed {sorted(c.name for c in case.allowed)})")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, cases))
    return FuzzReport(len(cases), codes, violations)
