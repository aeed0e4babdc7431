"""What a pipeline holds, as an Image message: encoded bytes, a file path, a PIL image, a
numpy array or a torch tensor.

An array at the model's input size (and channels, or one channel for a three-channel model)
goes as a float32 tensor in [0, 1]: no encoding, exactly the pixels given. Any other array is
encoded without loss where a format allows (uint8 as PNG; one float channel as a float TIFF)
and the server converts and resizes it as it does a file; a float array of three or four
channels at another size is rounded to 8 bits for its PNG. Arrays are checked here first:
their shape, type and range, with an error naming the argument.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .v1 import confidence_pb2 as pb

CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA


class ImageError(ValueError):
    """An image the client cannot send; the message names the argument (`image`,
    `images[3]`)."""


@dataclass(frozen=True)
class ModelInput:
    """The served model's input: what an array must match to go as a raw tensor."""

    channels: int
    height: int
    width: int

    @classmethod
    def of(cls, info: pb.ModelInfo) -> ModelInput | None:
        """The input of a ModelInfo; None when it does not say."""
        shape = list(info.input_shape)
        return cls(*map(int, shape)) if len(shape) == 3 and min(shape) > 0 else None


def is_in_memory(image: Any) -> bool:
    """True for inputs that are pixels rather than a file (their conversion depends on the
    model's input)."""
    return not isinstance(image, bytes | bytearray | memoryview | str | os.PathLike
                          | pb.Image)


def to_image(image: Any, model: ModelInput | None = None, name: str = "image") -> pb.Image:
    """Return the Image message for one image (see the module's docstring); `model` (from
    ModelInfo) decides whether an array can go as a raw tensor."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        if len(image) == 0:
            raise ImageError(f"{name}: is empty")
        return pb.Image(encoded=bytes(image))
    if isinstance(image, str | os.PathLike):
        try:
            return pb.Image(encoded=Path(image).read_bytes())
        except OSError as err:
            raise ImageError(f"{name}: cannot read {os.fspath(image)!r}: "
                             f"{err.strerror or err}") from err
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        return _from_pil(image, model, name)
    torch = sys.modules.get("torch")  # never imported here: the client needs no torch
    if torch is not None and isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu().numpy(), model, name, channels_first=True)
    if isinstance(image, np.ndarray):
        return _from_array(image, model, name, channels_first=False)
    raise ImageError(f"{name}: expected encoded bytes, a file path, a PIL image, a numpy "
                     f"array or a torch tensor, not {type(image).__name__}")


def _layout_is_channels_first(shape: tuple[int, ...], channels_first: bool,
                              name: str) -> bool:
    """Whether a 3-d shape is C×H×W (else H×W×C): the axis of 1, 3 or 4 channels; when both
    ends could be, the library's convention (torch C×H×W, numpy and PIL H×W×C)."""
    first, last = shape[0] in CHANNEL_COUNTS, shape[2] in CHANNEL_COUNTS
    if first and last:
        return channels_first
    if first or last:
        return first
    raise ImageError(f"{name}: has shape {shape}; a 3-d image needs 1, 3 or 4 channels "
                     "first (C×H×W) or last (H×W×C)")


def _unit_floats(array: np.ndarray, name: str) -> np.ndarray:
    """The pixels as float32 in [0, 1]: uint8 / 255, uint16 / 65535, floats checked."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype.kind != "f":
        raise ImageError(f"{name}: has dtype {array.dtype}; pass uint8 (0-255), uint16 "
                         "(0-65535) or floats in [0, 1]")
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(f"{name}: float pixels must be in [0, 1]; found [{low:g}, {high:g}] "
                         "(divide uint8 values by 255, or pass the uint8 array)")
    return values


def _from_array(array: np.ndarray, model: ModelInput | None, name: str, *,
                channels_first: bool) -> pb.Image:
    if array.ndim == 2:
        hwc = array[:, :, None]
    elif array.ndim == 3:
        hwc = (np.moveaxis(array, 0, -1)
               if _layout_is_channels_first(array.shape, channels_first, name) else array)
    else:
        raise ImageError(f"{name}: has shape {tuple(array.shape)}; one image is H×W, C×H×W "
                         "or H×W×C (send a batch of N images with check_batch)")
    height, width, channels = hwc.shape
    if height == 0 or width == 0:
        raise ImageError(f"{name}: has no pixels (shape {tuple(array.shape)})")
    if array.dtype == np.bool_ or array.dtype.kind not in "uf":
        raise ImageError(f"{name}: has dtype {array.dtype}; pass uint8 (0-255), uint16 "
                         "(0-65535) or floats in [0, 1]")
    values = _unit_floats(hwc, name)  # validated even where the bytes sent are the original
    if model is not None and (height, width) == (model.height, model.width) and (
            channels == model.channels or (channels == 1 and model.channels == 3)):
        chw = np.moveaxis(values, -1, 0)
        if channels != model.channels:
            chw = np.repeat(chw, model.channels, axis=0)  # as the server widens grey
        data = np.ascontiguousarray(chw, dtype="<f4").tobytes()
        return pb.Image(tensor=pb.Tensor(shape=list(chw.shape), data=data))
    return pb.Image(encoded=_encode_array(hwc, values))


def _encode_array(hwc: np.ndarray, values: np.ndarray) -> bytes:
    """Encode pixels for the server to convert and resize: uint8 as PNG (exact), one
    channel of anything else as a float TIFF (exact), more channels rounded to 8-bit PNG."""
    from PIL import Image

    channels = hwc.shape[2]
    # fromarray picks the mode from the dtype and shape: L, RGB, RGBA; F for float32.
    if hwc.dtype == np.uint8:
        pixels = hwc[:, :, 0] if channels == 1 else hwc
        return _encode(Image.fromarray(np.ascontiguousarray(pixels)), "PNG")
    if channels == 1:
        return _encode(Image.fromarray(np.ascontiguousarray(values[:, :, 0])), "TIFF")
    rounded = np.rint(values * 255.0).astype(np.uint8)
    return _encode(Image.fromarray(np.ascontiguousarray(rounded)), "PNG")


# Modes PNG stores as they are; "F" and "I" go as TIFF, the rest are converted to RGB.
PNG_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16"})


def _from_pil(image: Any, model: ModelInput | None, name: str) -> pb.Image:
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: has no pixels")
    if model is not None and image.mode in ("L", "RGB") and (
            image.height, image.width) == (model.height, model.width):
        return _from_array(np.asarray(image), model, name, channels_first=False)
    if image.mode in PNG_MODES:
        return pb.Image(encoded=_encode(image, "PNG"))
    if image.mode in ("F", "I"):
        return pb.Image(encoded=_encode(image, "TIFF"))
    return pb.Image(encoded=_encode(image.convert("RGB"), "PNG"))


def _encode(image: Any, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()
