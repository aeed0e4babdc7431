"""Small helpers over the response messages (results stay protobuf messages)."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from .v1 import confidence_pb2 as pb


def tensor_array(tensor: pb.Tensor) -> np.ndarray:
    """Return a Tensor message as a float32 numpy array of its shape (a copy)."""
    shape = tuple(int(d) for d in tensor.shape)
    expected = 4 * int(np.prod(shape, dtype=np.int64))
    if len(tensor.data) != expected:
        raise ValueError(f"tensor has {len(tensor.data)} bytes for shape {shape}, "
                         f"expected {expected}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def heatmap_array(response: pb.CheckResponse, method: str | int) -> np.ndarray:
    """Return a CheckResponse's normalised heatmap of `method` ("saliency", "DECONVOLUTION"
    or an AttributionMethod value) as a C×H×W float32 array in [-1, 1]. The check must
    have been asked with return_heatmaps=True."""
    name = (pb.AttributionMethod.Name(method).removeprefix("ATTRIBUTION_METHOD_")
            if isinstance(method, int) else method).lower()
    if name not in response.heatmaps:
        present = ", ".join(sorted(response.heatmaps)) or "none"
        raise KeyError(f"no {name!r} heatmap in the response (present: {present}); ask "
                       "for it with methods=[...] and return_heatmaps=True")
    return tensor_array(response.heatmaps[name])


def to_dict(message: Message) -> dict[str, Any]:
    """Return a message as a dict with the proto's field names, every field present (zeros
    and false too), enums by name and bytes as base64: protobuf's JSON mapping."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
