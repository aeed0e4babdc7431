"""Images and tensors to the model's input: (C, H, W) float32 in [0, 1].

One path for training, calibration and serving: `image_to_tensor` takes a PIL image of any
mode and size. Transparent pixels are composited onto black (the demo digits are light
ink on a dark ground); palette images are expanded first; grayscale becomes 3 channels by
stacking when the model wants 3; colour becomes one channel by luminance (ITU-R 601-2)
when the model wants 1. The image is then resized to the input size (bilinear, with
antialiasing; aspect ratio is not kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputTooLarge, InvalidInput
from .model import InputSpec

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
DECODE_BYTES_PER_PIXEL = 10
"""Peak bytes per pixel of decoding one image (measured: RGBA PNG 7.6, palette PNG 4.8,
JPEG ≈ 0 thanks to DCT scaling; 10 leaves room for 16-bit and LA images)."""
BUDGET_PER_DECODE = 256 * 2**20
MESSAGE_COPIES = 3
"""Copies of a request's bytes alive while it is handled (gRPC's buffer, the parsed
message, the bytes handed to the decoder)."""
LARGE_DECODE_PIXELS = 4_000_000
"""Above this, freed decoder memory is handed back to the OS at once (malloc_trim)."""


@dataclass(frozen=True)
class InputLimits:
    """Size limits applied while decoding a request."""

    max_image_bytes: int
    max_image_pixels: int
    decodes: threading.BoundedSemaphore | None = None
    """At most this many encoded images are decoded at once (the memory budget)."""


def decode_plan(budget_bytes: int, max_workers: int, max_image_bytes: int
                ) -> tuple[int, int]:
    """Return (concurrent decodes, pixel limit) for a request memory budget.

    The budget first holds the bytes of `max_workers` requests in flight
    (MESSAGE_COPIES × max_image_bytes each); the rest is for decoding: one decode per
    256 MiB of it (at least 1, at most one per RPC worker), each allowed that share
    divided by DECODE_BYTES_PER_PIXEL pixels. ValueError when less than 32 MiB is left.
    """
    decoding = budget_bytes - max_workers * MESSAGE_COPIES * max_image_bytes
    if decoding < BUDGET_PER_DECODE // 8:
        raise ValueError(
            f"a budget of {budget_bytes / 2**20:.0f} MiB leaves {decoding / 2**20:.0f} MiB "
            f"for decoding after {max_workers} requests of up to {max_image_bytes / 2**20:.1f}"
            f" MiB in flight; at least {BUDGET_PER_DECODE // 8 / 2**20:.0f} MiB are needed")
    decodes = max(1, min(max_workers, decoding // BUDGET_PER_DECODE))
    return decodes, decoding // (decodes * DECODE_BYTES_PER_PIXEL)


def _release_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them after a large decode)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _shrink(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Return the image box-reduced by a whole factor while it stays ≥ 2× the input size.

    Working in Pillow's 8-bit (or 32-bit) pixels before any float copy keeps the memory of
    a huge image to about its decoded size; the final antialiased resize does the rest.
    """
    factor = min(image.width // (2 * spec.width), image.height // (2 * spec.height))
    if factor < 2:
        return image
    if image.mode == "P":
        image = _expand_palette(image)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def _expand_palette(image: Image.Image) -> Image.Image:
    """Return a palette image as RGBA when it has a transparent colour, else RGB."""
    return image.convert("RGBA" if "transparency" in image.info else "RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Return an image without alpha: transparent areas become black."""
    if image.mode == "P":
        image = _expand_palette(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        ground = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(ground, rgba).convert("RGB")
    return image


MODE_RANGES = {"I": (0.0, 65535.0), "F": (0.0, 1.0)}
"""The pixel values each wide mode accepts; every other mode's values are in range by type
(8-bit: 0..255, I;16: 0..65535). "I" (32-bit integers, also signed 16-bit TIFFs) is read
as 16-bit data, "F" (32/64-bit float TIFFs) as pixel values already in [0, 1]."""


def check_pixel_values(image: Image.Image) -> None:
    """Raise InvalidInput unless every pixel of a wide-mode image is finite and within
    MODE_RANGES (nothing to check for the other modes)."""
    if image.mode not in MODE_RANGES:
        return
    arr = np.asarray(image)
    if arr.size == 0:
        return
    if image.mode == "F" and not np.isfinite(arr).all():
        raise InvalidInput("pixels of a float image (mode F) contain NaN or Inf")
    low, high = MODE_RANGES[image.mode]
    found_low, found_high = float(arr.min()), float(arr.max())
    if found_low < low or found_high > high:
        raise InvalidInput(
            f"pixels of a mode {image.mode} image must lie in [{low:g}, {high:g}], found "
            f"[{found_low:.4g}, {found_high:.4g}]")


def _to_unit_array(image: Image.Image) -> np.ndarray:
    """Return (H, W, K) float32 in [0, 1] for any PIL mode (8-bit, 16-bit, 32-bit int/float)
    whose pixels passed check_pixel_values."""
    image = _flatten_alpha(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0)[..., None]
    if image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(arr / top, 0, 1).astype(np.float32)[..., None]
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None]
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def image_to_tensor(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    """Return the model input for a PIL image: (C, H, W) float32 in [0, 1].

    Raises InvalidInput (no field: the caller names it) for pixels outside the range their
    mode allows, NaN or Inf (check_pixel_values), checked before any resampling could hide
    them."""
    check_pixel_values(image)
    arr = _to_unit_array(_shrink(image, spec))
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if tensor.shape[0] == 1 and spec.channels == 3:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 3 and spec.channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).reshape(3, 1, 1)
        tensor = (tensor * weights).sum(dim=0, keepdim=True)
    if tuple(tensor.shape[1:]) != (spec.height, spec.width):
        tensor = torch.nn.functional.interpolate(
            tensor[None], size=(spec.height, spec.width), mode="bilinear",
            align_corners=False, antialias=True,
        )[0]
    if not torch.isfinite(tensor).all():  # cannot happen after the check; never trusted
        raise InvalidInput("the decoded pixels are not finite")
    return tensor.clamp(0.0, 1.0).contiguous()


def decode_image(
    data: bytes, spec: InputSpec, *, max_pixels: int, field: str = "image.encoded"
) -> torch.Tensor:
    """Return the model input for encoded PNG/JPEG/BMP/TIFF bytes.

    Raises InvalidInput (naming `field`) for empty, corrupt or unsupported data and for
    pixels that are NaN, Inf or outside their mode's range (check_pixel_values), and
    InputTooLarge for images with more than `max_pixels` pixels.
    """
    if not data:
        raise InvalidInput("is empty", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            if image.width * image.height > max_pixels:
                raise InputTooLarge(
                    f"image has {image.width}x{image.height} pixels, limit {max_pixels}",
                    field=field,
                )
            if image.format == "JPEG":
                # DCT scaling: decode at 1/2, 1/4 or 1/8 size while still ≥ the input size.
                image.draft("RGB" if image.mode not in ("L", "RGB") else image.mode,
                            (spec.width, spec.height))
            image.load()
    except InputTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputTooLarge(str(err), field=field) from err
    except MemoryError as err:
        raise InputTooLarge("decoding needs more memory than is available", field=field) from err
    except Exception as err:  # noqa: BLE001  (client bytes: any decoder failure is theirs)
        # Pillow raises many types on malformed files (a TIFF tag of the wrong type raises
        # TypeError inside load()); none of them is the server's bug.
        kind = "" if isinstance(err, UnidentifiedImageError | OSError | ValueError) else (
            f"{type(err).__name__}: ")
        raise InvalidInput(
            f"cannot decode as {'/'.join(ACCEPTED_FORMATS)}: {kind}{err}", field=field
        ) from err
    try:
        return image_to_tensor(image, spec)
    except InvalidInput as err:
        err.field = field
        raise
    except MemoryError as err:
        raise InputTooLarge("converting needs more memory than is available",
                            field=field) from err
    except Exception as err:  # noqa: BLE001  (as above)
        raise InvalidInput(f"unsupported image ({image.mode}): {err}", field=field) from err
    finally:
        if image.width * image.height > LARGE_DECODE_PIXELS:
            image.close()
            del image
            _release_memory()


def tensor_from_bytes(
    shape: list[int] | tuple[int, ...], data: bytes, spec: InputSpec, *, field: str = "image.tensor"
) -> torch.Tensor:
    """Return a validated (C, H, W) float32 tensor from little-endian float32 bytes.

    The shape must equal the model's input shape; values must be finite and in [0, 1].
    """
    shape = tuple(int(s) for s in shape)
    if shape != spec.shape:
        raise InvalidInput(f"shape {list(shape)} must be {list(spec.shape)}",
                           field=f"{field}.shape")
    return torch.from_numpy(_pixels(data, shape, f"{field}.data"))


def tensor_batch_from_bytes(
    shape: list[int] | tuple[int, ...], data: bytes, spec: InputSpec, *, shape_field: str,
    data_field: str, max_items: int
) -> torch.Tensor:
    """Return a validated (N, C, H, W) float32 tensor from little-endian float32 bytes:
    1 ≤ N ≤ max_items, (C, H, W) the model's input shape, values finite and in [0, 1]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[1:] != spec.shape or shape[0] < 1:
        raise InvalidInput(f"{list(shape)} must be [N, {', '.join(map(str, spec.shape))}] "
                           "with N >= 1", field=shape_field)
    if shape[0] > max_items:
        raise InputTooLarge(f"has {shape[0]} images, limit {max_items}", field=shape_field)
    return torch.from_numpy(_pixels(data, shape, data_field))


def float32_array(data: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Return little-endian float32 bytes as a native float32 array of `shape` (no checks;
    the bytes' length must fit)."""
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def _pixels(data: bytes, shape: tuple[int, ...], field: str) -> np.ndarray:
    """Return float32 pixels of `shape` from bytes, refusing a wrong length, NaN/Inf and
    values outside [0, 1]."""
    expected = 4 * math.prod(shape)
    if len(data) != expected:
        raise InvalidInput(
            f"has {len(data)} bytes, expected {expected} (float32 x {list(shape)})",
            field=field,
        )
    values = float32_array(data, shape)
    if not np.isfinite(values).all():
        raise InvalidInput("contains NaN or Inf", field=field)
    if values.min() < 0.0 or values.max() > 1.0:
        raise InvalidInput(
            f"values must lie in [0, 1], found [{values.min():.4g}, {values.max():.4g}]",
            field=field,
        )
    return values


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[list[int], bytes]:
    """Return (shape, little-endian float32 bytes) of a tensor; inverse of tensor_from_bytes."""
    arr = tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    return list(arr.shape), arr.tobytes()


def image_from_encoded(data: bytes, spec: InputSpec, limits: InputLimits,
                       field: str) -> torch.Tensor:
    """Return the (C, H, W) pixels of an encoded image (PNG, JPEG, …) within the limits:
    its size, its pixels, and the number of decodes at once (the memory budget)."""
    if len(data) > limits.max_image_bytes:
        raise InputTooLarge(f"has {len(data)} bytes, limit {limits.max_image_bytes}",
                            field=field)
    with limits.decodes or contextlib.nullcontext():
        return decode_image(data, spec, max_pixels=limits.max_image_pixels,
                            field=field)
